"""How every payfleet process logs: text on a terminal, one JSON object per
line otherwise (`LOG_FORMAT` forces either).

A JSON line carries `ts`, `level`, `logger`, `msg`, `process` (ingress,
worker, scheduler, cli) and, when known, the context fields: `trace_id`,
`event_id`, `order_id`, `run_id`, `job`. Context is bound per thread of
work with `log_context(...)` (or `bind`/`unbind` from hooks that open and
close it apart), kept in a contextvar, so a line written anywhere below
carries it without being passed the ids. A field given as `extra=` wins.

During a RabbitMQ outage pika and Dramatiq's consumers log an error (pika a
traceback) on every reconnect attempt; `BrokerOutages` turns that into one
warning when the outage starts and one line when a connection succeeds.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any, ClassVar

import pika.exceptions
from dramatiq.errors import BrokerConnectionError
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("trace_id", "event_id", "order_id", "run_id", "job")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[Mapping[str, object] | None] = ContextVar("payfleet_log_context", default=None)


# --- context ------------------------------------------------------------------


def bind(**fields: object) -> Token[Mapping[str, object] | None]:
    """Add fields to the current context (None leaves a field out); give the
    token to `unbind` when the work is done."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s) {sorted(unknown)}; known: {CONTEXT_FIELDS}")
    known = {name: value for name, value in fields.items() if value is not None}
    return _context.set({**(_context.get() or {}), **known})


def unbind(token: Token[Mapping[str, object] | None]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


class ContextFields(logging.Filter):
    """Copies the bound context onto each record, so both formatters (and any
    other handler) see the fields as record attributes."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


# The WSGI environ key under which a request's handler leaves fields for its
# access line (gunicorn passes the environ to the access log as `{key}e`
# atoms, the key lowercased).
_ACCESS_FIELDS = "payfleet.access_fields"


def add_access_fields(environ: dict[str, Any], **fields: object) -> None:
    """Fields for the request's access line, where its handler has facts worth
    one line per request (a webhook's event); None values are left out."""
    environ.setdefault(_ACCESS_FIELDS, {}).update({k: v for k, v in fields.items() if v is not None})


class AccessFields(logging.Filter):
    """gunicorn's access records carry their atoms as the record's args: the
    JSON line gets them as fields of their own, not only inside `msg`, and
    the fields the request's handler added (add_access_fields)."""

    ATOMS: ClassVar[dict[str, str]] = {
        "m": "method",
        "U": "path",
        "s": "status",
        "M": "duration_ms",
        "h": "remote",
    }

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, Mapping):
            for atom, field in self.ATOMS.items():
                setattr(record, field, atoms.get(atom))
            added = atoms.get(f"{{{_ACCESS_FIELDS}}}e")
            for field, value in (added if isinstance(added, dict) else {}).items():
                setattr(record, field, value)
        return True


# --- formatters ---------------------------------------------------------------


class JsonLines(JsonFormatter):
    """python-json-logger's formatter with payfleet's field names, `ts`
    first (UTC, milliseconds) and the process name on every line."""

    def __init__(self, process: str) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger", "message": "msg"},
            static_fields={"process": process},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)


class TextLines(logging.Formatter):
    """The terminal format, with the context fields that are known at the end."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        known = [f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)]
        return f"{line} [{' '.join(known)}]" if known else line


def use_json(log_format: str, stream: IO[str] | None = None) -> bool:
    """`json` or `text` as set; unset, text only when a person is watching:
    the process's own stderr (Dramatiq swaps sys.stderr for a pipe in its
    worker processes, so the original is asked) is a terminal."""
    if log_format:
        return log_format == "json"
    stream = stream or sys.__stderr__
    return not (stream is not None and stream.isatty())


def formatter(process: str, log_format: str) -> logging.Formatter:
    return JsonLines(process) if use_json(log_format) else TextLines()


# --- RabbitMQ outages ---------------------------------------------------------

# An exception of these types, raised or logged as an argument, means the
# connection to RabbitMQ is gone.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    BrokerConnectionError,  # Dramatiq's ConnectionClosed, ConnectionFailed
    ConnectionError,
    # A publish on a channel whose connection just died.
    pika.exceptions.ChannelWrongStateError,
    # pika's connection workflow (socket connect, TLS, AMQP handshake): not
    # an AMQPConnectionError when it reaches a caller unwrapped.
    AMQPConnectorException,
)


def _connection_gone(value: object) -> bool:
    # ENOTCONN is an OSError but not a ConnectionError; and when the peer
    # vanishes between connect and handshake, pika raises a bare ValueError
    # about the socket (io_services_utils), which nothing else raises there.
    return (
        isinstance(value, _CONNECTION_ERRORS)
        or (isinstance(value, OSError) and value.errno == errno.ENOTCONN)
        or (isinstance(value, ValueError) and str(value).startswith("Expected connected socket"))
    )


class BrokerOutages(logging.Filter):
    """One warning per RabbitMQ outage instead of an error or traceback per
    reconnect attempt (six consumers retry every 3 s in each worker process;
    publishers warn on every publish). The outage ends when pika reports a
    connection made, which is logged once with what was held back.

    Needs pika's logger at INFO (`configure` sets it) to see the successful
    connection; pika's INFO records are dropped here, as before."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._since: float | None = None
        self._hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pika") and record.levelno < logging.WARNING:
            return self._maybe_back(record)
        if self._is_connection_error(record):
            return self._outage(record)
        if self._since is not None and record.name.startswith("dramatiq.worker.ConsumerThread"):
            return self._hide()  # "Restarting consumer in 3.00 seconds."
        return True

    def _is_connection_error(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if record.name.startswith("pika"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        args = record.args if isinstance(record.args, tuple) else ()
        return any(_connection_gone(value) for value in (exc, *args))

    def _outage(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if self._since is not None:
                self._hidden += 1
                return False
            self._since = record.created
        cause = (record.getMessage().splitlines() or [""])[0][:200]
        record.msg = "RabbitMQ connection lost (%s: %s); repeats are not logged until it is back"
        record.args = (record.name, cause)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        return True

    def _hide(self) -> bool:
        with self._lock:
            self._hidden += 1
        return False

    def _maybe_back(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Connection workflow succeeded"):
            return False
        with self._lock:
            if self._since is None:
                return False
            since, hidden = self._since, self._hidden
            self._since, self._hidden = None, 0
        record.msg = "RabbitMQ connection back after %.1f s; %d repeated connection error line(s) not logged"
        record.args = (record.created - since, hidden)
        return True


# --- set-up -------------------------------------------------------------------


# The lines held by a thread inside `lines_together`: (handler, formatted line).
_held = threading.local()


@contextmanager
def lines_together() -> Iterator[None]:
    """The lines this thread logs inside the block are written at its end,
    in one write per handler, instead of one each.

    For a burst of lines that are due together (a batch's line per event):
    in a Dramatiq worker process every write is a message on the log pipe
    that wakes the supervisor to copy it out, and eight of them at once cost
    the batch's thread and the supervisor far more than the formatting. A
    line is formatted when logged (its context is the one it was logged in);
    only its write waits, for the rest of the block. Nested blocks write at
    the outermost one's end."""
    if getattr(_held, "lines", None) is not None:
        yield
        return
    held: list[tuple[Lines, str]] = []
    _held.lines = held
    try:
        yield
    finally:
        _held.lines = None
        by_handler: dict[Lines, list[str]] = {}
        for made, line in held:
            by_handler.setdefault(made, []).append(line)
        for made, lines in by_handler.items():
            made.write_lines("".join(lines))


class Lines(logging.StreamHandler[IO[str]]):
    """A stream handler that holds its lines while its thread is inside
    `lines_together`."""

    def emit(self, record: logging.LogRecord) -> None:
        held: list[tuple[Lines, str]] | None = getattr(_held, "lines", None)
        if held is None:
            super().emit(record)
            return
        try:
            held.append((self, self.format(record) + self.terminator))
        except Exception:
            self.handleError(record)

    def write_lines(self, text: str) -> None:
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:
            # What logging does with a failed write: said on stderr, never raised.
            self.handleError(logging.makeLogRecord({"msg": "held lines", "exc_info": sys.exc_info()}))
        finally:
            self.release()


def handler(process: str, log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler with payfleet's format and filters, on `stream` (default
    stderr as it is now: in a Dramatiq worker process, its log pipe)."""
    made = Lines(stream if stream is not None else sys.stderr)
    made.setFormatter(formatter(process, log_format))
    made.addFilter(ContextFields())
    made.addFilter(BrokerOutages())
    return made


def configure(
    process: str,
    log_format: str,
    *,
    stream: IO[str] | None = None,
    level: int = logging.INFO,
    replace: bool = False,
) -> None:
    """Make the root logger write through one payfleet handler. Like
    basicConfig, it leaves a root logger that already has handlers alone (a
    command run inside a test session keeps pytest's), unless told to
    `replace` them (Dramatiq's, in a worker process)."""
    root = logging.getLogger()
    if root.handlers and not replace:
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(process, log_format, stream))
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    # pika at INFO only so that BrokerOutages sees a connection made; it
    # drops pika's INFO lines. stripe logs two INFO lines per API call.
    logging.getLogger("pika").setLevel(logging.INFO)
    logging.getLogger("stripe").setLevel(logging.WARNING)


def gunicorn_logconfig(process: str, log_format: str) -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its error and access logs and everything
    the app logs go through the root logger's one payfleet handler (stderr);
    access lines get their method, path, status and duration as fields."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "INFO", "handlers": ["payfleet"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
            "gunicorn.access": {
                "level": "INFO",
                "handlers": [],
                "propagate": True,
                "filters": ["access_fields"],
            },
            "pika": {"level": "INFO"},
            "stripe": {"level": "WARNING"},
        },
        "filters": {"access_fields": {"()": AccessFields}},
        "handlers": {"payfleet": {"()": handler, "process": process, "log_format": log_format}},
        "formatters": {},
    }


def run_dramatiq(log_format: str, argv: list[str]) -> int:
    """Dramatiq's command line with payfleet's logs in every process it starts.

    Dramatiq's parent and fork processes (the supervisor, the metrics
    exporter) call `logging.basicConfig` with Dramatiq's own text format;
    basicConfig does nothing once the root logger has a handler, so setting
    payfleet's up first makes them write JSON lines too. Worker processes
    replace it with one on their log pipe (workers/main.py)."""
    from dramatiq.cli import main, make_argument_parser

    configure("worker", log_format, replace=True)
    return int(main(make_argument_parser().parse_args(argv)))  # type: ignore[no-untyped-call]
