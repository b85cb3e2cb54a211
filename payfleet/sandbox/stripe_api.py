"""The sandbox's Stripe API (v1, PaymentIntents only), spoken over real HTTP.

Point the *real* ``stripe`` library (v16) at it::

    with StripeApi() as api:
        client = stripe.StripeClient(
            "sk_test_anything",
            base_addresses={"api": api.base_url},
            max_network_retries=0,
        )
        pi = client.v1.payment_intents.create(
            params={"amount": 1500, "currency": "eur", "metadata": {"order_id": "42"}},
            options={"idempotency_key": "order-42"},
        )
        api.set_status(pi.id, "succeeded")

(``api.client(**kwargs)`` builds exactly that client.)

What it serves
--------------
* ``POST /v1/payment_intents`` -- create (``amount`` positive integer and
  ``currency`` required; other parameters are accepted and echoed into the
  object, ``confirm`` and friends have no effect; status starts at
  ``requires_payment_method``).
* ``GET /v1/payment_intents/{id}`` -- retrieve (404 ``resource_missing``).
* ``POST /v1/payment_intents/{id}/cancel`` -- cancel, optional
  ``cancellation_reason``; from ``succeeded`` or ``canceled`` it answers 400
  ``payment_intent_unexpected_state`` (the error carries the intent, like
  Stripe's).
* ``GET /v1/payment_intents`` -- list, newest first, ``limit`` (1..100,
  default 10), ``starting_after``, ``ending_before``, ``created`` (exact) and
  ``created[gt|gte|lt|lte]``; ``{"object": "list", "url": ..., "has_more": ...}``
  so ``auto_paging_iter()`` pages through everything.
* Anything else: 404 ``invalid_request_error`` "Unrecognized request URL".

Bodies and query strings are form-encoded the way the library sends them
(``metadata[k]=v``, ``created[gte]=1``, ``payment_method_types[0]=card``)
and parsed into nested dicts/lists; values stay strings except where a field
is known to be an integer or boolean. ``Authorization: Bearer sk_...`` is
required (any ``sk_`` key); otherwise 401 in Stripe's error shape.

Idempotency (POST only, like Stripe): a request whose ``Idempotency-Key`` was
seen before on the same endpoint with the same parameters gets the stored
answer again, with ``Idempotent-Replayed: true`` and ``Original-Request``
headers; same key with other parameters or another endpoint answers 400
``idempotency_error`` (``stripe.IdempotencyError``). As at Stripe, only
requests that got as far as executing are stored: successes and the
``payment_intent_unexpected_state`` refusal; parameter validation errors and
every injected failure (``fail_next``, ``fail_all``, ``rate_limit``) are not,
so a retry with the same key after an injected 500 really executes. Keys are
global to the sandbox (not scoped per API key). Requests are handled one at a
time under the lock, so there is no "request in progress" 409.

Failure injection (all thread-safe)
-------------------------------
Order per request: record -> rate limit -> injected failure -> auth ->
endpoint. ``delay`` applies to every answer, whatever it is.

What stripe v16 does against them (read from ``stripe/_http_client.py`` and
``stripe/_api_requestor.py``):

* Retries: ``StripeClient(..., max_network_retries=None)`` (the default)
  does **not** retry at all -- ``None`` reaches ``HTTPClient._should_retry``
  which treats it as 0. The module-level ``stripe.max_network_retries = 2``
  only applies to the legacy global API (``stripe.PaymentIntent.create``).
  Pass ``max_network_retries=N`` to the client, or per call in
  ``options={"max_network_retries": N}``.
* When retries are on, the library retries: connection errors and timeouts
  (``requests`` ``Timeout``/``ConnectionError``), any 409, any status >= 500,
  and anything carrying ``Stripe-Should-Retry: true``; never when the answer
  carries ``Stripe-Should-Retry: false``. Back-off between tries is
  0.5 s * 2**(n-1) with jitter, never below 0.5 s nor above 5 s
  (``HTTPClient._sleep_time_seconds``; monkeypatch it to go fast). Every try
  of one call sends the *same* headers, hence the same ``Idempotency-Key``
  (the library generates a UUID one for every POST when none is given).
* ``fail_next(n, 500)`` / ``fail_all(500)``: ``stripe.APIError``; retried when
  retries are on (unless ``should_retry=False``). 4xx: 400/404 ->
  ``InvalidRequestError`` (``IdempotencyError`` if the type is
  ``idempotency_error``), 401 -> ``AuthenticationError``, 402 ->
  ``CardError``, 403 -> ``PermissionError``, 409 -> ``APIError`` (retried),
  other -> ``APIError``; not retried unless ``should_retry=True``.
* ``rate_limit(n)``: 429 -> ``stripe.RateLimitError`` (a ``StripeError``, *not*
  an ``InvalidRequestError``). The library does **not** retry a 429 unless it
  carries ``Stripe-Should-Retry: true`` (``rate_limit(n, should_retry=True)``).
* ``delay(s)``: the answer is computed (and state changed!) first, then the
  handler sleeps ``s`` before writing it -- the "Stripe did it but we never
  heard back" case. The default ``RequestsClient`` timeout is 80 s; use
  ``StripeClient(..., http_client=stripe.RequestsClient(timeout=0.5))`` to
  see ``stripe.APIConnectionError``, which is retried (same
  Idempotency-Key) when retries are on.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import string
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

from payfleet.sandbox.loopback import LoopbackServer, Reply

__all__ = [
    "CANCELABLE_STATUSES",
    "PAYMENT_INTENT_STATUSES",
    "RecordedRequest",
    "StripeApi",
    "parse_stripe_form",
]

PAYMENT_INTENT_STATUSES = frozenset(
    {
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "canceled",
        "succeeded",
    }
)
CANCELABLE_STATUSES = frozenset(
    {
        "requires_payment_method",
        "requires_capture",
        "requires_confirmation",
        "requires_action",
        "processing",
    }
)
CANCELLATION_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})
API_VERSION = stripe.api_version
LIST_URL = "/v1/payment_intents"
MAX_BODY = 1 << 20

_ALNUM = string.ascii_letters + string.digits
_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SUBKEY_RE = re.compile(r"\[([^\[\]]*)\]")
_PI_PATH_RE = re.compile(r"^/v1/payment_intents/([^/]+)$")
_PI_CANCEL_RE = re.compile(r"^/v1/payment_intents/([^/]+)/cancel$")
# Fields (outside metadata) that Stripe types as integers / booleans.
_INT_FIELDS = frozenset({"amount", "application_fee_amount", "amount_capturable", "amount_received"})
_BOOL_STRINGS = {"true": True, "false": False}


def is_live_key(key: str) -> bool:
    """A key that moves real money: the sandbox never takes one."""
    return key.startswith(("sk_live_", "rk_live_"))


def _rand(n: int) -> str:
    # One read of the OS's randomness per id (not one per character).
    return "".join(_ALNUM[byte % len(_ALNUM)] for byte in secrets.token_bytes(n))


# --------------------------------------------------------------------------- form parsing


class FormError(ValueError):
    """A form-encoded body/query that cannot be turned into nested params."""


def parse_stripe_form(encoded: str) -> dict[str, Any]:
    """Parse Stripe's form encoding into nested dicts and lists.

    ``a[b][c]=1`` -> ``{"a": {"b": {"c": "1"}}}``; ``l[0]=x&l[1]=y`` and
    ``l[]=x&l[]=y`` -> ``{"l": ["x", "y"]}`` (except under ``metadata``,
    whose keys are always keys). Values stay strings.
    """
    root: dict[str, Any] = {}
    for key, value in parse_qsl(encoded, keep_blank_values=True):
        match = _KEY_RE.match(key)
        parts = [match.group(1), *_SUBKEY_RE.findall(match.group(2))] if match else [key]
        node = root
        for part in parts[:-1]:
            name = part if part != "" else str(len(node))
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise FormError(f"Invalid hash: {key!r} mixes a value and nested keys")
            node = child
        last = parts[-1] if parts[-1] != "" else str(len(node))
        if isinstance(node.get(last), dict):
            raise FormError(f"Invalid hash: {key!r} mixes a value and nested keys")
        node[last] = value
    return {
        k: _listify(v, under_metadata=(k == "metadata")) if isinstance(v, dict) else v
        for k, v in root.items()
    }


def _listify(node: dict[str, Any], *, under_metadata: bool) -> Any:
    out: dict[str, Any] = {}
    for key, value in node.items():
        out[key] = _listify(value, under_metadata=(key == "metadata")) if isinstance(value, dict) else value
    if not under_metadata and out and all(k.isdigit() for k in out):
        indexes = sorted(int(k) for k in out)
        if indexes == list(range(len(indexes))):
            return [out[str(i)] for i in indexes]
    return out


def _coerce(value: Any, key: str = "") -> Any:
    """Turn "true"/"false" into bools and known integer fields into ints (not in metadata)."""
    if key == "metadata":
        return value
    if isinstance(value, dict):
        return {k: _coerce(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, str):
        if value in _BOOL_STRINGS:
            return _BOOL_STRINGS[value]
        if key in _INT_FIELDS and re.fullmatch(r"-?\d+", value):
            return int(value)
    return value


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the sandbox saw it. ``status`` is the HTTP status it answered."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    status: int
    time: float
    request_id: str

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None

    @property
    def idempotency_key(self) -> str | None:
        return self.header("Idempotency-Key")


@dataclass
class _Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    # May this answer be stored for idempotent replay (the endpoint "started executing")?
    storable: bool = False


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str | None
    error_type: str
    message: str
    should_retry: bool | None


@dataclass(frozen=True)
class _IdempotentEntry:
    path: str
    params: dict[str, Any]
    answer: _Answer
    request_id: str


def _error(
    status: int,
    error_type: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    extra: dict[str, Any] | None = None,
    storable: bool = False,
) -> _Answer:
    err: dict[str, Any] = {"type": error_type, "message": message}
    if code is not None:
        err["code"] = code
        err["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param is not None:
        err["param"] = param
    if extra:
        err.update(extra)
    return _Answer(status, {"error": err}, storable=storable)


def _default_error_type(status: int) -> str:
    if status >= 500:
        return "api_error"
    if status == 402:
        return "card_error"
    return "invalid_request_error"


# --------------------------------------------------------------------------- the API


class StripeApi(LoopbackServer):
    """A Stripe API v1 (PaymentIntents) server on 127.0.0.1, for the real ``stripe`` library.

    See the module docstring for the endpoints and for what stripe v16 does
    against each control.
    """

    thread_name = "sandbox-stripe"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._intents: dict[str, dict[str, Any]] = {}
        self._order: dict[str, int] = {}  # id -> insertion sequence (tie-break for equal `created`)
        self._seq = 0
        self._requests: list[RecordedRequest] = []
        self._idempotency: dict[str, _IdempotentEntry] = {}
        self._failures: deque[_Failure] = deque()
        self._fail_all: _Failure | None = None
        self._rate_limit: int | None = None
        self._rate_limit_should_retry: bool | None = None
        self._window_start = 0.0
        self._window_count = 0
        self._throttled = 0
        self._delay = 0.0
        self._internal_errors: list[str] = []

    def client(self, api_key: str = "sk_test_sandbox", **kwargs: Any) -> stripe.StripeClient:
        """A real ``stripe.StripeClient`` aimed at this API (kwargs go to its constructor)."""
        return stripe.StripeClient(api_key, base_addresses={"api": self.base_url}, **kwargs)

    # ---- state controls

    def add_payment_intent(self, **fields: Any) -> dict[str, Any]:
        """Seed an intent; any field may be given (``id``, ``created``, ``status``...). Returns a copy."""
        with self._lock:
            pi_id = fields.get("id") or f"pi_{_rand(24)}"
            if pi_id in self._intents:
                raise ValueError(f"payment intent {pi_id} already exists")
            status = fields.get("status", "requires_payment_method")
            if status not in PAYMENT_INTENT_STATUSES:
                raise ValueError(f"unknown PaymentIntent status {status!r}")
            intent = self._new_intent(
                pi_id,
                amount=int(fields.get("amount", 1000)),
                currency=str(fields.get("currency", "eur")),
                metadata=dict(fields.get("metadata") or {}),
                created=int(fields.get("created", time.time())),
            )
            normalized = ("id", "amount", "currency", "metadata", "created", "status")
            intent.update(copy.deepcopy({k: v for k, v in fields.items() if k not in normalized}))
            self._apply_status_side_effects(intent, status)
            self._store(intent)
            return copy.deepcopy(intent)

    def set_status(self, pi_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Move an intent to ``status`` (KeyError if unknown), optionally updating other fields."""
        if status not in PAYMENT_INTENT_STATUSES:
            raise ValueError(f"unknown PaymentIntent status {status!r}")
        with self._lock:
            intent = self._intents[pi_id]
            intent.update(copy.deepcopy(fields))
            self._apply_status_side_effects(intent, status)
            return copy.deepcopy(intent)

    def intent_for_order(self, order_id: str) -> dict[str, Any] | None:
        """The newest intent whose ``metadata[order_id]`` is ``order_id`` (a copy), or None."""
        with self._lock:
            found = [i for i in self._intents.values() if i["metadata"].get("order_id") == order_id]
            newest = max(found, key=lambda i: self._order[i["id"]], default=None)
            return copy.deepcopy(newest) if newest is not None else None

    @property
    def payment_intents(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._intents)

    def get(self, pi_id: str) -> dict[str, Any] | None:
        with self._lock:
            intent = self._intents.get(pi_id)
            return copy.deepcopy(intent) if intent is not None else None

    # ---- request log

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """How many requests matched ``method`` (any if None, case-insensitive) and path prefix."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (method is None or r.method == method.upper()) and r.path.startswith(path_prefix)
            )

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of bugs in the sandbox itself (answered as 500); should stay empty."""
        with self._lock:
            return list(self._internal_errors)

    # ---- fault controls

    def fail_next(
        self,
        n: int,
        status: int = 500,
        code: str | None = "api_error",
        *,
        error_type: str | None = None,
        message: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        """The next ``n`` requests answer ``status`` in Stripe's error shape (calls queue up).

        ``should_retry`` sends ``Stripe-Should-Retry: true/false``; None sends nothing.
        """
        failure = self._failure(status, code, error_type, message, should_retry)
        with self._lock:
            self._failures.extend([failure] * n)

    def fail_all(
        self,
        status: int = 500,
        code: str | None = "api_error",
        *,
        error_type: str | None = None,
        message: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        """Every request answers ``status`` until :meth:`heal`."""
        failure = self._failure(status, code, error_type, message, should_retry)
        with self._lock:
            self._fail_all = failure

    def heal(self) -> None:
        """Drop injected failures (``fail_next`` queue and ``fail_all``); rate limit and delay stay."""
        with self._lock:
            self._failures.clear()
            self._fail_all = None

    def rate_limit(self, max_per_second: int | None, *, should_retry: bool | None = None) -> None:
        """Answer 429 past ``max_per_second`` requests in the current one-second window; None: off."""
        with self._lock:
            self._rate_limit = max_per_second
            self._rate_limit_should_retry = should_retry
            self._window_start = time.monotonic()
            self._window_count = 0

    @property
    def throttled(self) -> int:
        """How many 429s the rate limit has answered."""
        with self._lock:
            return self._throttled

    def delay(self, seconds: float | None) -> None:
        """Sleep ``seconds`` before writing each answer (state is changed before the sleep)."""
        with self._lock:
            self._delay = float(seconds or 0.0)

    # ---- internals: dispatch

    @staticmethod
    def _failure(
        status: int, code: str | None, error_type: str | None, message: str | None, should_retry: bool | None
    ) -> _Failure:
        return _Failure(
            status=status,
            code=code,
            error_type=error_type or _default_error_type(status),
            message=message or f"Injected failure ({status}) from the Stripe sandbox.",
            should_retry=should_retry,
        )

    def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        answer, delay = self._dispatch(method, path, headers, body)
        payload = json.dumps(answer.body, indent=2).encode("utf-8")
        extra = {"Content-Type": "application/json", "Stripe-Version": API_VERSION}
        return Reply(answer.status, payload, {**extra, **answer.headers}, delay)

    def _dispatch(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[_Answer, float]:
        request_id = f"req_{_rand(14)}"
        with self._lock:
            split = urlsplit(raw_path)
            path = split.path
            try:
                params = parse_stripe_form(split.query)
                if body:
                    params.update(parse_stripe_form(body.decode("utf-8")))
                form_error: str | None = None
            except (FormError, UnicodeDecodeError) as exc:
                params, form_error = {}, str(exc)
            try:
                answer = self._answer(method, path, params, headers, form_error, request_id)
            except Exception:
                self._internal_errors.append(traceback.format_exc())
                answer = _error(500, "api_error", "Stripe sandbox internal error (see internal_errors)")
            answer.headers.setdefault("Request-Id", request_id)
            key = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)
            if key is not None:
                answer.headers["Idempotency-Key"] = key  # Stripe echoes it (StripeResponse.idempotency_key)
            self._requests.append(
                RecordedRequest(
                    method=method.upper(),
                    path=path,
                    params=params,
                    headers=dict(headers),
                    status=answer.status,
                    time=time.time(),
                    request_id=request_id,
                )
            )
            return answer, self._delay

    def _answer(
        self,
        method: str,
        path: str,
        params: dict[str, Any],
        headers: dict[str, str],
        form_error: str | None,
        request_id: str,
    ) -> _Answer:
        throttled = self._check_rate_limit()
        if throttled is not None:
            return throttled
        failure = self._failures.popleft() if self._failures else self._fail_all
        if failure is not None:
            answer = _error(failure.status, failure.error_type, failure.message, code=failure.code)
            if failure.should_retry is not None:
                answer.headers["Stripe-Should-Retry"] = "true" if failure.should_retry else "false"
            return answer
        lowered = {k.lower(): v for k, v in headers.items()}
        auth = lowered.get("authorization", "")
        api_key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if not api_key.startswith("sk_") or is_live_key(api_key):
            answer = _error(
                401,
                "invalid_request_error",
                "Invalid API Key provided. The sandbox accepts any test secret key (not 'sk_live_') "
                "sent as 'Authorization: Bearer sk_...'.",
            )
            answer.headers["WWW-Authenticate"] = 'Basic realm="Stripe"'
            return answer
        if form_error is not None:
            return _error(400, "invalid_request_error", form_error)

        method = method.upper()
        key = lowered.get("idempotency-key")
        if method == "POST" and key:
            entry = self._idempotency.get(key)
            if entry is not None:
                return self._replay(key, entry, path, params)
        answer = self._route(method, path, params)
        if method == "POST" and key and answer.storable:
            self._idempotency[key] = _IdempotentEntry(
                path=path, params=copy.deepcopy(params), answer=copy.deepcopy(answer), request_id=request_id
            )
        return answer

    def _replay(self, key: str, entry: _IdempotentEntry, path: str, params: dict[str, Any]) -> _Answer:
        if entry.path != path:
            return _error(
                400,
                "idempotency_error",
                f"Keys for idempotent requests can only be used for the same endpoint they were first "
                f"used for ('{entry.path}' vs '{path}'). Try using a key other than '{key}' if you meant "
                f"to execute a different request.",
            )
        if entry.params != params:
            return _error(
                400,
                "idempotency_error",
                f"Keys for idempotent requests can only be used with the same parameters they were first "
                f"used with. Try using a key other than '{key}' if you meant to execute a different "
                f"request.",
            )
        stored = copy.deepcopy(entry.answer)
        stored.headers["Idempotent-Replayed"] = "true"
        stored.headers["Original-Request"] = entry.request_id
        return stored

    def _check_rate_limit(self) -> _Answer | None:
        if self._rate_limit is None:
            return None
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count <= self._rate_limit:
            return None
        self._throttled += 1
        answer = _error(
            429,
            "invalid_request_error",
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
            code="rate_limit",
        )
        if self._rate_limit_should_retry is not None:
            answer.headers["Stripe-Should-Retry"] = "true" if self._rate_limit_should_retry else "false"
        return answer

    def _route(self, method: str, path: str, params: dict[str, Any]) -> _Answer:
        if path == LIST_URL:
            if method == "POST":
                return self._create(params)
            if method == "GET":
                return self._list(params)
        elif (m := _PI_CANCEL_RE.match(path)) and method == "POST":
            return self._cancel(m.group(1), params)
        elif (m := _PI_PATH_RE.match(path)) and method == "GET":
            return self._retrieve(m.group(1))
        return _error(
            404,
            "invalid_request_error",
            f"Unrecognized request URL ({method}: {path}). The Stripe sandbox only serves PaymentIntent "
            f"create, retrieve, cancel and list.",
        )

    # ---- internals: endpoints

    def _create(self, params: dict[str, Any]) -> _Answer:
        raw_amount = params.get("amount")
        if raw_amount is None or raw_amount == "":
            return _error(
                400,
                "invalid_request_error",
                "Missing required param: amount.",
                code="parameter_missing",
                param="amount",
            )
        if not isinstance(raw_amount, str) or not re.fullmatch(r"-?\d+", raw_amount):
            return _error(
                400,
                "invalid_request_error",
                f"Invalid integer: {raw_amount}",
                code="parameter_invalid_integer",
                param="amount",
            )
        amount = int(raw_amount)
        if amount < 1:
            return _error(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1.",
                code="parameter_invalid_integer",
                param="amount",
            )
        currency = params.get("currency")
        if currency is None or currency == "":
            return _error(
                400,
                "invalid_request_error",
                "Missing required param: currency.",
                code="parameter_missing",
                param="currency",
            )
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
            return _error(
                400,
                "invalid_request_error",
                f"Invalid currency: {currency}.",
                code="parameter_invalid_string",
                param="currency",
            )
        metadata = params.get("metadata") or {}
        problem = self._check_metadata(metadata)
        if problem is not None:
            return problem
        capture_method = params.get("capture_method", "automatic")
        if capture_method not in ("automatic", "automatic_async", "manual"):
            return _error(
                400,
                "invalid_request_error",
                f"Invalid capture_method: {capture_method}",
                code="parameter_invalid_string",
                param="capture_method",
            )

        intent = self._new_intent(
            f"pi_{_rand(24)}",
            amount=amount,
            currency=currency.lower(),
            metadata={k: v for k, v in metadata.items() if v != ""},
            created=int(time.time()),
        )
        intent["capture_method"] = capture_method
        for key, value in params.items():
            if key not in ("amount", "currency", "metadata", "capture_method", "expand"):
                intent[key] = _coerce(value, key)
        self._store(intent)
        return _Answer(200, copy.deepcopy(intent), storable=True)

    @staticmethod
    def _check_metadata(metadata: Any) -> _Answer | None:
        if metadata == "":
            return None
        if not isinstance(metadata, dict):
            return _error(
                400,
                "invalid_request_error",
                "Invalid object",
                code="parameter_invalid_object",
                param="metadata",
            )
        if len(metadata) > 50:
            return _error(
                400,
                "invalid_request_error",
                "You can specify up to 50 keys.",
                code="parameter_invalid_object",
                param="metadata",
            )
        for k, v in metadata.items():
            if len(k) > 40 or not isinstance(v, str) or len(v) > 500:
                return _error(
                    400,
                    "invalid_request_error",
                    "Metadata keys can be up to 40 characters and values are strings up to 500 "
                    "characters long.",
                    code="parameter_invalid_string",
                    param=f"metadata[{k}]",
                )
        return None

    def _retrieve(self, pi_id: str) -> _Answer:
        intent = self._intents.get(pi_id)
        if intent is None:
            return self._missing(pi_id, "intent", 404)
        return _Answer(200, copy.deepcopy(intent))

    def _cancel(self, pi_id: str, params: dict[str, Any]) -> _Answer:
        intent = self._intents.get(pi_id)
        if intent is None:
            return self._missing(pi_id, "intent", 404)
        reason = params.get("cancellation_reason")
        if reason is not None and reason not in CANCELLATION_REASONS:
            return _error(
                400,
                "invalid_request_error",
                f"Invalid cancellation_reason: must be one of {', '.join(sorted(CANCELLATION_REASONS))}",
                code="parameter_invalid_string" if isinstance(reason, str) else "parameter_invalid_object",
                param="cancellation_reason",
            )
        status = intent["status"]
        if status not in CANCELABLE_STATUSES:
            return _error(
                400,
                "invalid_request_error",
                f"You cannot cancel this PaymentIntent because it has a status of {status}. Only a "
                f"PaymentIntent with one of the following statuses may be canceled: "
                f"requires_payment_method, requires_capture, requires_confirmation, requires_action, "
                f"processing.",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(intent)},
                storable=True,
            )
        intent["cancellation_reason"] = reason
        self._apply_status_side_effects(intent, "canceled")
        return _Answer(200, copy.deepcopy(intent), storable=True)

    def _list(self, params: dict[str, Any]) -> _Answer:
        raw_limit = params.get("limit", "10")
        if not isinstance(raw_limit, str) or not raw_limit.isdigit():
            return _error(
                400,
                "invalid_request_error",
                f"Invalid integer: {raw_limit}",
                code="parameter_invalid_integer",
                param="limit",
            )
        limit = int(raw_limit)
        if not 1 <= limit <= 100:
            return _error(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1 and less than or equal to 100.",
                code="parameter_invalid_integer",
                param="limit",
            )

        bounds: list[tuple[str, int]] = []
        created = params.get("created")
        if isinstance(created, str):
            created = {"eq": created}
        if isinstance(created, dict):
            for op, raw in created.items():
                if op not in ("eq", "gt", "gte", "lt", "lte"):
                    return _error(
                        400,
                        "invalid_request_error",
                        f"Received unknown parameter: created[{op}]",
                        code="parameter_unknown",
                        param=f"created[{op}]",
                    )
                if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
                    return _error(
                        400,
                        "invalid_request_error",
                        f"Invalid integer: {raw}",
                        code="parameter_invalid_integer",
                        param=f"created[{op}]",
                    )
                bounds.append((op, int(raw)))
        elif created is not None:
            return _error(
                400,
                "invalid_request_error",
                "Invalid created filter",
                code="parameter_invalid_integer",
                param="created",
            )

        def matches(intent: dict[str, Any]) -> bool:
            c = int(intent["created"])
            checks = {
                "eq": lambda v: c == v,
                "gt": lambda v: c > v,
                "gte": lambda v: c >= v,
                "lt": lambda v: c < v,
                "lte": lambda v: c <= v,
            }
            return all(checks[op](v) for op, v in bounds)

        ordered = sorted(
            self._intents.values(),
            key=lambda i: (int(i["created"]), self._order[i["id"]]),
            reverse=True,
        )
        ids = [i["id"] for i in ordered]
        starting_after = params.get("starting_after")
        ending_before = params.get("ending_before")
        if starting_after:
            if starting_after not in self._intents:
                return self._missing(str(starting_after), "starting_after", 400)
            candidates = ordered[ids.index(starting_after) + 1 :]
            candidates = [i for i in candidates if matches(i)]
            page, has_more = candidates[:limit], len(candidates) > limit
        elif ending_before:
            if ending_before not in self._intents:
                return self._missing(str(ending_before), "ending_before", 400)
            candidates = [i for i in ordered[: ids.index(ending_before)] if matches(i)]
            page, has_more = candidates[-limit:], len(candidates) > limit
        else:
            candidates = [i for i in ordered if matches(i)]
            page, has_more = candidates[:limit], len(candidates) > limit
        return _Answer(
            200,
            {
                "object": "list",
                "data": copy.deepcopy(page),
                "has_more": has_more,
                "url": LIST_URL,
            },
        )

    @staticmethod
    def _missing(pi_id: str, param: str, status: int) -> _Answer:
        return _error(
            status,
            "invalid_request_error",
            f"No such payment_intent: '{pi_id}'",
            code="resource_missing",
            param=param,
        )

    # ---- internals: objects

    def _store(self, intent: dict[str, Any]) -> None:
        self._seq += 1
        self._order[intent["id"]] = self._seq
        self._intents[intent["id"]] = intent

    @staticmethod
    def _apply_status_side_effects(intent: dict[str, Any], status: str) -> None:
        intent["status"] = status
        if status == "succeeded":
            intent["amount_received"] = intent.get("amount", 0)
            intent["amount_capturable"] = 0
        elif status == "requires_capture":
            intent["amount_capturable"] = intent.get("amount", 0)
        elif status == "canceled":
            intent["amount_capturable"] = 0
            if intent.get("canceled_at") is None:
                intent["canceled_at"] = int(time.time())

    @staticmethod
    def _new_intent(
        pi_id: str, *, amount: int, currency: str, metadata: dict[str, Any], created: int
    ) -> dict[str, Any]:
        return {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_received": 0,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic",
            "client_secret": f"{pi_id}_secret_{_rand(25)}",
            "confirmation_method": "automatic",
            "created": created,
            "currency": currency,
            "customer": None,
            "description": None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": metadata,
            "next_action": None,
            "payment_method": None,
            "payment_method_types": ["card"],
            "status": "requires_payment_method",
        }
