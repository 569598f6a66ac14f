"""A real single-node Slurm (munged + slurmctld + slurmd) for tests, on loopback, in temp folders.

Needs Debian's `slurmctld slurmd slurm-client munge` (Slurm 22.05) and root. What it takes to run
one on a single machine, all of it done here:

* apt does not start the services: this module starts every daemon itself, in the foreground, as
  its own child processes, and stops exactly those (never a daemon it did not start).
* munged refuses to run as root: it runs as the `munge` user, with its own key, socket and seed in
  a private folder (`AuthInfo=socket=...`), so that it never shares a munged with anything else.
* Every client and daemon reads the generated config through `SLURM_CONF`.
* The node declares 8 fake GPUs, so that sbatch scripts written for GPU nodes (`--gres=gpu:8`)
  are accepted unchanged: `GresTypes=gpu`, `Gres=gpu:8` on the node, and a gres.conf whose
  `File=` are character devices (plain files, or no `File=`, make the node INVAL).
* `--nodes=2` can never run on one node: tests override it with `sbatch --nodes=1`.
* `sbatch --wait` polls slowly (up to 32 s apart): tests poll `scontrol show job` instead.
* A requeued job is held (Reason=BeginTime) until the credentials of its previous run have
  expired: `AuthInfo=cred_expire` + 1 s. slurmd refuses ("Job credential revoked") any launch of
  the job whose credential is not strictly newer, in whole seconds, than the revocation of the
  previous run, so moving the begin time forward (`scontrol update StartTime=now`) can kill the
  rerun. This config shortens the hold instead (`cred_expire`, minimum 5 s), and has the
  schedulers look every second or two (`sched_interval=2,bf_interval=1`; defaults 60 s and
  30 s) so that the job starts soon after its begin time has passed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common_fixtures import free_ports_for_servers, wait_for

SLURM_PACKAGES = "slurmctld slurmd slurm-client munge"
MUNGED = "/usr/sbin/munged"

CRED_EXPIRE_S = 15
"""Job credential lifetime, and so how long a requeued job waits before it can start again
(CRED_EXPIRE_S + 1 s). Slurm's default is 120 s; a step launch must reach slurmd within it."""

KILL_WAIT_S = 120
"""Seconds between scancel's SIGTERM and its SIGKILL (Slurm's default is 30): a training job's ranks
finish their step and write their checkpoint in between, on a machine busy with other work too."""

FINAL_JOB_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "SPECIAL_EXIT",
}


def slurm_missing() -> str | None:
    """Why a local Slurm cannot be started here, or None."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "munged", "munge"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not installed (apt-get install -y --no-install-recommends {SLURM_PACKAGES})"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


@dataclass
class LocalSlurm:
    folder: Path
    env: dict[str, str]
    munge_folder: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    """What this handle started (munged, slurmctld, slurmd), in start order; stopped in reverse."""

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=True, **kwargs)

    def show_job(self, job_id: str) -> dict[str, str]:
        """The `Key=Value` fields of `scontrol show job` (JobState, Reason, Restarts, ExitCode, ...)."""
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=self.env, capture_output=True, text=True).stdout
        return dict(token.split("=", 1) for token in shown.split() if "=" in token)

    def job_field(self, job_id: str, name: str) -> str:
        """One `Key=Value` field of `scontrol show job` (e.g. JobState, Restarts, ExitCode)."""
        return self.show_job(job_id).get(name, "")

    def node_state(self) -> str:
        shown = subprocess.run(["scontrol", "show", "node", "localhost"], env=self.env, capture_output=True, text=True).stdout
        return next((token.split("=", 1)[1] for token in shown.split() if token.startswith("State=")), "")

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of the slurmctld and slurmd logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.is_file():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def wait_for_job(self, job_id: str, condition, timeout_s: float, what: str, log_path: Path | None = None) -> dict:
        """Poll the job until `condition(fields)` holds; fail at once (with the logs) if the job ends otherwise.

        A job that reached a final state, or was held after a failed launch, will never satisfy a
        condition it does not satisfy already: waiting out the timeout would only hide why.
        """
        seen: dict[str, str] = {}

        def reached() -> bool:
            seen.clear()
            seen.update(self.show_job(job_id))
            if condition(seen):
                return True
            state, reason = seen.get("JobState", ""), seen.get("Reason", "")
            if state in FINAL_JOB_STATES or "held" in reason.lower():
                job_log = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
                raise AssertionError(
                    f"job {job_id} ended as {state} (Reason={reason}, ExitCode={seen.get('ExitCode')}) "
                    f"while waiting for {what}\n{job_log}\n{self.logs_tail()}"
                )
            return False

        wait_for(reached, timeout_s, what, log_path)
        return dict(seen)

    def cancel_all_jobs(self, timeout_s: float = 90) -> None:
        """End every job of this cluster (only this controller's) and wait until none is left."""

        def queue_empty() -> bool:
            listed = subprocess.run(["squeue", "--noheader", "--all", "--format=%i"], env=self.env,
                                    capture_output=True, text=True)
            job_ids = listed.stdout.split()
            if listed.returncode != 0 or not job_ids:  # no answer: the controller is gone
                return True
            subprocess.run(["scancel", "--quiet", *job_ids], env=self.env, capture_output=True)
            return False

        try:
            wait_for(queue_empty, timeout_s, "this cluster's jobs to end")
        except TimeoutError:
            pass  # stop_local_slurm still ends whatever this cluster left running

    def leftover_processes(self) -> list:
        """Processes started by this cluster's daemons that outlived them (job steps, their tasks).

        slurmstepd makes a session of its own, so they are found by what they inherit from
        slurmd: this cluster's own SLURM_CONF, a path no other cluster on the machine has.
        """
        import psutil

        config = self.env["SLURM_CONF"]
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == config:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found


def _start_munged(folder: Path) -> subprocess.Popen:
    """A private munged (as the munge user, which it requires) with its own key and socket in `folder`."""
    shutil.chown(folder, "munge", "munge")
    folder.chmod(0o711)  # munged wants its socket folder searchable by every user
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    shutil.chown(key, "munge", "munge")
    socket_path = folder / "munge.socket"
    log = open(folder / "munged.log", "wb")
    process = subprocess.Popen(
        ["runuser", "-u", "munge", "--", MUNGED, "--foreground", f"--socket={socket_path}", f"--key-file={key}",
         f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed"],  # --foreground: logs to stderr
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"munged exited with {process.returncode}: {(folder / 'munged.log').read_text()[-2000:]}")
        return subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True).returncode == 0

    try:
        wait_for(answering, 20, "munged", folder / "munged.log")
    except BaseException:
        _stop(process)
        raise
    return process


def _write_config(folder: Path, munge_socket: Path, cpus: int, memory_mb: int) -> Path:
    devices = folder / "dev"
    devices.mkdir()
    for index in range(8):
        os.mknod(devices / f"fakegpu{index}", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
    (folder / "gres.conf").write_text(f"Name=gpu File={devices}/fakegpu[0-7]\n")
    config = folder / "slurm.conf"
    slurmctld_port, slurmd_port = free_ports_for_servers(2)
    config.write_text(
        f"""ClusterName=vlpdist-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
SlurmctldPort={slurmctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait={KILL_WAIT_S}
"""
    )
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    return config


def _start_daemon(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A Slurm daemon in the foreground (-D), as a child of this process, in its own session."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen, grace_s: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_local_slurm(folder: Path, cpus: int = 16, memory_mb: int = 4000) -> LocalSlurm:
    """Start a private munged, slurmctld and slurmd; `stop_local_slurm` stops them (and only them)."""
    # munged runs as `munge`, which cannot enter pytest's root-only temp folders: a folder of its own.
    munge_folder = Path(tempfile.mkdtemp(prefix="vlpmunge", dir="/tmp"))
    config = _write_config(folder, munge_folder / "munge.socket", cpus, memory_mb)
    env = {**os.environ, "SLURM_CONF": str(config)}
    slurm = LocalSlurm(folder, env, munge_folder)

    def node_idle() -> bool:
        for process in slurm.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}\n{slurm.logs_tail()}")
        return slurm.node_state() == "IDLE"

    try:
        slurm.processes.append(_start_munged(munge_folder))
        slurm.processes.append(_start_daemon(["/usr/sbin/slurmctld", "-D", "-f", str(config)], env, folder / "slurmctld.out"))
        slurm.processes.append(
            _start_daemon(["/usr/sbin/slurmd", "-D", "-f", str(config), "-N", "localhost"], env, folder / "slurmd.out")
        )
        wait_for(node_idle, 60, "the Slurm node", folder / "slurmd.log")
    except BaseException:
        stop_local_slurm(slurm)  # only what this call started
        raise
    return slurm


def stop_local_slurm(slurm: LocalSlurm) -> None:
    """End this cluster's jobs, stop slurmd, slurmctld and munged, then anything their jobs left behind."""
    import psutil

    daemons_up = len(slurm.processes) == 3 and all(p.poll() is None for p in slurm.processes)
    if daemons_up:
        slurm.cancel_all_jobs()
    for process in reversed(slurm.processes):
        _stop(process)
    slurm.processes.clear()
    leftovers = slurm.leftover_processes()
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(slurm.munge_folder, ignore_errors=True)
