"""Small helpers every kind of test uses: the repository root, free loopback ports, polling.

Standard library only, so that any test module or fixture module can import it cheaply.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned ports (`bind` to port 0, the source port of `connect`)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


# Below the kernel's ephemeral range, above Ray's default worker ports (10002-19999).
UNASSIGNED_PORTS_FROM = 20000


def free_ports_for_servers(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now, for servers that bind them later (seconds or minutes).

    Unlike `free_ports`, they lie outside the kernel's ephemeral range: no process on this machine
    can be handed one of them by `bind(0)` or as the source port of an outgoing connection
    between now and the moment the caller's server binds it. Only a server that asks for that
    very port can take it first. Each is probed with a plain `bind` (no SO_REUSEADDR, so a port
    still in TIME_WAIT counts as taken), all held together so that they differ.
    """
    low, _ = ephemeral_port_range()
    candidates = list(range(UNASSIGNED_PORTS_FROM, low))
    if len(candidates) < 16 * count:  # an unusual ip_local_port_range: fall back to what the kernel hands out
        return free_ports(count)
    random.SystemRandom().shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"fewer than {count} free ports in {UNASSIGNED_PORTS_FROM}-{low - 1}")
    finally:
        for sock in sockets:
            sock.close()


def port_is_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, log_path: Path | None = None) -> None:
    """Poll `predicate` until it holds; on timeout raise TimeoutError naming `what`, with the tail of `log_path`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    log = log_path.read_text(errors="replace")[-4000:] if log_path is not None and log_path.exists() else ""
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}\n{log}".rstrip())
