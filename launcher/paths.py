"""Where the entry points and the shipped configs sit: known here, in the launcher, so the library never
hard-codes the repository's layout (the library's launch helpers take the train script as an argument)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
TRAIN_SCRIPT = REPO / "launcher" / "train.py"
