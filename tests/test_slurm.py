"""slurm/pretrain.sh on a real single-node Slurm: 2 CPU tasks, a checkpoint, USR2 -> checkpoint ->
requeue, and the requeued job resuming from that checkpoint to the end."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from slurm_fixtures import slurm_missing, start_local_slurm, stop_local_slurm
from train_fixtures import REPO, TINY_CONFIG, free_port, tiny_features, tiny_lm, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_missing()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    handle, started = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    yield handle
    stop_local_slurm(handle, started)


def _wait(predicate, timeout_s, what, log_path=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    log = log_path.read_text()[-4000:] if log_path is not None and log_path.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def test_pretrain_script_checkpoints_requeues_on_usr2_and_resumes(slurm, tmp_path, tmp_path_factory):
    lm_dir = tiny_lm(tmp_path_factory)
    features = tiny_features(tmp_path / "features")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        features, lm_dir, run_dir, "train.max_steps=60", "train.checkpoint_every=5", "train.log_every=5",
        "train.caption_log_every=0", "train.eval_at_end=false", "train.export_at_end=false",
    )
    env = {
        **slurm.env,
        "VLPDIST_CONFIG": str(TINY_CONFIG),
        "VLPDIST_OVERRIDES": " ".join(overrides),
        "VLPDIST_PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
    }
    output = tmp_path / "job.out"
    # The script asks for 2 nodes x 8 GPUs; one node with 2 CPU tasks here (the fake GPUs satisfy --gres).
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}",
         str(REPO / "slurm" / "pretrain.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]

    latest = run_dir / "checkpoints" / "latest"
    _wait(latest.is_file, 240, "the first checkpoint", output)
    # What `#SBATCH --signal=B:USR2@120` does before the time limit: signal the batch shell.
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)
    _wait(lambda: "requeueing job" in output.read_text(), 120, "the checkpoint and requeue", output)
    # Slurm holds a requeued job for about two minutes (Reason=BeginTime); a cluster just waits,
    # the test moves the begin time to now.
    _wait(lambda: slurm.job_field(job_id, "Reason") == "BeginTime", 60, "the requeued job to be pending", output)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    _wait(lambda: slurm.job_field(job_id, "JobState") == "COMPLETED", 300, "the requeued job to finish", output)

    log = output.read_text()
    stopped_at = int(log.split("stopped by SIGUSR2 at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 60
    assert f"resumed from step {stopped_at}" in log
    assert "(restart 1)" in log
    assert slurm.job_field(job_id, "Restarts") == "1"
    assert latest.read_text() == "step_00000060"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
