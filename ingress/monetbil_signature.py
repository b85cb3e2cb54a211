"""Monetbil callback verification: `sign` is the lowercase hex MD5 of the
service secret followed by the values of every other posted field, in
field-name order. The set of fields varies, so all of them are covered."""

from __future__ import annotations

import hashlib
import hmac

import falcon

from ingress.errors import ApiError


def expected_sign(fields: dict[str, str], secret: str) -> str:
    values = "".join(fields[name] for name in sorted(fields) if name != "sign")
    return hashlib.md5((secret + values).encode()).hexdigest()


def verify(fields: dict[str, str], secret: str) -> None:
    if not secret:
        raise ApiError(falcon.HTTP_503, "not_configured", "MONETBIL_SERVICE_SECRET is empty")
    given = fields.get("sign", "")
    if not given:
        raise ApiError(falcon.HTTP_403, "missing_signature", "the callback has no sign field")
    # Constant time, so the comparison says nothing about how much matched.
    if not hmac.compare_digest(given.lower().encode(), expected_sign(fields, secret).encode()):
        raise ApiError(falcon.HTTP_403, "bad_signature", "sign does not match the posted fields")
