"""Ray for the processing-stage tests: a hold inside the shard actors, and a second Ray node to kill.

Import explicitly: `from process_ray_fixtures import ...` (pytest puts tests/ on sys.path).

* The hold lives in test code only: a job-level `worker_process_setup_hook` (a Ray runtime_env
  feature, `hold_runtime_env`, given to `ray.init` by `init_ray_with_hold` or to `ray job submit`)
  runs `install_hold` in every worker of the job. It wraps two functions of `data_ingest.process.shard` in that worker:
  - `_run_shard`: each attempt at a shard writes `<hold dir>/<shard>.<pid>.started`; on an
    `OSError`, if `<hold dir>/<shard>.repair` names a file, that file is moved over the raw shard
    (which the test broke) before the error goes on to the driver, so the next attempt finds it;
    if `<hold dir>/stall_once` exists, the first attempt to claim it (renaming it to
    `<shard>.<pid>.stalled`) blocks until that file is removed, like a read that never returns:
    later attempts run normally;
  - `_process_batch`: before a shard's second batch (its first is in the staging tar), while
    `<hold dir>/hold` exists, the worker writes `<hold dir>/<shard>.<pid>.holding` and waits.
  Workers import this module by name, so tests/ and the repository are put on the PYTHONPATH that
  the Ray processes (and so their workers) inherit.
* `second_ray_node`: `ray start --address <head>` on this machine with its own CPU and a `node2`
  resource, as a second node of a head from `ray_cluster_fixtures.start_ray_head`. It is stopped
  by killing its own process tree (never `ray stop`, never by name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from common_fixtures import REPO, free_ports
from ray_cluster_fixtures import RAY_CLI

HOLD_DIR_ENV = "VLPDIST_TEST_HOLD_DIR"
TESTS = Path(__file__).resolve().parent


def ray_pythonpath() -> str:
    """PYTHONPATH for Ray processes: the repository (the actor class) and tests/ (the setup hook)."""
    return os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))


def hold_runtime_env(hold_dir: Path) -> dict:
    """The job-level runtime_env that runs `install_hold` in every worker of the job."""
    hold_dir.mkdir(parents=True, exist_ok=True)
    return {"worker_process_setup_hook": "process_ray_fixtures.install_hold", "env_vars": {HOLD_DIR_ENV: str(hold_dir)}}


def init_ray_with_hold(hold_dir: Path, monkeypatch, **init_kwargs) -> None:
    """`ray.init(**init_kwargs)` with `install_hold` run in every worker of this job (PYTHONPATH set
    through `monkeypatch`, so that it is put back after the test)."""
    import ray

    monkeypatch.setenv("PYTHONPATH", ray_pythonpath())
    ray.init(runtime_env=hold_runtime_env(hold_dir), **init_kwargs)


def install_hold() -> None:
    """Ray worker setup hook: wrap `_run_shard` and `_process_batch` as the module docstring says."""
    from data_ingest.process import shard

    folder = Path(os.environ[HOLD_DIR_ENV])
    run_shard, process_batch = shard._run_shard, shard._process_batch
    current = {"shard": "", "batches": 0}

    def announced_run_shard(raw_tar, *args, **kwargs):
        name = Path(raw_tar).name.split(".")[0]
        current.update(shard=name, batches=0)
        (folder / f"{name}.{os.getpid()}.started").write_text(str(os.getpid()))
        stalled = folder / f"{name}.{os.getpid()}.stalled"
        try:
            os.rename(folder / "stall_once", stalled)  # only one attempt can win the rename
        except FileNotFoundError:
            pass
        else:
            deadline = time.monotonic() + 300
            while stalled.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            return run_shard(raw_tar, *args, **kwargs)
        except OSError:
            repair = folder / f"{name}.repair"
            if repair.exists():
                good_copy = Path(repair.read_text())
                broken = Path(raw_tar)
                if broken.is_dir() and not broken.is_symlink():
                    broken.rmdir()
                else:
                    broken.unlink()
                os.replace(good_copy, broken)
                repair.unlink()
            raise

    def holding_process_batch(*args, **kwargs):
        current["batches"] += 1
        if current["batches"] == 2 and (folder / "hold").exists():
            (folder / f"{current['shard']}.{os.getpid()}.holding").touch()
            deadline = time.monotonic() + 180
            while (folder / "hold").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return process_batch(*args, **kwargs)

    shard._run_shard = announced_run_shard
    shard._process_batch = holding_process_batch


def clear_hold_dir(hold_dir: Path) -> Path:
    """Empty the hold folder (the job's workers keep its path), so that a test sees only its own attempts."""
    for path in hold_dir.iterdir():
        path.unlink()
    return hold_dir


def attempts(hold_dir: Path, shard_name: str) -> list[int]:
    """Pids of the processes that started an attempt at `shard_name` (one file per process)."""
    return sorted(int(path.read_text()) for path in hold_dir.glob(f"{shard_name}.*.started"))


def holding(hold_dir: Path) -> dict[int, str]:
    """pid -> shard, for each worker waiting in the hold."""
    return {int(path.name.split(".")[1]): path.name.split(".")[0] for path in hold_dir.glob("*.holding")}


def process_tree(pid: int) -> list:
    """The process `pid` and all its descendants (psutil processes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(processes: list) -> None:
    """SIGKILL these processes and wait until they are gone."""
    import psutil

    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def alive_nodes(dashboard_url: str, token: str) -> list[dict]:
    """The alive nodes of a cluster, from its dashboard's state API (each with `resources_total`)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?detail=1&limit=100",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["result"]["result"]
    return [node for node in nodes if node["state"] == "ALIVE"]


def start_second_node(gcs_address: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`ray start --address <gcs> --block` with 1 CPU and a `node2` resource, on free ports."""
    node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env = free_ports(6)
    command = [
        RAY_CLI, "start", f"--address={gcs_address}", "--block",
        "--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"node2": 1}', "--disable-usage-stats",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
    ]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
