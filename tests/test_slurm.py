"""slurm/pretrain.sh on a real single-node Slurm: 2 CPU tasks, a checkpoint, USR2 -> checkpoint ->
requeue, and the requeued job resuming from that checkpoint to the end."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from common_fixtures import REPO, free_ports_for_servers
from slurm_fixtures import slurm_missing, start_local_slurm, stop_local_slurm
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


def test_pretrain_script_checkpoints_requeues_on_usr2_and_resumes(slurm, tmp_path, tiny_lm):
    features = tiny_features(tmp_path / "features")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        features, tiny_lm, run_dir, "train.max_steps=60", "train.checkpoint_every=5", "train.log_every=5",
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
        # Bound by rank 0 in both runs, a minute apart: outside the ephemeral range, so that no
        # outgoing connection on this machine can be given it in between.
        "MASTER_PORT": str(free_ports_for_servers(1)[0]),
    }
    output = tmp_path / "job.out"
    # The script asks for 2 nodes x 8 GPUs; one node with 2 CPU tasks here (the fake GPUs satisfy --gres).
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}",
         str(REPO / "slurm" / "pretrain.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]

    latest = run_dir / "checkpoints" / "latest"
    slurm.wait_for_job(job_id, lambda job: latest.is_file(), 600, "the first checkpoint", output)
    # What `#SBATCH --signal=B:USR2@120` does before the time limit: signal the batch shell.
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)
    # The script's own `scontrol requeue` counts the restart. Slurm then holds the job until the
    # first run's credentials expire (AuthInfo=cred_expire in the test's slurm.conf) and starts it
    # again by itself: nothing here moves its begin time.
    slurm.wait_for_job(job_id, lambda job: job.get("Restarts") == "1", 300, "the checkpoint and requeue", output)
    assert "requeueing job" in output.read_text()
    done = slurm.wait_for_job(job_id, lambda job: job.get("JobState") == "COMPLETED", 600,
                              "the requeued job to finish", output)

    log = output.read_text()
    stopped_at = int(log.split("stopped by SIGUSR2 at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 60
    assert f"resumed from step {stopped_at}" in log
    assert "(restart 1)" in log
    assert done["Restarts"] == "1" and done["ExitCode"] == "0:0"
    assert latest.read_text() == "step_00000060"
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 61))
