"""Sign Monetbil payment callbacks the way Monetbil does.

``sign`` is the lowercase hex MD5 of the service secret followed by the
values of every other posted field, concatenated in field-name order
(Monetbil's own PHP: ``ksort($params); md5($secret . implode('', $params))``).
Every posted field takes part, whatever the set is, so an added or dropped
field changes the signature too.

    form = signed_callback("svc_secret", transaction_id="TX1", payment_ref="ord_1", status="success")
    requests.post(url, data=form)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

__all__ = ["sign_monetbil", "signed_callback", "verify_monetbil"]


def sign_monetbil(fields: Mapping[str, str], secret: str) -> str:
    """The ``sign`` value for ``fields`` (any ``sign`` already among them is left out)."""
    values = "".join(str(fields[name]) for name in sorted(fields) if name != "sign")
    return hashlib.md5((secret + values).encode("utf-8")).hexdigest()


def signed_callback(secret: str, **fields: str) -> dict[str, str]:
    """``fields`` plus their ``sign``."""
    return {**fields, "sign": sign_monetbil(fields, secret)}


def verify_monetbil(fields: Mapping[str, str], secret: str) -> bool:
    """Whether ``fields["sign"]`` is right for the other fields (constant-time compare)."""
    given = fields.get("sign")
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8"), sign_monetbil(fields, secret).encode("utf-8"))
