"""A loopback HTTP server for the demo images and every kind of broken URL a crawler meets.

Bound to 127.0.0.1 on an ephemeral port; runs in a background thread; keeps an access log so
tests can see exactly which URLs a stage requested. `flaky_paths` fail with 503 on their first
request and succeed afterwards, which is how `--retry-failed` is exercised for real.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

HTML_BODY = b"<!doctype html><html><head><title>Not here</title></head><body>moved</body></html>"


class DemoImageServer:
    """Serve `images` (URL path -> JPEG bytes) and the broken kinds named by `broken` (path -> kind)."""

    def __init__(
        self,
        images: dict[str, bytes],
        broken: dict[str, str] | None = None,
        slow_response_s: float = 4.0,
        flaky_paths: Iterable[str] = (),
        host: str = "127.0.0.1",
    ):
        self.images = dict(images)
        self.broken = dict(broken or {})
        self.slow_response_s = slow_response_s
        self.flaky_remaining = {path: 1 for path in flaky_paths}
        self.access_log: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def requested_paths(self) -> list[str]:
        with self._lock:
            return list(self.access_log)

    def clear_log(self) -> None:
        with self._lock:
            self.access_log.clear()

    def start(self) -> "DemoImageServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "DemoImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _respond(self, path: str) -> tuple[int, str, bytes, float]:
        """(status, content type, body, delay before answering) for one request path."""
        with self._lock:
            self.access_log.append(path)
            flaky = self.flaky_remaining.get(path, 0) > 0
            if flaky:
                self.flaky_remaining[path] -= 1
        if flaky:
            return 503, "text/plain", b"try again later", 0.0
        if path in self.images:
            return 200, "image/jpeg", self.images[path], 0.0
        kind = self.broken.get(path)
        if kind == "http_500":
            return 500, "text/plain", b"internal error", 0.0
        if kind == "html":
            return 200, "text/html; charset=utf-8", HTML_BODY, 0.0
        if kind == "truncated":
            # A JPEG cut right after its header: the decoder cannot recover any pixels.
            some_image = next(iter(self.images.values()), b"\xff\xd8\xff\xe0")
            return 200, "image/jpeg", some_image[:120], 0.0
        if kind == "empty":
            return 200, "image/jpeg", b"", 0.0
        if kind == "slow":
            some_image = next(iter(self.images.values()), b"")
            return 200, "image/jpeg", some_image, self.slow_response_s
        return 404, "text/plain", b"not found", 0.0

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server naming)
                status, content_type, body, delay = server._respond(self.path.lstrip("/"))
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): nothing to answer

            def log_message(self, *args):  # keep the terminal for progress, not access lines
                pass

        return Handler
