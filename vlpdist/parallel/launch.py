"""Launch a training script on this machine's ranks with DeepSpeed's launcher.

`deepspeed --num_gpus N` starts N processes (GPUs, or CPU processes on gloo when there is no GPU)
and kills the others when one exits with an error, so a dead rank ends the whole launch.
The script is the caller's (`launcher.paths.TRAIN_SCRIPT`): the library knows no entry point.

Rendezvous ports are picked below the kernel's ephemeral range: a port found free there cannot be
handed meanwhile to an outgoing connection or a `bind(0)`, so it is still free when rank 0 binds it
(a fixed 29500 fails as soon as two runs share a machine).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

UNASSIGNED_PORTS_FROM = 20000
"""Lowest rendezvous port picked: above Ray's default worker ports (10002-19999)."""


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned ports (`bind` to port 0, the source port of `connect`)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_server_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` now, for servers that bind them later (seconds or minutes).

    They lie between UNASSIGNED_PORTS_FROM and the ephemeral range, so only a server asking for
    that very port can take one first. Each is probed with a plain `bind` (no SO_REUSEADDR, so a
    port still in TIME_WAIT counts as taken), all held together so that they differ. With an
    unusual ip_local_port_range that leaves too few below it, the ports above it are used.
    """
    low, high = ephemeral_port_range()
    candidates = list(range(UNASSIGNED_PORTS_FROM, low))
    if len(candidates) < 16 * count:
        candidates = list(range(high + 1, 65536))
    random.SystemRandom().shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"fewer than {count} free ports on {host} outside the ephemeral range {low}-{high}")
    finally:
        for sock in sockets:
            sock.close()


def deepspeed_train_command(train_script: str | Path, config_path: str | Path, overrides: list[str], num_procs: int,
                            master_port: int | None = None, extra_args: list[str] = ()) -> list[str]:
    """The `deepspeed --num_gpus N <train_script> --config ... key=value ...` command line
    (rendezvous on `master_port`, default a free one outside the ephemeral range)."""
    if master_port is None:
        master_port = free_server_ports(1)[0]
    # The deepspeed launcher beside this interpreter, so the ranks run in the same environment.
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(master_port),
        str(train_script), "--config", str(config_path), *extra_args, *overrides,
    ]


def run_deepspeed(train_script: str | Path, config_path: str | Path, overrides: list[str] = (), num_procs: int = 2,
                  master_port: int | None = None, cwd: str | Path | None = None) -> int:
    """Run `train_script` on `num_procs` local ranks (in `cwd`, default this process's) and return the launcher's exit code."""
    command = deepspeed_train_command(train_script, config_path, list(overrides), num_procs, master_port)
    return subprocess.run(command, cwd=cwd).returncode
