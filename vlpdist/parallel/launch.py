"""Launch `launcher/train.py` on this machine's ranks with DeepSpeed's launcher.

`deepspeed --num_gpus N` starts N processes (GPUs, or CPU processes on gloo when there is no GPU)
and kills the others when one exits with an error, so a dead rank ends the whole launch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TRAIN_SCRIPT = REPO / "launcher" / "train.py"


def deepspeed_train_command(config_path: str | Path, overrides: list[str], num_procs: int, master_port: int = 29500, extra_args: list[str] = ()) -> list[str]:
    """The `deepspeed --num_gpus N launcher/train.py --config ... key=value ...` command line."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(master_port),
        str(TRAIN_SCRIPT), "--config", str(config_path), *extra_args, *overrides,
    ]


def run_deepspeed(config_path: str | Path, overrides: list[str] = (), num_procs: int = 2, master_port: int = 29500) -> int:
    """Run training on `num_procs` local ranks and return the launcher's exit code."""
    return subprocess.run(deepspeed_train_command(config_path, list(overrides), num_procs, master_port), cwd=REPO).returncode
