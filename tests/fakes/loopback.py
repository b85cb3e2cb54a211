"""What every fake provider server shares: an HTTP server on 127.0.0.1 (a
port the OS picks) served from a daemon thread, started and stopped as a
context manager. A fake subclasses LoopbackServer and names its handler."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Disconnected clients are normal in timeout tests; bugs in a fake are
        # caught and recorded by the fake's own dispatch instead.
        pass


class LoopbackServer:
    handler: type[BaseHTTPRequestHandler]
    thread_name = "fake-provider"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._server: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            server = LoopbackHTTPServer(("127.0.0.1", 0), self.handler)
            server.fake = self
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=self.thread_name,
                daemon=True,
            )
            self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        with self._lock:
            if self._server is None:
                raise RuntimeError(f"{type(self).__name__} is not started")
            return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
