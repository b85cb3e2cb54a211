"""What every sandbox server shares: an HTTP/1.1 server (127.0.0.1 and a port
the OS picks, unless told otherwise) served from a daemon thread, started and
stopped as a context manager. A server subclasses LoopbackServer and answers
`respond(method, path, headers, body)` with a Reply."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

MAX_BODY = 1 << 20


@dataclass
class Reply:
    """One HTTP answer, written `delay` seconds after it was computed."""

    status: int
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: Any  # the LoopbackServer that owns this socket

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Disconnected clients are normal (a caller's timeout); errors of the
        # server's own logic are caught and recorded by its dispatch instead.
        pass


class Handler(BaseHTTPRequestHandler):
    sys_version = ""
    # Like the providers: HTTP/1.1, so clients keep their connections alive
    # (every answer carries its Content-Length), and each answer leaves at
    # once rather than behind Nagle's algorithm.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY)) if length > 0 else b""
        if length > MAX_BODY:
            self.close_connection = True  # the rest of that body is never read
        reply = self.server.fake.respond(self.command, self.path, dict(self.headers.items()), body)
        if reply.delay > 0:
            time.sleep(reply.delay)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Length", str(len(reply.payload)))
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(reply.payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LoopbackServer:
    handler: type[BaseHTTPRequestHandler] = Handler
    thread_name = "sandbox-http"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.RLock()
        self._address = (host, port)
        self._server: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        raise NotImplementedError

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            server = LoopbackHTTPServer(self._address, self.handler)
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
        # Served on every interface: this machine reaches it on loopback.
        host = "127.0.0.1" if self._address[0] in ("", "0.0.0.0") else self._address[0]
        return f"http://{host}:{self.port}"
