"""A real single-node Slurm (munged + slurmctld + slurmd) for tests, on loopback, in a temp folder.

Needs Debian's `slurmctld slurmd slurm-client munge` and root (munged runs as the `munge` user).
The node declares 8 fake GPUs (character devices, as slurmd requires) so that sbatch scripts
written for GPU nodes (`--gres=gpu:8`) are accepted unchanged. See /work/shared/notes/local-cluster.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common_fixtures import free_ports, wait_for

SLURM_PACKAGES = "slurmctld slurmd slurm-client munge"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def slurm_missing() -> str | None:
    """Why a local Slurm cannot be started here, or None."""
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not installed (apt-get install -y --no-install-recommends {SLURM_PACKAGES})"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    return None


@dataclass
class LocalSlurm:
    folder: Path
    env: dict[str, str]

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=True, **kwargs)

    def job_field(self, job_id: str, name: str) -> str:
        """One `Key=Value` field of `scontrol show job` (e.g. JobState, Restarts, ExitCode)."""
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=self.env, capture_output=True, text=True).stdout
        for token in shown.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return ""


def _start_munged() -> subprocess.Popen | None:
    """munged as the munge user (it refuses root); None when one is already answering."""
    if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return None
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    process = subprocess.Popen(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground"])
    wait_for(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 20, "munged")
    return process


def _write_config(folder: Path, cpus: int, memory_mb: int) -> Path:
    devices = folder / "dev"
    devices.mkdir()
    for index in range(8):
        os.mknod(devices / f"fakegpu{index}", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
    (folder / "gres.conf").write_text(f"Name=gpu File={devices}/fakegpu[0-7]\n")
    config = folder / "slurm.conf"
    slurmctld_port, slurmd_port = free_ports(2)
    config.write_text(
        f"""ClusterName=vlpdist-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
"""
    )
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    return config


def start_local_slurm(folder: Path, cpus: int = 16, memory_mb: int = 4000) -> tuple[LocalSlurm, list]:
    """Start munged (if needed), slurmctld and slurmd; returns the handle and what to stop."""
    config = _write_config(folder, cpus, memory_mb)
    env = {**os.environ, "SLURM_CONF": str(config)}
    munged = _start_munged()
    slurm = LocalSlurm(folder, env)

    def node_idle() -> bool:
        shown = subprocess.run(["scontrol", "show", "node", "localhost"], env=env, capture_output=True, text=True).stdout
        return "State=IDLE" in shown

    try:
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(config)], env=env, check=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(config), "-N", "localhost"], env=env, check=True)
        wait_for(node_idle, 30, "the Slurm node", folder / "slurmd.log")
    except (subprocess.CalledProcessError, TimeoutError):
        stop_local_slurm(slurm, [munged])  # only what this call started
        raise
    return slurm, [munged]


def stop_local_slurm(slurm: LocalSlurm, started: list) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        path = slurm.folder / pid_file
        if path.is_file():
            try:
                os.kill(int(path.read_text().strip()), signal.SIGTERM)
            except ProcessLookupError:
                pass
    for process in started:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
