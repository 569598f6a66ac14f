"""The processing driver never waits without end: work no node can take is named within
process.schedule_timeout_s, and an attempt stuck past process.task_timeout_s is stopped and retried."""

from __future__ import annotations

import pytest
from process_fixtures import TINY_CLIP, write_raw_shards
from process_ray_fixtures import attempts, clear_hold_dir, init_ray_with_hold

from data_ingest.process.run import run_process
from vlpdist.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_hold_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def ray_session(module_hold_dir):
    """A local Ray without GPUs (2 CPUs) and the test hold in its workers; run_process joins it."""
    ray = pytest.importorskip("ray", reason="ray is in the ingest extra, which CI installs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        init_ray_with_hold(module_hold_dir, monkeypatch, address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
        yield ray
        ray.shutdown()


@pytest.fixture
def hold_dir(module_hold_dir, ray_session):
    return clear_hold_dir(module_hold_dir)


def _config(root, checkpoint, *extra: str):
    return load_config(None, [
        f"root={root}", f"process.clip_model={TINY_CLIP}", f"process.clip_pretrained={checkpoint}",
        "process.vocab=demo_shapes", "process.batch_size=8", "process.cpus_per_task=1", "process.clip_threshold=-1.0",
        *extra,
    ])


def test_actor_needing_a_gpu_the_cluster_lacks_is_named_and_its_shards_fail(tmp_path, ray_session, tiny_clip, capsys):
    write_raw_shards(tmp_path, num_samples=20, per_shard=10)
    summary = run_process(_config(tmp_path, tiny_clip, "process.gpus_per_task=1", "process.schedule_timeout_s=2"))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[process] no shard actor")]
    assert len(printed) == 1, printed
    assert "the cluster lacks GPU (an actor asks for 1, the cluster has 0)" in printed[0]
    assert sorted(summary["shards_failed"]) == ["00000", "00001"]
    assert all("the cluster lacks GPU" in error for error in summary["shards_failed"].values())
    assert summary["shards_done"] == 0


def test_stuck_attempt_is_timed_out_and_retried(tmp_path, hold_dir, tiny_clip, capsys):
    write_raw_shards(tmp_path, num_samples=10, per_shard=10)
    (hold_dir / "stall_once").touch()  # the first attempt blocks like a read that never returns
    # 10 s: far above a tiny shard's attempt (about 1 s); one that still runs over on a busy machine is retried again.
    summary = run_process(_config(tmp_path, tiny_clip, "process.task_timeout_s=10", "process.max_retries=4"))
    stalled = list(hold_dir.glob("00000.*.stalled"))
    assert len(stalled) == 1, "the first attempt did not stall"
    stalled_pid = int(stalled[0].name.split(".")[1])
    assert not summary["shards_failed"] and summary["shards_done"] == 1 and summary["written"] == 10
    assert summary["shards_retried"]["00000"] >= 2
    later = [pid for pid in attempts(hold_dir, "00000") if pid != stalled_pid]
    assert later, "no attempt after the stalled one"
    assert "shard 00000: attempt 1 ran over process.task_timeout_s=10 s; its actor is killed" in capsys.readouterr().out
