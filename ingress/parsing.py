"""Reading request bodies: bounded, then strictly shaped.

Everything a body holds may end up in PostgreSQL (a stored Stripe payload is
jsonb), so a document is refused at the door when PostgreSQL could not hold
it or Python could not handle it: integers beyond 64 bits, nesting deeper
than any real body, NUL characters and lone surrogates, non-finite numbers."""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import falcon
from gunicorn.http.errors import ParseException

from ingress.errors import ApiError

T = TypeVar("T")

MAX_DEPTH = 64  # Stripe's events nest about ten levels; nothing legitimate needs more
INT64 = 2**63


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all,
    and a body whose framing is broken (before anything looks at it)."""
    length = req.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        body = _read_up_to(req, limit + 1)
    except (ParseException, OSError):
        # gunicorn's input stream raises its own errors for a bad chunk size,
        # a missing chunk terminator or a body cut short (NoMoreData, an
        # OSError); the request is unreadable, which is the client's fault.
        raise _unreadable("its chunked framing is broken or it ended early") from None
    if len(body) > limit:
        raise _too_large(limit)
    if length is not None and len(body) < length:
        raise _unreadable(f"it ended after {len(body)} of its {length} bytes")
    return body


def _read_up_to(req: falcon.Request, most: int) -> bytes:
    # Without a Content-Length (a chunked delivery) bounded_stream reads
    # nothing; gunicorn's input stream ends at the last chunk, so read that.
    stream = req.bounded_stream if req.content_length is not None else req.stream
    body = b""
    while len(body) < most and (piece := stream.read(most - len(body))):
        body += piece
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(falcon.HTTP_413, "body_too_large", f"body is over the {limit}-byte limit")


def _unreadable(why: str) -> ApiError:
    return ApiError(falcon.HTTP_400, "malformed_body", f"the body cannot be read: {why}")


def _malformed(detail: str) -> ApiError:
    return ApiError(falcon.HTTP_400, "malformed_body", detail)


def _invalid(detail: str) -> ApiError:
    # Well-formed JSON holding a value payfleet cannot keep.
    return ApiError(falcon.HTTP_400, "invalid_request", detail)


def parse_json(body: bytes) -> Any:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(f"body is not valid JSON: {error}") from None
    except ValueError:
        # Python refuses to convert an integer of over 4300 digits.
        raise _malformed("an integer in the body has too many digits") from None
    except RecursionError:
        raise _malformed(f"the body is nested deeper than {MAX_DEPTH} levels") from None
    _check_document(document)
    return document


def _check_document(document: Any) -> None:
    """Walks the document without recursion (it may be deep) and refuses the
    first value PostgreSQL or the code after this would choke on, naming the
    field that holds it."""
    pending: list[tuple[Any, int, str]] = [(document, 1, "body")]
    while pending:
        value, depth, name = pending.pop()
        if isinstance(value, dict):
            _check_depth(depth)
            for key, item in value.items():
                _check_text("a field name", key)
                pending.append((item, depth + 1, repr(key[:64])))
        elif isinstance(value, list):
            _check_depth(depth)
            pending.extend((item, depth + 1, name) for item in value)
        else:
            _check_scalar(name, value)


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _malformed(f"the body is nested deeper than {MAX_DEPTH} levels")


def _check_scalar(name: str, value: Any) -> None:
    if isinstance(value, str):
        _check_text(name, value)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and not -INT64 <= value < INT64:
        raise _invalid(f"{name}: an integer must fit in 64 bits")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _invalid(f"{name}: numbers must be finite (no NaN or Infinity)")


def _check_text(name: str, text: str) -> None:
    # Only a non-ASCII string can hold a surrogate: most strings skip the encoding.
    if "\x00" in text:
        raise _invalid(f"{name} must not contain NUL characters")
    if not text.isascii() and not _storable(text):
        raise _invalid(f"{name} must be valid Unicode (a lone surrogate cannot be stored)")


def _storable(text: str) -> bool:
    """Whether PostgreSQL's text can hold it: UTF-8 encodable, and no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def checked_text(name: str, value: str) -> str:
    """A string from a path or a body field that PostgreSQL's text can hold."""
    if not _storable(value):
        raise _invalid(f"{name!r} must be valid Unicode without NUL characters")
    return value


def parse_form(body: bytes) -> dict[str, str]:
    """A form-encoded body as a dict; a repeated field is ambiguous (which one
    was signed?) and refused, like anything that is not a form."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as error:
        raise _malformed(f"body is not a form: {error}") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise _malformed("a field is repeated")
    if any("\x00" in name or "\x00" in value for name, value in pairs):
        raise _malformed("fields must not contain NUL characters")
    return fields


def json_object(req: falcon.Request, limit: int) -> dict[str, Any]:
    document = parse_json(read_body(req, limit))
    if not isinstance(document, dict):
        raise _malformed("body must be a JSON object")
    return document


def required(document: dict[str, Any], name: str, kind: type[T]) -> T:
    value = document.get(name)
    # bool is an int in Python; a quantity of `true` is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(falcon.HTTP_400, "invalid_request", f"{name!r} must be a {kind.__name__}")
    # PostgreSQL text cannot hold NUL nor a lone surrogate: refuse them here, as bad input.
    if isinstance(value, str):
        checked_text(name, value)
    return value


def optional(document: dict[str, Any], name: str, kind: type[T]) -> T | None:
    return None if document.get(name) is None else required(document, name, kind)
