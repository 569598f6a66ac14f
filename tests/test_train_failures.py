"""Failures: a rank killed with SIGKILL ends the launch non-zero in bounded time; a run of NaN
losses aborts with a clear message; a bad config is one line and exit code 2."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest
from common_fixtures import REPO, free_port
from train_fixtures import TINY_CONFIG, launch, run_train_main, tiny_features, tiny_overrides

from launcher.paths import TRAIN_SCRIPT
from vlpdist.parallel.launch import deepspeed_train_command

KILL_BOUND_S = 60


def _rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_one_rank_ends_the_launch_nonzero_in_bounded_time(tiny_lm, tmp_path):
    features = tiny_features(tmp_path / "features")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(features, tiny_lm, run_dir, "train.max_steps=100000", "train.checkpoint_every=100000",
                               "train.caption_log_every=0", "train.dist_timeout_s=30")
    launcher = subprocess.Popen(
        deepspeed_train_command(TRAIN_SCRIPT, TINY_CONFIG, overrides, 2, free_port()), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None, "training ended before the kill"
            assert time.monotonic() < deadline, "training did not reach step 3"
            time.sleep(0.5)
        victim = _rank_process(launcher, 1)
        survivor = _rank_process(launcher, 0)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = launcher.wait(timeout=KILL_BOUND_S)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert returncode != 0
    assert elapsed < KILL_BOUND_S
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_of_nan_losses_aborts_with_a_clear_message(tiny_lm, tmp_path):
    # Every training sample (shards 0-4; shard 5 is held out) has a NaN embedding.
    nan_keys = frozenset(f"{shard:05d}{index:04d}" for shard in range(5) for index in range(48))
    features = tiny_features(tmp_path / "features", nan_keys=nan_keys)
    overrides = tiny_overrides(features, tiny_lm, tmp_path / "run", "train.max_consecutive_nan_steps=3",
                               "train.caption_log_every=0")
    result = launch(overrides, timeout_s=280)
    assert result.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no optimizer step was taken


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.zero_stage=3", "train.zero_stage"),
        ("train.ep_size=2", "must divide the world size 1"),
        ("train.no_such_key=1", "unknown config key"),
        ("train.max_steps=many", "train.max_steps"),
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(override, message, tmp_path):
    result = run_train_main(["--config", str(TINY_CONFIG), f"train.output_dir={tmp_path}", override])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_missing_feature_folder_is_a_user_error(tmp_path):
    result = run_train_main(["--config", str(TINY_CONFIG), "train.ep_size=1", f"train.features_dir={tmp_path / 'nope'}",
                             f"train.output_dir={tmp_path}"])
    assert result.returncode == 2
    assert "feature folder" in result.stderr and "does not exist" in result.stderr


def test_generated_deepspeed_config_follows_the_train_section():
    from vlpdist.config import load_config
    from vlpdist.parallel.deepspeed_config import build_deepspeed_config

    train = load_config(TINY_CONFIG, ["train.gradient_accumulation_steps=4", "train.grad_clip=0.5"]).train
    cpu = build_deepspeed_config(train, world_size=2, on_gpu=False)
    assert cpu["train_batch_size"] == 8 * 4 * 2
    assert cpu["gradient_clipping"] == 0.5
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    gpu = build_deepspeed_config(train, world_size=16, on_gpu=True)
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["torch_adam"] is True
    assert json.loads(json.dumps(gpu)) == gpu
