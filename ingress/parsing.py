"""Reading request bodies: bounded, then strictly shaped."""

from __future__ import annotations

import json
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import falcon

from ingress.errors import ApiError

T = TypeVar("T")


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    if req.content_length is not None and req.content_length > limit:
        raise _too_large(limit)
    # Without a Content-Length (a chunked delivery) bounded_stream reads
    # nothing; gunicorn's input stream ends at the last chunk, so read that.
    stream = req.bounded_stream if req.content_length is not None else req.stream
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise _too_large(limit)
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(falcon.HTTP_413, "body_too_large", f"body is over the {limit}-byte limit")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(falcon.HTTP_400, "malformed_body", f"body is not valid JSON: {error}") from None


def parse_form(body: bytes) -> dict[str, str]:
    """A form-encoded body as a dict; a repeated field is ambiguous (which one
    was signed?) and refused, like anything that is not a form."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as error:
        raise ApiError(falcon.HTTP_400, "malformed_body", f"body is not a form: {error}") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ApiError(falcon.HTTP_400, "malformed_body", "a field is repeated")
    if any("\x00" in name or "\x00" in value for name, value in pairs):
        raise ApiError(falcon.HTTP_400, "malformed_body", "fields must not contain NUL characters")
    return fields


def json_object(req: falcon.Request, limit: int) -> dict[str, Any]:
    document = parse_json(read_body(req, limit))
    if not isinstance(document, dict):
        raise ApiError(falcon.HTTP_400, "malformed_body", "body must be a JSON object")
    return document


def required(document: dict[str, Any], name: str, kind: type[T]) -> T:
    value = document.get(name)
    # bool is an int in Python; a quantity of `true` is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(falcon.HTTP_400, "invalid_request", f"{name!r} must be a {kind.__name__}")
    # PostgreSQL text cannot hold NUL: refuse it here, as bad input.
    if isinstance(value, str) and "\x00" in value:
        raise ApiError(falcon.HTTP_400, "invalid_request", f"{name!r} must not contain NUL characters")
    return cast(T, value)


def optional(document: dict[str, Any], name: str, kind: type[T]) -> T | None:
    return None if document.get(name) is None else required(document, name, kind)
