"""Self-tests for the failure-injection TCP proxy (``tests/support/tcp_proxy.py``)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from .tcp_proxy import TcpProxy

RABBIT = ("127.0.0.1", 5672)


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class EchoServer:
    """Threaded loopback echo server."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="echo-accept", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._clients.append(conn)
            threading.Thread(target=self._echo, args=(conn,), name="echo-conn", daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        for conn in self._clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port) as p:
        yield p


def connect(port: int, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def assert_closed_by_peer(sock: socket.socket, timeout: float = 2.0) -> None:
    """The peer closed: recv sees EOF or a reset (never a timeout)."""
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1024) == b""


def assert_dropped_on_connect(port: int) -> None:
    """The proxy accepts, then closes at once (the reset may already surface in connect)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionResetError:
        return
    with sock:
        assert_closed_by_peer(sock)


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tcp-proxy-")]


# --------------------------------------------------------------------------- basics


def test_bytes_round_trip(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        big = os.urandom(2 * 1024 * 1024)
        assert roundtrip(sock, big) == big
        assert proxy.connections == 1
    assert wait_for(lambda: proxy.connections == 0)


def test_many_concurrent_connections(proxy: TcpProxy) -> None:
    socks = [connect(proxy.port) for _ in range(10)]
    try:
        for i, sock in enumerate(socks):
            assert roundtrip(sock, f"msg-{i}".encode()) == f"msg-{i}".encode()
        assert proxy.connections == 10
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: proxy.connections == 0)


def test_forwards_sockets_numbered_past_1024(echo: EchoServer) -> None:
    # A long test run holds over a thousand descriptors; select() cannot
    # watch one numbered 1024 or more, and the proxy stopped forwarding there
    # (a relay's AMQP handshake timed out late in `make test`).
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with TcpProxy("127.0.0.1", echo.port) as p, connect(p.port) as sock:
            assert sock.fileno() >= 1024
            assert roundtrip(sock, b"past select's limit") == b"past select's limit"
    finally:
        for fd in filler:
            os.close(fd)


def test_half_close_is_propagated(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(1024):
            got += chunk
        assert bytes(got) == b"last words"  # echo answered, then closed after our FIN
    assert wait_for(lambda: proxy.connections == 0)


def test_url_for_and_port() -> None:
    p = TcpProxy("127.0.0.1", 5672)
    with pytest.raises(RuntimeError):
        _ = p.port
    with p:
        assert p.url_for("amqp://guest:guest@127.0.0.1:5672/%2F") == (
            f"amqp://guest:guest@127.0.0.1:{p.port}/%2F"
        )
        assert p.url_for("amqp://guest:guest@") == f"amqp://guest:guest@127.0.0.1:{p.port}"
        assert p.url_for("postgresql+psycopg://u:p@localhost:5432/db?sslmode=disable") == (
            f"postgresql+psycopg://u:p@127.0.0.1:{p.port}/db?sslmode=disable"
        )
        assert p.address == ("127.0.0.1", p.port)


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError):
        TcpProxy("10.0.0.1", 5672)
    with pytest.raises(ValueError):
        TcpProxy("example.com", 5672)


def test_target_down_resets_clients() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with TcpProxy("127.0.0.1", dead_port) as p:
        assert_dropped_on_connect(p.port)
        assert p.connections == 0


def test_max_connections_is_enforced(echo: EchoServer) -> None:
    with TcpProxy("127.0.0.1", echo.port, max_connections=2) as p:
        a, b = connect(p.port), connect(p.port)
        try:
            assert roundtrip(a, b"a") == b"a"
            assert roundtrip(b, b"b") == b"b"
            assert_dropped_on_connect(p.port)
        finally:
            a.close()
            b.close()


def test_stop_closes_everything(echo: EchoServer) -> None:
    p = TcpProxy("127.0.0.1", echo.port).start()
    port = p.port
    forwarded = connect(port)
    assert roundtrip(forwarded, b"x") == b"x"
    p.blackhole()
    held = connect(port)
    assert wait_for(lambda: p.held_connections == 1)
    p.stop()
    p.stop()  # idempotent
    try:
        assert_closed_by_peer(forwarded)
        assert_closed_by_peer(held)
        assert_refused(port)
        assert p.connections == 0
        assert wait_for(lambda: not proxy_threads())
        with pytest.raises(RuntimeError):
            p.cut()
    finally:
        forwarded.close()
        held.close()


# --------------------------------------------------------------------------- cut / restore


def test_cut_closes_existing_and_refuses_new(proxy: TcpProxy) -> None:
    port = proxy.port
    with connect(port) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
        proxy.cut()
        assert proxy.is_cut
        assert proxy.connections == 0
        assert_closed_by_peer(sock)
        assert_refused(port)
        assert proxy.port == port


def test_cut_with_reset_sends_rst(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        assert roundtrip(sock, b"ping") == b"ping"
        proxy.cut(reset=True)
        sock.settimeout(2)
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_restore_listens_again_on_same_port(proxy: TcpProxy) -> None:
    port = proxy.port
    for _ in range(3):
        with connect(port) as sock:
            assert roundtrip(sock, b"before") == b"before"
            proxy.cut()
            assert_closed_by_peer(sock)
        assert_refused(port)
        proxy.restore()
        assert not proxy.is_cut
        assert proxy.port == port
        with connect(port) as sock:
            assert roundtrip(sock, b"after") == b"after"


def test_cut_while_data_flows_is_quiet(proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    stop = threading.Event()
    socks = [connect(proxy.port) for _ in range(4)]

    def blast(sock: socket.socket) -> None:
        payload = os.urandom(64 * 1024)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(payload)
                sock.recv(65536)

    blasters = [threading.Thread(target=blast, args=(s,), daemon=True) for s in socks]
    for t in blasters:
        t.start()
    time.sleep(0.2)
    proxy.cut()
    assert proxy.connections == 0
    stop.set()
    for t in blasters:
        t.join(5)
        assert not t.is_alive()
    for s in socks:
        s.close()
    proxy.restore()
    with connect(proxy.port) as sock:
        assert roundtrip(sock, b"still fine") == b"still fine"
    assert errors == []


# --------------------------------------------------------------------------- blackhole


def test_blackhole_hangs_new_and_existing_connections(proxy: TcpProxy) -> None:
    with connect(proxy.port) as existing:
        assert roundtrip(existing, b"ping") == b"ping"
        proxy.blackhole()
        assert proxy.is_blackholed

        existing.settimeout(0.3)
        existing.sendall(b"anyone?")
        with pytest.raises(TimeoutError):
            existing.recv(1024)

        with connect(proxy.port) as fresh:  # the connect itself succeeds ...
            fresh.settimeout(0.3)
            fresh.sendall(b"hello?")
            with pytest.raises(TimeoutError):  # ... but nothing ever answers
                fresh.recv(1024)
            assert wait_for(lambda: proxy.held_connections == 1)

            proxy.restore()
            assert not proxy.is_blackholed
            assert proxy.held_connections == 0
            assert proxy.connections == 0
            assert_closed_by_peer(fresh)
            assert_closed_by_peer(existing)

    with connect(proxy.port) as sock:
        assert roundtrip(sock, b"back") == b"back"


def test_cut_ends_blackhole(proxy: TcpProxy) -> None:
    port = proxy.port
    proxy.blackhole()
    with connect(port) as held:
        assert wait_for(lambda: proxy.held_connections == 1)
        proxy.cut()
        assert proxy.held_connections == 0
        assert_closed_by_peer(held)
        assert_refused(port)
    proxy.restore()
    with connect(port) as sock:
        assert roundtrip(sock, b"ok") == b"ok"


# --------------------------------------------------------------------------- real RabbitMQ


def test_pika_through_proxy_against_real_rabbitmq() -> None:
    # No skip when RabbitMQ is missing: the suite's promise is real services.
    import pika
    from pika.adapters.blocking_connection import BlockingChannel
    from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker

    def params(port: int) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host="127.0.0.1",
            port=port,
            virtual_host="/",
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1,
            socket_timeout=5,
            blocked_connection_timeout=5,
        )

    def declare_and_check(channel: BlockingChannel, queue: str) -> None:
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"through the proxy")
        _, _, body = channel.basic_get(queue, auto_ack=True)
        assert body == b"through the proxy"

    first_queue = f"tcp-proxy-selftest-{uuid.uuid4().hex}"
    second_queue = f"tcp-proxy-selftest-{uuid.uuid4().hex}"
    with TcpProxy(*RABBIT) as proxy:
        first = pika.BlockingConnection(params(proxy.port))
        try:
            channel = first.channel()
            declare_and_check(channel, first_queue)
            assert proxy.connections == 1

            proxy.cut()
            started = time.monotonic()
            with pytest.raises(AMQPConnectionError):  # StreamLostError, immediately
                channel.basic_publish("", first_queue, b"into the void")
            assert time.monotonic() - started < 2
            assert first.is_closed
            with pytest.raises(AMQPConnectionError):  # and connecting is refused
                pika.BlockingConnection(params(proxy.port))

            proxy.restore()
            second = pika.BlockingConnection(params(proxy.port))
            try:
                declare_and_check(second.channel(), second_queue)
            finally:
                with contextlib.suppress(Exception):
                    second.channel().queue_delete(second_queue)
                with contextlib.suppress(Exception):
                    second.close()
        finally:
            with contextlib.suppress(Exception):
                first.close()

    # The cut reached the broker too: the first connection's exclusive queue is gone.
    direct = pika.BlockingConnection(params(RABBIT[1]))
    try:

        def first_queue_gone() -> bool:
            try:
                direct.channel().queue_declare(first_queue, passive=True)
            except ChannelClosedByBroker as exc:
                return bool(exc.reply_code == 404)
            return False

        assert wait_for(first_queue_gone, timeout=5)
        for queue in (first_queue, second_queue):
            with contextlib.suppress(ChannelClosedByBroker):
                direct.channel().queue_delete(queue)
    finally:
        direct.close()


# --------------------------------------------------------------------------- real PostgreSQL

# A client that takes an advisory lock in a transaction and then hangs, as a
# worker thread does between statements; `blocked` first waits for the lock.
_LOCKING_CLIENT = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("SELECT pg_advisory_xact_lock(%s)", (int(sys.argv[2]),))
print("locked", flush=True)
time.sleep(600)
"""


def _lock_holders(admin_url: str, key: int) -> int:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = %s", (key,)
        ).fetchone()
    return int(row[0]) if row else 0


def _spawn_locking_client(url: str, key: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _LOCKING_CLIENT, url, str(key)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def _kill(client: subprocess.Popen[bytes]) -> None:
    os.killpg(client.pid, signal.SIGKILL)
    client.wait(5)


@pytest.mark.parametrize("blocked", [False, True], ids=["idle-in-transaction", "waiting-for-a-lock"])
def test_a_killed_clients_postgresql_session_ends_and_its_locks_go(blocked: bool) -> None:
    """When the client side ends, the proxy must pass the end on: a session
    that outlives its SIGKILLed client holds its row locks, and every other
    worker thread then waits on them."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    key = random.randrange(1, 2**31)
    host, port = "127.0.0.1", int(urlsplit(PG_ADMIN_URL).port or 5432)
    with TcpProxy(host, port) as proxy, psycopg.connect(PG_ADMIN_URL) as mine:
        if blocked:  # the client's backend is busy waiting, not reading its socket
            mine.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        client = _spawn_locking_client(proxy.url_for(PG_ADMIN_URL), key)
        try:
            if blocked:
                assert wait_for(lambda: proxy.connections == 1, timeout=10)
                time.sleep(0.5)  # its lock request is queued behind ours
            else:
                assert client.stdout is not None and client.stdout.readline() == b"locked\n"
        finally:
            _kill(client)
        mine.commit()  # a blocked backend now gets the lock: it must not keep it
        assert wait_for(lambda: _lock_holders(PG_ADMIN_URL, key) == 0, timeout=5)
        assert wait_for(lambda: proxy.connections == 0, timeout=5)
