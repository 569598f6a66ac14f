"""slurm/pretrain.sh on a real single-node Slurm, 2 CPU tasks: USR2 -> checkpoint -> requeue -> the
rerun resumes, and at the restart cap stops without a requeue (exit 3); scancel -> checkpoint ->
the job ends CANCELLED, not requeued."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO, free_ports_for_servers, wait_for
from slurm_fixtures import LocalSlurm, slurm_missing, start_local_slurm, stop_local_slurm
from train_fixtures import TINY_CONFIG, read_metrics, tiny_features, tiny_overrides

# Each wait below ends as soon as its condition holds, or at once when the job ends otherwise; the
# limits only matter on a machine busy with other work (about 1.5 min idle, 8 min seen busy).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_missing()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    handle = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    yield handle
    stop_local_slurm(handle)


def _submit(slurm: LocalSlurm, tmp_path: Path, tiny_lm: Path, **env_extra: str) -> tuple[str, Path, Path]:
    """sbatch slurm/pretrain.sh on the tiny run, far from its end (1000 steps): it stops only when
    the test signals it. Returns (job id, job output, run folder)."""
    features = tiny_features(tmp_path / "features")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        features, tiny_lm, run_dir, "train.max_steps=1000", "train.checkpoint_every=5", "train.log_every=5",
        "train.caption_log_every=0", "train.eval_at_end=false", "train.export_at_end=false",
        # A rank can spend minutes loading DeepSpeed's JIT-built CPU comm op while another process
        # on the machine rebuilds it (they share ~/.cache/torch_extensions); the other rank waits
        # at the rendezvous meanwhile (train.dist_timeout_s bounds that wait, or is its floor).
        "train.dist_timeout_s=300",
    )
    env = {
        **slurm.env,
        "VLPDIST_CONFIG": str(TINY_CONFIG),
        "VLPDIST_OVERRIDES": shlex.join(overrides),  # launcher/train.py reads it with shlex.split
        "VLPDIST_PYTHON": sys.executable,
        "VLPDIST_STOP_MARKER": str(tmp_path / "stop_marker"),
        # Bound by rank 0 in both runs, a minute apart: outside the ephemeral range, so that no
        # outgoing connection on this machine can be given it in between.
        "MASTER_PORT": str(free_ports_for_servers(1)[0]),
        **env_extra,
    }
    output = tmp_path / "job.out"
    # The script asks for 2 nodes x 8 GPUs; one node with 2 CPU tasks here (the fake GPUs satisfy --gres).
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}",
         str(REPO / "slurm" / "pretrain.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    return job_id, output, run_dir


def _stopped_at(log: str, signal_name: str, occurrence: int = 0) -> int:
    """The step of rank 0's `occurrence`-th "stopped by <signal> at step N; ..." line."""
    return int(re.findall(rf"^stopped by {signal_name} at step (\d+);", log, re.MULTILINE)[occurrence])


def test_usr2_checkpoints_and_requeues_and_the_restart_cap_stops_it(slurm, tmp_path, tiny_lm):
    job_id, output, run_dir = _submit(slurm, tmp_path, tiny_lm, VLPDIST_MAX_RESTARTS="1")
    latest = run_dir / "checkpoints" / "latest"
    slurm.wait_for_job(job_id, lambda job: latest.is_file(), 600, "the first checkpoint", output)
    # What `#SBATCH --signal=B:USR2@120` does before the time limit: signal the batch shell.
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)
    # The script's own `scontrol requeue` counts the restart. Slurm then holds the job until the
    # first run's credentials expire (AuthInfo=cred_expire in the test's slurm.conf) and starts it
    # again by itself: nothing here moves its begin time.
    slurm.wait_for_job(job_id, lambda job: job.get("Restarts") == "1", 300, "the checkpoint and requeue", output)
    first_stop = _stopped_at(output.read_text(), "SIGUSR2")
    assert f"requeued job {job_id} (restart 1 of at most 1); exit 0" in output.read_text()
    assert latest.read_text() == f"step_{first_stop:08d}"

    resumed = f"resumed from step {first_stop}"
    slurm.wait_for_job(job_id, lambda job: resumed in output.read_text() and latest.read_text() != f"step_{first_stop:08d}",
                       600, "the rerun's first checkpoint", output)
    assert "(restart 1 of at most 1)" in output.read_text()
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)
    # At the cap the script stops without a requeue: exit 3, so the job ends FAILED, not COMPLETED.
    done = slurm.wait_for_job(job_id, lambda job: job.get("JobState") == "FAILED", 300, "the stop at the restart cap", output)
    log = output.read_text()
    second_stop = _stopped_at(log, "SIGUSR2", 1)
    assert "restart cap reached (1 restarts, VLPDIST_MAX_RESTARTS=1): not requeued (resubmit to resume); exit 3" in log
    assert done["Restarts"] == "1" and done["ExitCode"] == "3:0"
    assert latest.read_text() == f"step_{second_stop:08d}" and second_stop > first_stop
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, second_stop + 1))
    assert not (tmp_path / "stop_marker").exists()


def test_scancel_checkpoints_and_the_job_ends_cancelled_without_requeue(slurm, tmp_path, tiny_lm):
    job_id, output, run_dir = _submit(slurm, tmp_path, tiny_lm)
    latest = run_dir / "checkpoints" / "latest"
    slurm.wait_for_job(job_id, lambda job: latest.is_file(), 600, "the first checkpoint", output)
    slurm.run("scancel", job_id)  # SIGTERM to every process of the job, SIGKILL after KillWait

    def batch_script_ended() -> bool:
        job = slurm.show_job(job_id)
        return job.get("JobState") not in ("RUNNING", "COMPLETING") or job.get("Restarts") != "0"

    wait_for(batch_script_ended, 300, "the cancelled job's batch script to end", output)
    job = slurm.show_job(job_id)
    log = output.read_text()
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", (job, log[-3000:])
    assert "the job was cancelled (scancel): not requeued; exit 0" in log
    stopped_line = next(line for line in log.splitlines() if line.startswith("vlpdist: stopped by"))
    step = int(stopped_line.split(" at step ")[1].split(",")[0])
    assert latest.read_text() == f"step_{step:08d}"
    assert "Traceback" not in log


# A stand-in for a rank, for what the script does with a run's outcome: it announces itself, then on
# SIGUSR2 either fails (exit 1) or makes a planned stop as launcher/train.py does (rank 0's marker, exit 0).
# The traps are set before the announcement: a USR2 in between would kill the rank by the signal
# (status 140). A failing rank also fails on SIGTERM: the first rank to exit 1 makes srun
# (--kill-on-bad-exit) send SIGTERM to the other, which may still be in `sleep` with its USR2 trap
# pending (bash runs a trap once the foreground command ends); killed by it, that rank made srun's
# status 143 in about one run in six.
STAND_IN_RANK = """#!/bin/bash
on_usr2() {
    if [[ "$OUTCOME" == fail ]]; then exit 1; fi
    if [[ "$RANK" == 0 ]]; then echo "5 SIGUSR2" > "$VLPDIST_STOP_MARKER"; fi
    exit 0
}
trap on_usr2 USR2
if [[ "$OUTCOME" == fail ]]; then trap 'exit 1' TERM; fi
touch "$STARTED_DIR/rank$RANK"
while true; do sleep 0.2; done
"""


@pytest.mark.parametrize("outcome,exit_code,last_line", [
    ("fail", 1, "vlpdist: training failed with status 1 after SIGUSR2; not requeued; exit 1"),
    ("requeue_refused", 4, "vlpdist: stopped by SIGUSR2 at step 5, checkpoint written; scontrol requeue {job} failed "
                           "(resubmit to resume); exit 4"),
])
def test_a_failed_run_or_requeue_after_usr2_exits_non_zero_without_requeue(slurm, tmp_path, outcome, exit_code, last_line):
    rank = tmp_path / "rank.sh"
    rank.write_text(STAND_IN_RANK)
    rank.chmod(0o755)
    started = tmp_path / "started"
    started.mkdir()
    output = tmp_path / "job.out"
    env = {**slurm.env, "VLPDIST_PYTHON": str(rank), "OUTCOME": outcome, "STARTED_DIR": str(started),
           "VLPDIST_STOP_MARKER": str(tmp_path / "stop_marker")}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}",
         str(REPO / "slurm" / "pretrain.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    slurm.wait_for_job(job_id, lambda job: len(list(started.iterdir())) == 2, 120, "both ranks", output)
    if outcome == "requeue_refused":
        slurm.run("scontrol", "update", f"JobId={job_id}", "Requeue=0")  # so that `scontrol requeue` fails
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)
    done = slurm.wait_for_job(job_id, lambda job: job.get("JobState") == "FAILED", 120, "the job to end", output)
    assert done["ExitCode"] == f"{exit_code}:0" and done["Restarts"] == "0"
    assert output.read_text().strip().splitlines()[-1] == last_line.format(job=job_id)
