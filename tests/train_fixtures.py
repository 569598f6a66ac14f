"""A tiny training world for the train/Slurm tests: synthetic feature shards, a tiny local LM, and
the ways the tests start training (the `tiny_lm` fixture itself is in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common_fixtures import REPO, free_port

from launcher.paths import TRAIN_SCRIPT
from vlpdist.parallel.launch import deepspeed_train_command

TINY_CONFIG = REPO / "configs" / "train_cpu_tiny.yaml"


def save_tiny_lm(lm_dir: Path) -> Path:
    """A tiny GPT-2 + BPE tokenizer trained on the synthetic captions, saved into `lm_dir`."""
    from data_ingest.sources.demo_lm import make_demo_lm
    from vlpdist.data.synthetic import synthetic_captions

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


def launch(overrides: list[str], num_procs: int = 2, timeout_s: float = 400, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`deepspeed launcher/train.py` with TINY_CONFIG and `overrides` on `num_procs` local ranks, output captured."""
    command = deepspeed_train_command(TRAIN_SCRIPT, TINY_CONFIG, overrides, num_procs, free_port())
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)


def collective_probe_env(log_dir: Path) -> dict[str, str]:
    """The environment under which rank processes record the tensor collectives made from vlpdist
    code (tests/collective_probe/sitecustomize.py) into `log_dir` (see `recorded_collectives`)."""
    import os

    probe = str(REPO / "tests" / "collective_probe")
    return {**os.environ, "VLPDIST_COLLECTIVE_LOG": str(log_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH", "")]))}


def recorded_collectives(log_dir: Path, rank: int) -> list[dict]:
    """What `collective_probe_env` recorded in rank `rank`'s process."""
    (path,) = log_dir.glob(f"rank{rank}_*.json")
    return json.loads(path.read_text())


def run_train_main(args: list[str], timeout_s: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python launcher/train.py *args` in one process (no DeepSpeed launcher), output captured."""
    return subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def evaluate_export_in_one_rank(features: Path, lm_dir: Path, export_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """`launcher/train.py --evaluate-export` in one process at ep_size 1: (its eval.json, the
    eval.json the export's own run wrote beside it)."""
    import os

    overrides = tiny_overrides(features, lm_dir, out_dir, "train.ep_size=1")
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = run_train_main(["--config", str(TINY_CONFIG), "--evaluate-export", str(export_dir), *overrides],
                            timeout_s=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out_dir / "eval.json").read_text()), json.loads((export_dir.parent / "eval.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`, one per logged optimizer step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seed_checkpoints(source_run: Path, run_dir: Path, tags: list[str], latest: str) -> Path:
    """A fresh run folder holding copies of `source_run`'s checkpoint `tags`, with `latest` pointing at one."""
    import shutil

    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    for tag in tags:
        shutil.copytree(source_run / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(latest)
    return checkpoints
