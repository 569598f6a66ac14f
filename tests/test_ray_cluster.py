"""Ingestion through real Ray clusters on loopback: `ray job submit`, and `ray up`/`submit`/`down`.

The images come from the demo's loopback HTTP server; the cluster is real (a `ray start --head`
for the job API; the cluster launcher over a private sshd for `ray up`), and the shards and the
summary the submitted run writes are checked afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
import yaml
from common_fixtures import REPO, free_ports_for_servers, port_is_open
from process_fixtures import TINY_CLIP
from ray_cluster_fixtures import (  # noqa: F401 (fixtures)
    RAY_CLI,
    RAY_START_PORTS,
    loopback_sshd,
    ray_env,
    ray_head,
    ray_start_port_flags,
)

from data_ingest.download import SUMMARY_FILENAME
from vlpdist.data.feature_format import iterate_feature_shards
from data_ingest.sources.demo_server import DemoImageServer
from data_ingest.sources.synthetic import broken_paths, demo_url_rows, generate_demo_samples
from vlpdist.config import DemoDataConfig, load_config, save_config

LOCAL_CLUSTER_FILE = REPO / "configs" / "ray" / "local.yaml"
DEMO = DemoDataConfig(num_samples=30, seed=5, broken_per_kind=1, slow_response_s=3.0)
SAMPLES_PER_SHARD = 16
BROKEN_ROWS = len(broken_paths(DEMO))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ray").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_files_pass_rays_own_schema(path):
    """`ray up` would accept every shipped cluster file (Ray's schema, after its own defaults are merged)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    """The demo images on a loopback server and a URL list pointing at them (30 good rows + 6 broken)."""
    samples = generate_demo_samples(DEMO)
    folder = tmp_path_factory.mktemp("source")
    with DemoImageServer({s.path: s.jpeg for s in samples}, broken_paths(DEMO), DEMO.slow_response_s) as server:
        rows = pd.DataFrame(demo_url_rows(samples, DEMO, server.base_url))
        url_list = folder / "urls.parquet"
        rows[["url", "caption"]].to_parquet(url_list, index=False)
        yield url_list


def write_ingest_config(folder: Path, root: Path, url_list: Path, clip_checkpoint: Path) -> Path:
    """A small download + process run in which both stages fan out as Ray tasks on the running cluster."""
    config = load_config(None, [
        f"root={root}",
        f"download.url_list={url_list}", f"download.samples_per_shard={SAMPLES_PER_SHARD}", "download.image_size=32",
        "download.processes=2", "download.threads=8", "download.timeout_s=2.0", "download.distributor=ray",
        "process.ray_address=auto", f"process.clip_model={TINY_CLIP}", f"process.clip_pretrained={clip_checkpoint}",
        "process.filter=none", "process.caption_policy=web", "process.vocab=demo_shapes", "process.batch_size=16",
    ])
    return save_config(config, folder)


def assert_ingested(root: Path) -> None:
    """Every row is accounted for; the good images sit in raw shards and their CLIP features in feature shards."""
    summary = json.loads((root / SUMMARY_FILENAME).read_text())
    assert summary["input_rows"] == DEMO.num_samples + BROKEN_ROWS
    assert summary["success"] == DEMO.num_samples
    assert summary["failed"] == BROKEN_ROWS
    tars = sorted((root / "raw").glob("*.tar"))
    assert len(tars) == -(-summary["input_rows"] // SAMPLES_PER_SHARD)
    keys = [sample["__key__"] for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False)]
    assert len(keys) == DEMO.num_samples

    processed = json.loads((root / "features" / "process_summary.json").read_text())
    assert processed["shards_done"] == len(tars) and not processed["shards_failed"]
    assert processed["raw_samples"] == processed["written"] == DEMO.num_samples  # filter off: every image kept
    features = list(iterate_feature_shards([str(p) for p in sorted((root / "features").glob("*.tar"))]))
    assert sorted(f.key for f in features) == sorted(keys)
    norms = [float(np.linalg.norm(f.image_embedding.astype(np.float32))) for f in features]
    assert min(norms) > 0.99 and max(norms) < 1.01


@pytest.mark.slow
def test_ray_job_submit_runs_ingestion_and_reports_failure(ray_head, demo_source, tiny_clip, tmp_path):
    """`ray job submit -- python -m data_ingest.run --stage all` on a running head; a bad config fails the job."""
    root = tmp_path / "root"
    config = write_ingest_config(tmp_path, root, demo_source, tiny_clip)

    done = ray_head.job_submit(["python", "-m", "data_ingest.run", "--config", str(config), "--stage", "all"],
                               working_dir=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ingestion summary: {DEMO.num_samples + BROKEN_ROWS} rows in" in done.stdout
    assert f"[process] samples in {DEMO.num_samples} = written {DEMO.num_samples}" in done.stdout
    gcs_port = ray_head.gcs_address.rsplit(":", 1)[1]
    assert "Connecting to existing Ray cluster" in done.stdout and f":{gcs_port}" in done.stdout  # not a private Ray
    assert_ingested(root)

    missing = tmp_path / "missing.yaml"
    failed = ray_head.job_submit(["python", "-m", "data_ingest.run", "--config", str(missing)], working_dir=REPO)
    assert failed.returncode != 0
    assert f"error: config file {missing} does not exist" in failed.stdout
    assert "failed" in (failed.stdout + failed.stderr).lower()


# The environment running these tests, wherever it lives (not necessarily <repo>/.venv).
ENV_BIN = Path(sys.executable).parent


def render_local_cluster(ssh, cluster_name: str, ports: list[int]) -> dict:
    """configs/ray/local.yaml, pointed at this checkout, this interpreter's environment, the fixture's SSH key and free ports."""
    cluster = yaml.safe_load(LOCAL_CLUSTER_FILE.read_text())
    cluster["cluster_name"] = cluster_name
    cluster["auth"] = {"ssh_user": ssh.user, "ssh_private_key": str(ssh.private_key)}

    def localize(command: str) -> str:
        if not (ENV_BIN / "activate").is_file():  # not a venv (e.g. a conda or system interpreter): PATH does it
            command = command.replace("source ~/vlpdist/.venv/bin/activate", f"export PATH={ENV_BIN}:$PATH")
        return command.replace("~/vlpdist/.venv/bin", str(ENV_BIN)).replace("~/vlpdist", str(REPO))

    command_keys = ("initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands")
    for key in command_keys:
        cluster[key] = [localize(command) for command in cluster[key]]
        assert not any("~/vlpdist" in command for command in cluster[key]), cluster[key]
    # Later flags win with Ray's CLI (click): the head keeps the file's command, on free ports.
    cluster["head_start_ray_commands"] = [
        f"{command} {' '.join(ray_start_port_flags(ports))}" if "ray start --head" in command else command
        for command in cluster["head_start_ray_commands"]
    ]
    return cluster


def remove_launcher_state(cluster_name: str, config_caches_before: set[Path]) -> None:
    """What the cluster launcher leaves under /tmp: the local provider's state, config caches, SSH control sockets."""
    import getpass
    import hashlib

    for suffix in (".state", ".lock"):
        Path(f"/tmp/ray/cluster-{cluster_name}{suffix}").unlink(missing_ok=True)
    for cache in set(Path(tempfile.gettempdir()).glob("ray-config-*")) - config_caches_before:
        cache.unlink(missing_ok=True)
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    cluster_hash = hashlib.sha256(cluster_name.encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
    try:
        os.rmdir(f"/tmp/ray_ssh_{user_hash}")  # only when no other cluster's sockets are in it
    except OSError:
        pass


def run_ray_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, *args], env=ray_env(), capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_ray_up_submit_down_with_the_local_cluster_file(loopback_sshd, demo_source, tiny_clip, tmp_path):
    """configs/ray/local.yaml for real over loopback SSH: `ray up`, `ray submit data_ingest/run.py`, `ray down`.

    `ray up` and `ray down` run `ray stop` on the head, which stops every Ray process it can see:
    the fixture's sshd runs in a PID namespace (and with a /tmp/ray) of its own, so it sees only this cluster.
    """
    cluster_name = f"vlpdist-test-{os.getpid()}"
    ports = free_ports_for_servers(RAY_START_PORTS)
    gcs_port, dashboard_port = ports[0], ports[1]
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(render_local_cluster(loopback_sshd, cluster_name, ports)))
    root = tmp_path / "root"
    config = write_ingest_config(tmp_path, root, demo_source, tiny_clip)
    loopback_sshd.submitted_scripts.append("run.py")
    config_caches_before = set(Path(tempfile.gettempdir()).glob("ray-config-*"))
    try:
        up = run_ray_cli("up", "-y", "--no-config-cache", str(cluster_file))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert port_is_open(gcs_port)
        assert list(loopback_sshd.ray_dir.glob("session_*")), "the head did not start behind the fixture's sshd"

        script = str(REPO / "data_ingest" / "run.py")
        submitted = run_ray_cli("submit", str(cluster_file), script, "--", "--config", str(config), "--stage", "all")
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        output = submitted.stdout + submitted.stderr
        assert "Connecting to existing Ray cluster" in output and f":{gcs_port}" in output  # ran on the cluster
        assert_ingested(root)

        down = run_ray_cli("down", "-y", str(cluster_file))
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert not port_is_open(gcs_port) and not port_is_open(dashboard_port)
    finally:
        # What is left of the head goes with the fixture's namespace, its session folders with its /tmp/ray.
        remove_launcher_state(cluster_name, config_caches_before)
