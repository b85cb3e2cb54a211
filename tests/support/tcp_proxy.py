"""A small loopback TCP proxy for failure tests.

Put it between a process and RabbitMQ or PostgreSQL, point the process at
``proxy.port`` (or ``proxy.url_for(real_url)``) and then break the network on
demand:

* :meth:`TcpProxy.cut` -- the "server went down" case: every forwarded
  connection is closed in both directions at once and the listening socket is
  closed, so new connects are refused (``ECONNREFUSED``).
* :meth:`TcpProxy.blackhole` -- the "network hangs" case: nothing is
  forwarded any more, on existing connections or on new ones; new connects are
  still accepted (the kernel completes the handshake) but never answered.
* :meth:`TcpProxy.restore` -- back to normal on the *same* port.  Sockets
  left over from a blackhole are dropped first, so clients see EOF on them.

Everything runs on daemon threads: one acceptor per listening period and two
pump threads per forwarded connection (bounded by ``max_connections``).  All
sockets are non-blocking and polled with a short timeout, so no thread ever
blocks on a socket another thread is about to close, and errors in pumps
(resets, broken pipes, closed sockets) are swallowed silently.

Only 127.0.0.1 is ever bound or connected to.
"""

from __future__ import annotations

import contextlib
import errno
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]

LOOPBACK = "127.0.0.1"
_POLL = 0.05  # seconds; upper bound for how long a thread takes to notice a stop flag
_BUFSIZE = 65536
_JOIN_TIMEOUT = 2.0


def _ready(sock: socket.socket, event: int) -> bool:
    """Whether `sock` is readable or writable within _POLL. poll(), not
    select(): select() cannot watch a descriptor numbered 1024 or more, which
    a long test run reaches, and the proxy then stopped forwarding."""
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(_POLL * 1000))


def _close_socket(sock: socket.socket, *, reset: bool = False) -> None:
    """Close ``sock``; with ``reset`` the peer gets an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One forwarded client <-> upstream connection served by two pump threads."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reset = False
        self._pumps_left = 2
        self._closed = False
        self._threads = [
            threading.Thread(target=self._pump, args=(client, upstream), name="tcp-proxy-c2u", daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), name="tcp-proxy-u2c", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def abort(self, *, reset: bool = False) -> None:
        """Ask both pumps to stop; the sockets are closed once they have."""
        with self._lock:
            self._reset = self._reset or reset
        self._stop.set()

    def close_now(self, *, reset: bool = False) -> None:
        """Stop the pumps, wait for them, and close both sockets (from a foreign thread)."""
        self.abort(reset=reset)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current and thread.is_alive():
                thread.join(_JOIN_TIMEOUT)
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reset = self._reset
        _close_socket(self.client, reset=reset)
        _close_socket(self.upstream, reset=reset)
        self._proxy._forget(self)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            self._forward(src, dst)
        except (OSError, ValueError):
            # Reset, broken pipe, or a socket closed under us: end the whole connection.
            self.abort(reset=True)
        finally:
            with self._lock:
                self._pumps_left -= 1
                last = self._pumps_left == 0
            if last:
                self._close_sockets()

    def _forward(self, src: socket.socket, dst: socket.socket) -> None:
        flowing = self._proxy._flowing
        gate = self._proxy._gate  # held around every send/half-close; blackhole() syncs on it
        while not self._stop.is_set():
            if not flowing.is_set():  # blackholed: leave the data where it is
                flowing.wait(_POLL)
                continue
            readable = _ready(src, select.POLLIN)
            if not readable or self._stop.is_set() or not flowing.is_set():
                continue
            try:
                data = src.recv(_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                # Orderly EOF from src: propagate a half-close, keep the other direction going.
                with gate:
                    if flowing.is_set():
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        return
                continue  # blackholed meanwhile: swallow the EOF, the connection gets dropped later
            view = memoryview(data)
            while view and not self._stop.is_set():
                writable = _ready(dst, select.POLLOUT)
                if not writable:
                    continue
                with gate:
                    if not flowing.is_set():
                        break  # blackholed meanwhile: discard; the connection gets dropped later
                    try:
                        sent = dst.send(view)
                    except (BlockingIOError, InterruptedError):
                        continue
                view = view[sent:]


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port`` with on-demand failures.

    Usage::

        with TcpProxy("127.0.0.1", 5672) as proxy:
            url = proxy.url_for("amqp://guest:guest@127.0.0.1:5672/%2F")
            ...
            proxy.cut()        # broker "down": connections closed, connects refused
            proxy.restore()    # broker back on the same port
            proxy.blackhole()  # network hangs: nothing forwarded, connects hang
            proxy.restore()    # hung sockets dropped, forwarding again
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_port: int = 0,
        *,
        max_connections: int = 128,
        connect_timeout: float = 5.0,
    ) -> None:
        if target_host not in (LOOPBACK, "localhost"):
            raise ValueError(f"TcpProxy only forwards to {LOOPBACK}, not {target_host!r}")
        self.target_host = LOOPBACK
        self.target_port = target_port
        self._requested_port = listen_port
        self._port: int | None = None
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout

        self._lock = threading.RLock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._gate = threading.Lock()
        self._conns: set[_Connection] = set()
        self._held: list[socket.socket] = []  # accepted while blackholed, never answered
        self._listener: socket.socket | None = None
        self._accept_stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ info

    @property
    def port(self) -> int:
        """The listening port on 127.0.0.1 (stable across cut/restore/blackhole)."""
        if self._port is None:
            raise RuntimeError("TcpProxy.port is only known after start()")
        return self._port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def connections(self) -> int:
        """Number of currently forwarded connections (blackholed accepts not included)."""
        with self._lock:
            return len(self._conns)

    @property
    def held_connections(self) -> int:
        """Number of connections accepted while blackholed and left hanging."""
        with self._lock:
            return len(self._held)

    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._started and self._listener is None

    @property
    def is_blackholed(self) -> bool:
        return not self._flowing.is_set()

    def url_for(self, url: str) -> str:
        """Rewrite the host:port of ``url`` to point at the proxy.

        ``url_for("amqp://guest:guest@127.0.0.1:5672/%2F")`` and
        ``url_for("amqp://guest:guest@")`` both give
        ``amqp://guest:guest@127.0.0.1:<port>...``; the path and query are kept.
        """
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{LOOPBACK}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> TcpProxy:
        with self._lock:
            if self._stopped:
                raise RuntimeError("TcpProxy cannot be restarted after stop()")
            if self._started:
                return self
            self._listen(self._requested_port)
            self._started = True
        return self

    def stop(self) -> None:
        """Close everything: listener, forwarded and held connections. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            detached = self._detach_listener()
            taken = self._take_all(reset=False)
            self._flowing.set()  # let paused pumps see their stop flag promptly
        self._finish_listener(detached)
        self._close_taken(taken, reset=False)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- failures

    def cut(self, *, reset: bool = False) -> None:
        """Simulate the server going down.

        Stops listening (new connects get ECONNREFUSED), then closes every
        forwarded connection on both sides -- with a FIN by default, or an RST
        with ``reset=True``.  Also ends a blackhole (its sockets are closed).
        Returns once all sockets are closed.
        """
        with self._lock:
            self._require_running()
            detached = self._detach_listener()
            taken = self._take_all(reset=reset)
            self._flowing.set()
        self._finish_listener(detached)
        self._close_taken(taken, reset=reset)

    def blackhole(self) -> None:
        """Simulate a hung network.

        Existing connections stay open but stop forwarding in both directions;
        new connects are accepted by the kernel/proxy and then never answered.
        If the proxy was cut, it listens again (in blackhole mode).
        """
        with self._lock:
            self._require_running()
            self._flowing.clear()
            with self._gate:  # wait out any send already in progress; none starts after this
                pass
            if self._listener is None:
                self._listen(self.port)

    def restore(self) -> None:
        """Back to normal forwarding on the same port.

        After a blackhole, every connection that existed during it (held new
        ones *and* paused forwarded ones) is closed first, so clients see EOF
        rather than a stream that silently resumes.
        """
        with self._lock:
            self._require_running()
            taken: tuple[list[_Connection], list[socket.socket]] = ([], [])
            if not self._flowing.is_set():
                taken = self._take_all(reset=False)
            self._flowing.set()
            if self._listener is None:
                self._listen(self.port)
        self._close_taken(taken, reset=False)

    # -------------------------------------------------------------- internals

    def _require_running(self) -> None:
        if not self._started:
            raise RuntimeError("TcpProxy is not started")
        if self._stopped:
            raise RuntimeError("TcpProxy is stopped")

    def _listen(self, port: int) -> None:
        """Bind + listen on 127.0.0.1:port and start an acceptor thread (lock held).

        Port 0 means a free port *below* the kernel's ephemeral range, not
        one the kernel picks from it. While the proxy is cut its port is
        free, and a port from the ephemeral range can then be handed to any
        outgoing connection, even to a client reconnecting to the cut port
        itself (TCP's simultaneous open connects it to itself); `restore`
        then failed with EADDRINUSE (seen once in CI)."""
        deadline = time.monotonic() + 5.0
        candidates = _ports_below_ephemeral() if port == 0 else None
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((LOOPBACK, next(candidates) if candidates else port))
                sock.listen(64)
                sock.setblocking(False)
                break
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                if candidates is None:
                    # Right after a cut the port may briefly still be busy; retry a little.
                    time.sleep(0.05)
        self._port = sock.getsockname()[1]
        self._listener = sock
        stop = threading.Event()
        self._accept_stop = stop
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(sock, stop), name=f"tcp-proxy-accept-{self._port}", daemon=True
        )
        self._acceptor.start()

    def _detach_listener(self) -> tuple[socket.socket, threading.Thread | None] | None:
        """Tell the acceptor to stop and forget the listener (lock held).

        The caller must pass the result to :meth:`_finish_listener` *without*
        the lock held (the acceptor may be waiting for it).
        """
        sock, thread = self._listener, self._acceptor
        self._listener = None
        self._acceptor = None
        if sock is None:
            return None
        self._accept_stop.set()
        return sock, thread

    @staticmethod
    def _finish_listener(detached: tuple[socket.socket, threading.Thread | None] | None) -> None:
        if detached is None:
            return
        sock, thread = detached
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        with contextlib.suppress(OSError):
            sock.close()

    def _take_all(self, *, reset: bool) -> tuple[list[_Connection], list[socket.socket]]:
        """Detach every connection and ask all pumps to stop (lock held)."""
        conns = list(self._conns)
        held, self._held = self._held, []
        for conn in conns:  # signal every pump first so they all wind down together
            conn.abort(reset=reset)
        return conns, held

    @staticmethod
    def _close_taken(taken: tuple[list[_Connection], list[socket.socket]], *, reset: bool) -> None:
        """Close what :meth:`_take_all` returned (lock *not* held: pumps need it to finish)."""
        conns, held = taken
        for sock in held:
            _close_socket(sock, reset=reset)
        for conn in conns:
            conn.close_now(reset=reset)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                readable = _ready(listener, select.POLLIN)
                if not readable or stop.is_set():
                    continue
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):
                return  # listener closed under us
            try:
                self._handle_client(client, stop)
            except (OSError, ValueError):
                _close_socket(client)

    def _handle_client(self, client: socket.socket, stop: threading.Event) -> None:
        client.setblocking(False)
        with self._lock:
            if stop.is_set():
                _close_socket(client, reset=True)
                return
            if not self._flowing.is_set():
                self._held.append(client)
                return
            if len(self._conns) + len(self._held) >= self.max_connections:
                _close_socket(client, reset=True)
                return
        try:
            upstream = socket.create_connection(
                (self.target_host, self.target_port), timeout=self.connect_timeout
            )
        except OSError:
            # Target down: the client sees its connection reset, like a refused connect.
            _close_socket(client, reset=True)
            return
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, client, upstream)
        with self._lock:
            # A cut/blackhole/stop may have happened while we were connecting.
            if stop.is_set() or not self._flowing.is_set():
                _close_socket(upstream, reset=True)
                if not stop.is_set():
                    self._held.append(client)
                else:
                    _close_socket(client, reset=True)
                return
            self._conns.add(conn)
        conn.start()


def _ports_below_ephemeral() -> Iterator[int]:
    """Random ports between 10000 and the start of the kernel's ephemeral
    range (Linux's ip_local_port_range; 32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        yield random.randrange(10_000, max(low, 10_001))
