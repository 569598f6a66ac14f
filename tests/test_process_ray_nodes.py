"""The processing stage on a real two-node Ray cluster (both nodes on this machine), one node lost mid-stage."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
from common_fixtures import wait_for
from process_fixtures import TINY_CLIP, write_raw_shards
from process_ray_fixtures import (
    alive_nodes,
    attempts,
    hold_runtime_env,
    holding,
    kill_tree,
    process_tree,
    ray_pythonpath,
    start_second_node,
)
from ray_cluster_fixtures import RAY_CLI, ray_env, start_ray_head, stop_ray_head

from vlpdist.data.feature_format import iterate_feature_shards
from vlpdist.config import load_config, save_config

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A `ray start --head` with 1 CPU and a second `ray start --address` node with 1 CPU and a
    `node2` resource; both own their ports and are stopped by their own processes."""
    pytest.importorskip("ray", reason="ray is in the ingest extra, which CI installs")
    monkeypatch.setenv("PYTHONPATH", ray_pythonpath())  # drivers and workers import the repo and tests/
    # The GCS takes a node for lost after 3 missed health checks 0.5 s apart (the defaults take ~30 s).
    for name, value in (("RAY_health_check_period_ms", "500"), ("RAY_health_check_timeout_ms", "1000"),
                        ("RAY_health_check_failure_threshold", "3")):
        monkeypatch.setenv(name, value)
    head, head_process = start_ray_head(num_cpus=1)
    node2 = None
    try:
        node2 = start_second_node(head.gcs_address, ray_env(head.auth_token_path), tmp_path / "node2.log")
        token = head.auth_token_path.read_text()
        cluster = SimpleNamespace(head=head, node2=node2, node2_alive=lambda: any(
            node["resources_total"].get("node2") for node in alive_nodes(head.dashboard_url, token)))
        wait_for(cluster.node2_alive, 120, "the second Ray node to join", tmp_path / "node2.log")
        yield cluster
    finally:
        if node2 is not None:
            kill_tree(process_tree(node2.pid))
        stop_ray_head(head, head_process)


def test_shards_of_a_lost_node_rerun_on_the_head(tmp_path, two_nodes, tiny_clip):
    """`ray job submit` of the stage: one shard actor per node; node 2 dies with its first shard half
    written; that shard reruns on the head, every count is exact, every shard is done exactly once."""
    write_raw_shards(tmp_path, num_samples=80, per_shard=20)
    hold_dir = tmp_path / "hold"
    runtime_env = hold_runtime_env(hold_dir)
    (hold_dir / "hold").touch()  # actors wait before a shard's second batch until the test lets them go
    config = save_config(load_config(None, [
        f"root={tmp_path}", "process.ray_address=auto", f"process.clip_model={TINY_CLIP}",
        f"process.clip_pretrained={tiny_clip}", "process.vocab=demo_shapes", "process.batch_size=8",
        "process.cpus_per_task=1", "process.clip_threshold=-1.0", "process.max_retries=2",
    ]), tmp_path / "run")
    job = subprocess.Popen(
        [RAY_CLI, "job", "submit", "--address", two_nodes.head.dashboard_url, "--runtime-env-json",
         json.dumps(runtime_env), "--", "python", "-m", "data_ingest.run", "--config", str(config), "--stage", "process"],
        env=ray_env(two_nodes.head.auth_token_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    features = tmp_path / "features"
    try:
        wait_for(lambda: len(holding(hold_dir)) == 2 or job.poll() is not None, 240,
                 "a shard actor in the hold on each node")
        assert job.poll() is None, f"the job ended early:\n{job.stdout.read()[-4000:]}"
        node2_pids = {proc.pid for proc in process_tree(two_nodes.node2.pid)}
        held = holding(hold_dir)
        (victim,) = [pid for pid in held if pid in node2_pids]
        (head_actor,) = [pid for pid in held if pid not in node2_pids]
        lost_shard = held[victim]
        assert list(features.glob(f".{lost_shard}.tar.tmp.{victim}")) and not (features / f"{lost_shard}.tar").exists()
        kill_tree(process_tree(two_nodes.node2.pid))  # the whole node: ray start, raylet, agents, workers
        wait_for(lambda: not two_nodes.node2_alive(), 120, "Ray to see the second node lost")
    finally:
        (hold_dir / "hold").unlink()
        output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-4000:]

    shards = [f"{i:05d}" for i in range(4)]
    assert attempts(hold_dir, lost_shard) == sorted([victim, head_actor])  # killed on node 2, rerun on the head
    assert all(attempts(hold_dir, name) == [head_actor] for name in shards if name != lost_shard)
    summary = json.loads((features / "process_summary.json").read_text())
    assert summary["shards_done"] == 4 and not summary["shards_failed"] and summary["shards_retried"] == {lost_shard: 2}
    assert summary["raw_samples"] == summary["written"] == 80 and summary["failed"] == {}
    assert sorted(p.name for p in features.glob("*_stats.json")) == [f"{name}_stats.json" for name in shards]
    assert not [p for p in features.iterdir() if ".tmp." in p.name]
    for name in shards:
        stats = json.loads((features / f"{name}_stats.json").read_text())
        keys = [sample.key for sample in iterate_feature_shards(str(features / f"{name}.tar"))]
        assert stats["raw_samples"] == stats["written"] == 20 and keys == [f"{name}{i:04d}" for i in range(20)]
