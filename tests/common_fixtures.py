"""Small helpers every kind of test uses: the repository root, free loopback ports, polling.

Standard library only, so that any test module or fixture module can import it cheaply.
"""

from __future__ import annotations

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


def free_ports_for_servers(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now, for servers that bind them later (seconds or
    minutes): outside the kernel's ephemeral range, as the library picks rendezvous ports."""
    from vlpdist.parallel.launch import free_server_ports  # standard library only, like this module

    return free_server_ports(count)


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
