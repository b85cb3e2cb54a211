"""The sandbox's Monetbil (widget API v2.1 and check-payment API v1), over real HTTP.

    with MonetbilApi(service_key="svc_test_key", service_secret="svc_test_secret") as api:
        gateway = MonetbilApiGateway("svc_test_key", api.base_url)
        url = gateway.start_payment(amount=1500, currency="XAF", payment_ref="ord_1", ...)
        form = api.pay("ord_1")                     # marks the transaction, returns a signed callback
        requests.post(ingress + "/webhooks/monetbil", data=form)
        assert gateway.check_transaction(form["transaction_id"]).status == "succeeded"

What it serves
--------------
* ``POST /widget/v2.1/{service_key}`` -- start a payment. Form fields
  ``amount`` (positive number) and ``payment_ref`` are required,
  ``currency`` defaults to XAF; everything posted (``item_ref``,
  ``notify_url``, ``return_url``, ``phone``, ``email``, ``user``,
  ``first_name``...) is remembered by ``payment_ref`` (a second request with
  the same ref replaces the first). Answers 200
  ``{"success": true, "payment_url": "<base_url>/pay/<token>"}``; an unknown
  service key or a missing/bad field answers 200
  ``{"success": false, "message": ...}``, as Monetbil does.
* ``GET /pay/{token}`` -- a stand-in for the hosted payment page (200 HTML,
  404 for an unknown token). Paying happens through :meth:`MonetbilApi.pay`.
* ``POST /payment/v1/checkPayment`` -- form field ``paymentId``. A known
  transaction answers ``{"transaction": {"transaction_id", "status", "amount",
  "currency", "payment_ref", "msisdn", ...}, "message": ...}`` with ``status``
  an int: 1 success, 0 failed, -1 cancelled (``amount`` is a JSON number when
  it is integral). An unknown (or missing) ``paymentId`` answers 200
  ``{"message": "Transaction not found", "transaction": null}``.
* Anything else: 404 ``{"success": false, "message": "Not found"}``.

Query-string parameters are merged with the form body (body wins); blank
values are kept; a repeated field keeps its last value.

Failure injection (all thread-safe)
-------------------------------
Order per request: record -> injected failure -> refusal -> endpoint.
Widget and check faults are separate: one never consumes the other's.

* ``fail_next(n, status=500)`` / ``fail_all(status=500)``: widget requests
  answer ``status`` with ``{"success": false, "message": "Injected ..."}``
  (``fail_next`` calls queue up and win over ``fail_all``).
* ``refuse_all(message)``: widget requests answer 200 ``success: false``.
* ``check_fail_next(n, status=500)`` / ``check_fail_all(status=500)``: the
  same for checkPayment.
* ``heal()``: drops every injected failure and refusal (``delay`` stays).
* ``delay(seconds)``: every answer (all endpoints) is computed -- state
  changed -- and then held back ``seconds``: "Monetbil did it but we never
  heard back".
* ``set_transaction(id, status, **fields)``: create or update what
  checkPayment reports. ``checks(id)``: how many checkPayment requests named
  that ``paymentId`` (failed ones included).
* ``pay(payment_ref, ...)``: marks a transaction and returns the signed
  callback form Monetbil would POST to ``notify_url`` (it posts nothing).
"""

from __future__ import annotations

import contextlib
import copy
import html
import json
import re
import secrets
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from payfleet.sandbox.loopback import LoopbackServer, Reply
from payfleet.sandbox.signing import monetbil_sign

__all__ = [
    "CALLBACK_CHECK_STATUSES",
    "CHECK_PATH",
    "WIDGET_PREFIX",
    "MonetbilApi",
    "RecordedRequest",
]

WIDGET_PREFIX = "/widget/v2.1/"
CHECK_PATH = "/payment/v1/checkPayment"
PAY_PREFIX = "/pay/"
MAX_BODY = 1 << 20
DEFAULT_MSISDN = "237670000000"
DEFAULT_OPERATOR = "CM_MTNMOBILEMONEY"

# A callback ``status`` and the checkPayment status it leaves behind. Any
# other callback status (``pending``...) leaves the transaction as it was.
CALLBACK_CHECK_STATUSES: dict[str, int] = {
    "success": 1,
    "successful": 1,
    "completed": 1,
    "failed": 0,
    "failure": 0,
    "error": 0,
    "cancelled": -1,
    "canceled": -1,
}
_CHECK_MESSAGES = {1: "Payment successful", 0: "Payment failed", -1: "Payment cancelled"}
_AMOUNT_RE = re.compile(r"\d+(\.\d+)?")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the sandbox saw it. ``status`` is the HTTP status it answered."""

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    status: int
    time: float

    @property
    def form(self) -> dict[str, str]:
        return self.params

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


@dataclass
class _Answer:
    status: int
    body: Any
    content_type: str = "application/json"


@dataclass
class _Faults:
    """Injected failures for one endpoint family."""

    queue: deque[int] = field(default_factory=deque)
    always: int | None = None

    def take(self) -> int | None:
        return self.queue.popleft() if self.queue else self.always

    def clear(self) -> None:
        self.queue.clear()
        self.always = None


def _injected(status: int) -> _Answer:
    return _Answer(
        status, {"success": False, "message": f"Injected failure ({status}) from the Monetbil sandbox"}
    )


def _refusal(message: str) -> _Answer:
    return _Answer(200, {"success": False, "message": message})


def _json_amount(value: Any) -> Any:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


# --------------------------------------------------------------------------- the API


class MonetbilApi(LoopbackServer):
    """Monetbil's widget and check-payment APIs on 127.0.0.1 (see the module docstring)."""

    thread_name = "sandbox-monetbil"

    def __init__(
        self,
        service_key: str = "svc_test_key",
        service_secret: str = "svc_test_secret",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.service_key = service_key
        self.service_secret = service_secret
        # Where payment pages are served when this API is part of a larger
        # server (the sandbox) rather than started on its own.
        self.page_base: str | None = None
        # Where the payment page's buttons post (the sandbox's /sandbox/orders
        # routes), so a shop front's developer can pay as the customer would.
        self.actions_url: str | None = None
        super().__init__(host, port)
        self._payments: dict[str, dict[str, str]] = {}  # payment_ref -> posted widget form
        self._tokens: dict[str, str] = {}  # payment-page token -> payment_ref
        self._transactions: dict[str, dict[str, Any]] = {}
        self._checks: Counter[str] = Counter()
        self._requests: list[RecordedRequest] = []
        self._widget_faults = _Faults()
        self._check_faults = _Faults()
        self._refusal: str | None = None
        self._delay = 0.0
        self._internal_errors: list[str] = []

    # ---- state

    @property
    def payment_requests(self) -> dict[str, dict[str, str]]:
        """Every widget request that got a payment URL, by ``payment_ref`` (copies)."""
        with self._lock:
            return copy.deepcopy(self._payments)

    def payment_request(self, payment_ref: str) -> dict[str, str] | None:
        """The form posted to the widget for ``payment_ref`` (plus ``payment_url``), or None."""
        with self._lock:
            found = self._payments.get(payment_ref)
            return dict(found) if found is not None else None

    def set_transaction(self, transaction_id: str, status: int, **fields: Any) -> dict[str, Any]:
        """Create or update what checkPayment reports for ``transaction_id``; returns a copy."""
        with self._lock:
            transaction = self._transactions.setdefault(transaction_id, {"transaction_id": transaction_id})
            transaction.update(copy.deepcopy(fields))
            transaction["status"] = int(status)
            if "amount" in transaction:
                transaction["amount"] = _json_amount(transaction["amount"])
            return copy.deepcopy(transaction)

    def transaction(self, transaction_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._transactions.get(transaction_id)
            return copy.deepcopy(found) if found is not None else None

    @property
    def transactions(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._transactions)

    def checks(self, transaction_id: str) -> int:
        """How many checkPayment requests named ``transaction_id`` (whatever they were answered)."""
        with self._lock:
            return self._checks[transaction_id]

    def pay(
        self,
        payment_ref: str,
        *,
        status: str = "success",
        transaction_id: str | None = None,
        msisdn: str | None = None,
        secret: str | None = None,
        operator: str = DEFAULT_OPERATOR,
        **overrides: str | None,
    ) -> dict[str, str]:
        """Settle a payment and return the signed callback form Monetbil would POST to ``notify_url``.

        ``payment_ref`` must have gone through the widget, unless ``amount``
        is among ``overrides``. ``status`` is the callback's status; those in
        :data:`CALLBACK_CHECK_STATUSES` also set what checkPayment reports
        (others, like ``pending``, leave it as it was). ``transaction_id``
        defaults to a fresh one; ``msisdn`` to the widget's ``phone``, else
        237670000000; ``secret`` to the API's ``service_secret``.
        ``overrides`` replace or add callback fields before signing; a None
        value removes the field.
        """
        with self._lock:
            request = self._payments.get(payment_ref)
            if request is None and overrides.get("amount") is None:
                raise KeyError(
                    f"no widget request for payment_ref {payment_ref!r} (pass amount= to pay anyway)"
                )
            request = request or {}
            tx_id = transaction_id or _new_transaction_id()
            form: dict[str, str] = {
                "service": self.service_key,
                "transaction_id": tx_id,
                "transaction_uuid": str(uuid.uuid4()),
                "payment_ref": payment_ref,
                "item_ref": request.get("item_ref", ""),
                "status": status,
                "message": _CHECK_MESSAGES.get(CALLBACK_CHECK_STATUSES.get(status, 99), status),
                "amount": request.get("amount", ""),
                "fee": "0",
                "currency": request.get("currency", "XAF"),
                "msisdn": msisdn or request.get("phone") or DEFAULT_MSISDN,
                "operator": operator,
                "country_iso": "CM",
                "first_name": request.get("first_name", ""),
                "last_name": request.get("last_name", ""),
                "email": request.get("email", ""),
                "user": request.get("user", ""),
            }
            for key, value in overrides.items():
                if value is None:
                    form.pop(key, None)
                else:
                    form[key] = value
            check_status = CALLBACK_CHECK_STATUSES.get(status)
            if check_status is not None:
                self.set_transaction(
                    tx_id,
                    check_status,
                    **{
                        k: form[k]
                        for k in (
                            "transaction_uuid",
                            "amount",
                            "currency",
                            "payment_ref",
                            "msisdn",
                            "operator",
                        )
                        if k in form
                    },
                )
            form.pop("sign", None)
            form["sign"] = monetbil_sign(form, self.service_secret if secret is None else secret)
            return form

    # ---- request log

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, path_prefix: str = "", method: str | None = None) -> int:
        """How many requests had a path starting with ``path_prefix`` (and ``method``, if given)."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if r.path.startswith(path_prefix) and (method is None or r.method == method.upper())
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

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next ``n`` widget requests answer ``status`` (calls queue up)."""
        with self._lock:
            self._widget_faults.queue.extend([status] * n)

    def fail_all(self, status: int = 500) -> None:
        """Every widget request answers ``status`` until :meth:`heal`."""
        with self._lock:
            self._widget_faults.always = status

    def refuse_all(self, message: str = "Payment refused") -> None:
        """Every widget request answers 200 ``{"success": false, "message": message}`` until :meth:`heal`."""
        with self._lock:
            self._refusal = message

    def check_fail_next(self, n: int, status: int = 500) -> None:
        """The next ``n`` checkPayment requests answer ``status`` (calls queue up)."""
        with self._lock:
            self._check_faults.queue.extend([status] * n)

    def check_fail_all(self, status: int = 500) -> None:
        """Every checkPayment request answers ``status`` until :meth:`heal`."""
        with self._lock:
            self._check_faults.always = status

    def heal(self) -> None:
        """Drop every injected failure and refusal, widget and check alike; ``delay`` stays."""
        with self._lock:
            self._widget_faults.clear()
            self._check_faults.clear()
            self._refusal = None

    def delay(self, seconds: float | None) -> None:
        """Hold every answer back ``seconds`` (state is changed before the wait); None or 0: off."""
        with self._lock:
            self._delay = float(seconds or 0.0)

    # ---- internals

    def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        answer, delay = self._dispatch(method, path, headers, body)
        if answer.content_type == "application/json":
            payload = json.dumps(answer.body).encode("utf-8")
        else:
            payload = str(answer.body).encode("utf-8")
        return Reply(answer.status, payload, {"Content-Type": answer.content_type}, delay)

    def _dispatch(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[_Answer, float]:
        with self._lock:
            split = urlsplit(raw_path)
            params = dict(parse_qsl(split.query, keep_blank_values=True))
            # A body that is not a form leaves the endpoint to name the fields it lacks.
            with contextlib.suppress(UnicodeDecodeError):
                params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            try:
                answer = self._route(method.upper(), split.path, params)
            except Exception:
                self._internal_errors.append(traceback.format_exc())
                answer = _Answer(500, {"success": False, "message": "Monetbil sandbox internal error"})
            self._requests.append(
                RecordedRequest(method.upper(), split.path, params, headers, answer.status, time.time())
            )
            return answer, self._delay

    def _route(self, method: str, path: str, params: dict[str, str]) -> _Answer:
        if method == "POST" and path.startswith(WIDGET_PREFIX):
            return self._widget(path[len(WIDGET_PREFIX) :], params)
        if path == CHECK_PATH and method in ("POST", "GET"):
            return self._check(params)
        if method == "GET" and path.startswith(PAY_PREFIX):
            return self._payment_page(path[len(PAY_PREFIX) :])
        return _Answer(404, {"success": False, "message": "Not found"})

    def _widget(self, service_key: str, params: dict[str, str]) -> _Answer:
        status = self._widget_faults.take()
        if status is not None:
            return _injected(status)
        if self._refusal is not None:
            return _refusal(self._refusal)
        if service_key.strip("/") != self.service_key:
            return _refusal("Invalid service key")
        problem = _widget_problem(params)
        if problem is not None:
            return _refusal(problem)
        token = secrets.token_hex(16)
        payment_url = f"{self.page_base or self.base_url}{PAY_PREFIX}{token}"
        self._payments[params["payment_ref"]] = {
            "currency": "XAF",
            **params,
            "payment_url": payment_url,
        }
        self._tokens[token] = params["payment_ref"]
        return _Answer(200, {"success": True, "payment_url": payment_url})

    def _check(self, params: dict[str, str]) -> _Answer:
        payment_id = params.get("paymentId", "")
        self._checks[payment_id] += 1
        status = self._check_faults.take()
        if status is not None:
            return _injected(status)
        transaction = self._transactions.get(payment_id) if payment_id else None
        if transaction is None:
            return _Answer(200, {"message": "Transaction not found", "transaction": None})
        message = _CHECK_MESSAGES.get(transaction["status"], "Transaction found")
        return _Answer(200, {"transaction": copy.deepcopy(transaction), "message": message})

    def _payment_page(self, token: str) -> _Answer:
        payment_ref = self._tokens.get(token)
        if payment_ref is None:
            return _Answer(404, "<h1>Unknown payment</h1>", "text/html; charset=utf-8")
        page = f"<h1>Monetbil sandbox</h1><p>Payment {html.escape(payment_ref)}</p>"
        if self.actions_url is not None:
            target = f"{self.actions_url}/{quote(payment_ref, safe='')}"
            page += "".join(
                f'<form method="post" action="{html.escape(target)}/{action}"><button>{label}</button></form>'
                for action, label in (("pay", "Pay"), ("fail", "Fail"), ("cancel", "Cancel"))
            )
        return _Answer(200, page, "text/html; charset=utf-8")


def _widget_problem(params: dict[str, str]) -> str | None:
    amount = params.get("amount", "")
    if not amount:
        return "Missing parameter: amount"
    if not _AMOUNT_RE.fullmatch(amount) or float(amount) <= 0:
        return f"Invalid amount: {amount}"
    if not params.get("payment_ref"):
        return "Missing parameter: payment_ref"
    return None


def _new_transaction_id() -> str:
    # Monetbil transaction ids look like a timestamp followed by a counter.
    return time.strftime("%y%m%d%H%M%S") + "".join(secrets.choice("0123456789") for _ in range(12))
