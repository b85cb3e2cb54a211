"""A fake Twilio-compatible WhatsApp Messages API on 127.0.0.1, for tests.

Serves ``POST /2010-04-01/Accounts/{sid}/Messages.json`` with form fields
``To``, ``From`` and ``Body`` and HTTP basic auth ``sid:token`` (401 in
Twilio's error shape otherwise, 400 without To/Body). A message is answered
201 ``{"sid": "SM…", "status": "queued", …}`` and recorded.

Controls (thread-safe): ``fail_next(n, status)`` answers the next n requests
with ``status``; ``fail_all(status)`` until ``heal()``. ``messages`` lists
what was accepted, ``attempts`` every request that reached the server.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

ACCOUNT_SID = "ACtest0000000000000000000000000000"
AUTH_TOKEN = "whatsapp-test-token"
SENDER = "+14155238886"


@dataclass(frozen=True)
class SentMessage:
    sid: str
    to: str
    sender: str
    body: str


class FakeWhatsApp:
    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN) -> None:
        self.account_sid, self.auth_token = account_sid, auth_token
        self._lock = threading.Lock()
        self._messages: list[SentMessage] = []
        self._attempts = 0
        self._failures: deque[int] = deque()
        self._fail_all: int | None = None
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> FakeWhatsApp:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.fake = self  # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def messages(self) -> list[SentMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def attempts(self) -> int:
        with self._lock:
            return self._attempts

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def fail_all(self, status: int = 503) -> None:
        with self._lock:
            self._fail_all = status

    def heal(self) -> None:
        with self._lock:
            self._failures.clear()
            self._fail_all = None

    def answer(self, path: str, authorization: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._attempts += 1
            failure = self._failures.popleft() if self._failures else self._fail_all
            if failure is not None:
                return failure, _error(failure, "injected failure")
            if path != f"/2010-04-01/Accounts/{self.account_sid}/Messages.json":
                return 404, _error(20404, "The requested resource was not found")
            expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
            if authorization != f"Basic {expected}":
                return 401, _error(20003, "Authenticate")
            if not form.get("To", "").startswith("whatsapp:") or not form.get("Body"):
                return 400, _error(21604, "A 'To' phone number and a 'Body' are required")
            message = SentMessage(
                f"SM{secrets.token_hex(16)}", form["To"], form.get("From", ""), form["Body"]
            )
            self._messages.append(message)
        body = {
            "sid": message.sid,
            "status": "queued",
            "to": message.to,
            "from": message.sender,
            "body": message.body,
        }
        return 201, body


def _error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "status": code if 100 <= code < 600 else 400}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(parse_qsl(self.rfile.read(length).decode()))
        fake: FakeWhatsApp = self.server.fake  # type: ignore[attr-defined]
        status, body = fake.answer(self.path, self.headers.get("Authorization", ""), form)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return None
