"""Every failure becomes `{"error": code, "detail": text}` here, in one place."""

from __future__ import annotations

import logging
from typing import Any

import falcon
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from domain.errors import (
    Conflict,
    DomainError,
    Gone,
    InsufficientStock,
    InvalidRequest,
    NotFound,
    ProviderError,
    UnknownSku,
)

log = logging.getLogger(__name__)

_STATUS = {
    InvalidRequest: falcon.HTTP_400,
    UnknownSku: falcon.HTTP_400,
    NotFound: falcon.HTTP_404,
    InsufficientStock: falcon.HTTP_409,
    Conflict: falcon.HTTP_409,
    Gone: falcon.HTTP_410,
    ProviderError: falcon.HTTP_502,
}


class ApiError(falcon.HTTPError):
    """An HTTP error with payfleet's body: a stable code and a detail."""

    # `http_status`, not `status`: an error's extra fields may carry a
    # "status" of their own (an order's), which must not collide with it.
    def __init__(self, http_status: str, code: str, detail: str, **extra: Any) -> None:
        super().__init__(http_status, title=code, description=detail)
        self.error_code = code
        self.extra = extra

    def to_dict(self, obj_type: Any = dict) -> Any:
        return {"error": self.error_code, "detail": self.description, **self.extra}


def _domain_error(req: falcon.Request, resp: falcon.Response, error: DomainError, params: Any) -> None:
    status = next((s for kind, s in _STATUS.items() if isinstance(error, kind)), falcon.HTTP_400)
    raise ApiError(status, error.code, error.detail, **error.extra)


def _database_error(req: falcon.Request, resp: falcon.Response, error: DBAPIError, params: Any) -> None:
    # A lost or refused connection is "unavailable" (the provider retries); a
    # value PostgreSQL cannot store (a NUL byte, an integer out of range) is
    # the client's; anything else is a bug. Falcon does not pass an error
    # raised here on to another handler, so each case answers here.
    if isinstance(error, OperationalError) or error.connection_invalidated:
        log.error("database unavailable: %s", error.orig)
        raise ApiError(falcon.HTTP_503, "database_unavailable", "PostgreSQL is unavailable; retry later")
    if isinstance(error, DataError):
        # PostgreSQL's text names columns and types and may quote the value:
        # the caller gets what was wrong in payfleet's words, the log the rest.
        sqlstate = getattr(error.orig, "sqlstate", None)
        log.warning("value refused by PostgreSQL (%s) on %s %s", sqlstate, req.method, req.path)
        raise ApiError(falcon.HTTP_400, "invalid_request", _REFUSED.get(sqlstate or "", _REFUSED_ANY))
    log.error("database error on %s %s", req.method, req.path, exc_info=error)
    raise ApiError(falcon.HTTP_500, "internal_error", "unexpected error; see the ingress log")


# What a DataError's SQLSTATE means for the caller (class 22, data exception).
_REFUSED = {
    "22001": "a value is longer than payfleet stores",
    "22003": "a number is out of the range payfleet stores",
    "22021": "a string holds characters that cannot be stored",
    "22P05": "a string holds characters that cannot be stored",
}
_REFUSED_ANY = "a value in the request cannot be stored"


def _unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    if isinstance(error, falcon.HTTPError):
        raise error
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise ApiError(falcon.HTTP_500, "internal_error", "unexpected error; see the ingress log")


def _serialize(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    body = error.to_dict() if isinstance(error, ApiError) else _from_falcon(error)
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON


def _from_falcon(error: falcon.HTTPError) -> dict[str, Any]:
    code = (error.title or "error").lower().replace(" ", "_")
    return {"error": code, "detail": error.description or error.title}


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    # Falcon picks the most specific handler for each exception type.
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(DBAPIError, _database_error)
    app.add_error_handler(DomainError, _domain_error)
    app.set_error_serializer(_serialize)
