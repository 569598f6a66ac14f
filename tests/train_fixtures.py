"""A tiny training world for the train/Slurm tests: synthetic feature shards and a tiny local LM."""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "train_cpu_tiny.yaml"


def tiny_lm(tmp_path_factory) -> Path:
    """A tiny GPT-2 + BPE tokenizer trained on the synthetic captions, built once per test session."""
    from launcher.make_demo_lm import make_demo_lm
    from vlpdist.data.synthetic import synthetic_captions

    lm_dir = tmp_path_factory.getbasetemp() / "tiny_lm"
    if not lm_dir.is_dir():
        make_demo_lm(lm_dir, synthetic_captions(1000, 1), width=32, layers=1, heads=2, vocab_size=300, steps=80, batch_size=64)
    return lm_dir


def tiny_features(folder: Path, num_shards: int = 6, samples_per_shard: int = 48, **kwargs) -> Path:
    from vlpdist.data.synthetic import write_synthetic_feature_shards

    write_synthetic_feature_shards(folder, num_shards, samples_per_shard, dim=32, seed=0, **kwargs)
    return folder


def tiny_overrides(features: Path, lm_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"root={features.parent}",
        f"train.features_dir={features}",
        f"model.lm_name={lm_dir}",
        f"train.output_dir={output_dir}",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
