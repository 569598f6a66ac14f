"""Real Ray clusters on loopback for the tests: a `ray start --head`, and a private sshd for `ray up`.

Import the fixtures explicitly in a test module: `from ray_cluster_fixtures import ray_head, loopback_sshd`
(pytest puts tests/ on sys.path; `tests.` would find a stray `tests` package some wheels install).

* `ray_head`: `ray start --head --block` on 127.0.0.1 with free ports and its own `--temp-dir`,
  so that no other `ray.init()` on this machine connects to it by accident (Ray finds "the
  latest cluster" through `<temp dir>/ray_current_cluster`). It runs in a session of its own
  (`start_new_session`); stopping it signals the blocking `ray start`, then ends whatever is left
  in *that session* (every process it started, however deep: Ray's workers change their process
  group but not their session). Never `ray stop`, which stops every Ray process on the machine.
* `loopback_sshd`: a private `sshd` on 127.0.0.1:22 (the cluster launcher has no port option)
  with its host key and one authorized key in a temp folder; `ray up` with the `local` provider
  logs in with that key. The sshd runs as init of a PID namespace of its own, with a private
  `/tmp/ray` mounted over the machine's: everything started over its logins (the launcher's
  `ray stop` and `ray start`, submitted drivers) sees only the processes and Ray state of that
  namespace, so the `ray stop` that `ray up` and `ray down` run cannot stop anyone else's Ray,
  and stopping the sshd ends every process left in it. It also puts back what the cluster
  launcher leaves in the SSH user's home: `~/ray_bootstrap_*`, submitted scripts, `~/.bashrc` edits.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from common_fixtures import free_ports_for_servers, port_is_open

VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")
SSHD = "/usr/sbin/sshd"


def ray_env(auth_token_path: Path | None = None) -> dict[str, str]:
    """The environment for Ray CLIs in tests: no usage reporting, the venv first on PATH.

    With `auth_token_path`, Ray's token authentication is on with that token (head, job CLI and
    drivers alike). Without it Ray decides, and it turns token auth on whenever
    `~/.ray/auth_token` exists (any earlier local `ray.init()` writes one): fine for the launcher's
    CLIs, which share that file with the cluster they start on this machine.
    """
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    if auth_token_path is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth_token_path))
    return env


def ray_start_port_flags(ports: list[int]) -> list[str]:
    """Every port a Ray head opens, pinned to free ones, so that parallel clusters never collide."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = ports[:9]
    return [
        f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
    ]


RAY_START_PORTS = 9


def session_members(leader_pid: int) -> list:
    """The live processes of the session that `leader_pid` leads, other than the leader (psutil.Process).

    Only processes started by the leader (or by those, however deep, re-parented or not) can be
    in its session, unless one of them made a session of its own.
    """
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != leader_pid and os.getsid(proc.pid) == leader_pid:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return members


def _has_exited(process: subprocess.Popen) -> bool:
    """Whether `process` has ended, without reaping it: while it is unreaped its pid (and so its
    session id) cannot be handed to another process."""
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_session(leader: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM `leader` (started with `start_new_session=True`) and wait; then SIGTERM, and after
    a grace period SIGKILL, whatever is left of its session; reap the leader last."""
    import psutil

    if not _has_exited(leader):
        leader.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not _has_exited(leader) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _has_exited(leader):
            leader.kill()
            while not _has_exited(leader):
                time.sleep(0.1)
    leftovers = session_members(leader.pid)
    for proc in leftovers:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    leader.wait()


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, token: str = "") -> None:
    """Wait until `url` answers 200 (sending `token` as a bearer token when given)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and _has_exited(process):
            raise RuntimeError(f"{process.args[0]} exited before {url} answered")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as err:
            last_error = str(err)
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s ({last_error})")


@dataclass
class RayHead:
    """A running single-node Ray cluster started with `ray start --head`."""

    gcs_address: str
    """host:port of the GCS: what `ray.init(address=...)` and `ray start --address` take."""
    dashboard_url: str
    """http://127.0.0.1:<port>: what `ray job submit --address` takes."""
    temp_dir: Path
    auth_token_path: Path
    """Ray token authentication is on; this file holds the token (the job CLI reads it too)."""

    def job_submit(self, entrypoint: list[str], working_dir: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir` (waits for the job; its exit code says whether the job succeeded)."""
        return subprocess.run(
            [RAY_CLI, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir), "--", *entrypoint],
            env=ray_env(self.auth_token_path), capture_output=True, text=True, timeout=timeout_s,
        )


def start_ray_head(num_cpus: int = 2, timeout_s: float = 120) -> tuple[RayHead, subprocess.Popen]:
    # Short path under /tmp: Ray's unix sockets live in the temp dir and sockets have a ~107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="vlpray", dir="/tmp"))
    ports = free_ports_for_servers(RAY_START_PORTS)
    log_path = temp_dir / "ray_start.log"
    auth_token_path = temp_dir / "auth_token"
    auth_token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    auth_token_path.chmod(0o600)
    command = [
        RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", *ray_start_port_flags(ports),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=ray_env(auth_token_path), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = RayHead(f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", temp_dir, auth_token_path)
    try:
        wait_for_http(f"{head.dashboard_url}/api/version", timeout_s, process, token=auth_token_path.read_text())
    except (RuntimeError, TimeoutError) as err:
        log_tail = log_path.read_text(errors="replace")[-3000:]
        stop_ray_head(head, process)
        raise RuntimeError(f"ray start --head failed: {err}\n{log_tail}") from None
    return head, process


def stop_ray_head(head: RayHead, process: subprocess.Popen) -> None:
    """Stop the blocking `ray start` and every process of its session (only those), then remove its temp dir."""
    stop_session(process)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    """A real single-node Ray head on loopback for one test; stopped (only it) afterwards."""
    head, process = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(head, process)


@dataclass
class LoopbackSSH:
    """A private sshd on 127.0.0.1:22 and the key that logs into it as the current user."""

    user: str
    private_key: Path
    home: Path
    ray_dir: Path
    """What the logins see as /tmp/ray (Ray's default temp dir: session folders, `ray_current_cluster`)."""
    submitted_scripts: list[str] = field(default_factory=list)
    """File names `ray submit` copies into the home folder; the fixture removes them afterwards."""

    def run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-i", str(self.private_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{self.user}@127.0.0.1", command],
            capture_output=True, text=True, timeout=30,
        )


SSHD_CONFIG = """\
Port 22
ListenAddress 127.0.0.1
HostKey {folder}/host_ed25519
AuthorizedKeysFile {folder}/authorized_keys
PidFile {folder}/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
"""

RAY_DEFAULT_TEMP_DIR = Path("/tmp/ray")
# init of a new PID namespace (with its own /proc) and mount namespace; SIGKILLed if unshare dies.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--propagation", "private", "--"]


def _namespaces_unavailable_reason() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    probe = subprocess.run([*UNSHARE, "mount", "--bind", "/tmp", "/tmp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make PID and mount namespaces here ({probe.stderr.strip()[-200:]})"
    return None


def _sshd_unavailable_reason() -> str | None:
    if not Path(SSHD).exists():
        return "openssh-server is not installed (apt-get install openssh-server rsync); CI installs it"
    if shutil.which("rsync") is None or shutil.which("ssh") is None:
        return "rsync or the ssh client is missing (apt-get install openssh-server rsync); CI installs them"
    if os.geteuid() != 0:
        return "a private sshd on port 22 (the only port Ray's cluster launcher uses) needs root"
    if port_is_open(22):
        return "port 22 on 127.0.0.1 is already taken by another sshd"
    reason = _namespaces_unavailable_reason()
    if reason:
        # Without them the launcher's `ray stop` would stop every Ray process on this machine.
        return f"the sshd for `ray up` runs in its own PID namespace, and {reason}"
    return None


# What the cluster launcher writes into the SSH user's home (besides submitted scripts).
RAY_LAUNCHER_HOME_FILES = ("ray_bootstrap_config.yaml", "ray_bootstrap_key.pem")


def _restore_home(ssh: "LoopbackSSH", existed_before: set[str], bashrc_before: bytes | None) -> None:
    """Remove the launcher's files and the submitted scripts that were not there before; restore ~/.bashrc."""
    for name in (*RAY_LAUNCHER_HOME_FILES, *ssh.submitted_scripts):
        if name not in existed_before:
            (ssh.home / name).unlink(missing_ok=True)
    bashrc = ssh.home / ".bashrc"
    if bashrc_before is None:
        bashrc.unlink(missing_ok=True)
    else:
        bashrc.write_bytes(bashrc_before)


def _stop_namespace(unshare: subprocess.Popen) -> None:
    """End the sshd (init of the namespace): the kernel then kills every process left in the namespace."""
    import psutil

    try:
        inits = psutil.Process(unshare.pid).children()
    except psutil.NoSuchProcess:
        inits = []
    for init in inits:
        try:
            init.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        unshare.wait(timeout=15)  # returns once its child, the namespace's init, has ended
    except subprocess.TimeoutExpired:
        unshare.kill()  # --kill-child: the namespace's init gets SIGKILL
        unshare.wait(timeout=10)


@pytest.fixture
def loopback_sshd():
    """A private sshd on 127.0.0.1:22 for `ray up` with the local provider, in PID and mount namespaces
    of its own (see the module docstring); its processes are ended and the home folder put back after."""
    reason = _sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import getpass

    folder = Path(tempfile.mkdtemp(prefix="vlpssh", dir="/tmp"))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_ed25519")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "client_ed25519")], check=True)
    shutil.copy(folder / "client_ed25519.pub", folder / "authorized_keys")
    (folder / "sshd_config").write_text(SSHD_CONFIG.format(folder=folder))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    ray_dir = folder / "ray"
    ray_dir.mkdir()
    ray_dir.chmod(0o777)  # as Ray makes /tmp/ray
    made_mount_point = not RAY_DEFAULT_TEMP_DIR.exists()
    RAY_DEFAULT_TEMP_DIR.mkdir(mode=0o777, exist_ok=True)

    home = Path.home()
    bashrc = home / ".bashrc"
    bashrc_before = bashrc.read_bytes() if bashrc.exists() else None
    existed_before = {p.name for p in home.iterdir()}
    log = open(folder / "sshd.log", "wb")
    in_namespace = f"mount --bind {shlex.quote(str(ray_dir))} {RAY_DEFAULT_TEMP_DIR} && exec {SSHD} -D -e -f {shlex.quote(str(folder / 'sshd_config'))}"
    sshd = subprocess.Popen([*UNSHARE, "sh", "-c", in_namespace], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ssh = LoopbackSSH(getpass.getuser(), folder / "client_ed25519", home, ray_dir)
    try:
        deadline = time.monotonic() + 15
        while ssh.run("true").returncode != 0:
            if sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private sshd did not accept the key: {(folder / 'sshd.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield ssh
    finally:
        _stop_namespace(sshd)
        log.close()
        _restore_home(ssh, existed_before, bashrc_before)
        shutil.rmtree(folder, ignore_errors=True)
        if made_mount_point:
            try:
                RAY_DEFAULT_TEMP_DIR.rmdir()  # only if nothing else has written into it since
            except OSError:
                pass
