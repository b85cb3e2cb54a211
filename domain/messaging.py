"""Outgoing customer messages: WhatsApp through a Twilio-compatible Messages
API over HTTP. The base address and credentials are configurable, so tests
point the real client at a local fake."""

from __future__ import annotations

from typing import Protocol

import requests
from urllib3.exceptions import NewConnectionError

from domain.gateways import trace_headers


class MessagingError(Exception):
    """The message was not accepted, or may not have been. `retryable` says
    whether waiting can help: an outage, a 5xx or a 429 can; a refused number
    or bad credentials cannot. `ambiguous`: the request may have reached the
    API (no answer read), so sending again could deliver it twice."""

    def __init__(self, detail: str, *, retryable: bool, ambiguous: bool = False) -> None:
        super().__init__(detail)
        self.retryable = retryable
        self.ambiguous = ambiguous


class WhatsAppGateway(Protocol):
    def send(self, *, to: str, body: str) -> str:
        """Send a message; returns the provider's message id."""
        ...


class WhatsAppApiGateway:
    """POST {base}/2010-04-01/Accounts/{sid}/Messages.json with To, From and
    Body as form fields and HTTP basic auth (account sid, auth token)."""

    def __init__(
        self, api_base: str, account_sid: str, auth_token: str, sender: str, *, timeout: float = 10.0
    ) -> None:
        self._url = f"{api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._auth = (account_sid, auth_token)
        self._sender, self._timeout = sender, timeout
        self._configured = bool(account_sid and auth_token and sender)
        self._http = requests.Session()

    def send(self, *, to: str, body: str) -> str:
        if not self._configured:
            raise MessagingError("WhatsApp is not configured (WHATSAPP_* settings)", retryable=False)
        form = {"To": f"whatsapp:{to}", "From": f"whatsapp:{self._sender}", "Body": body}
        try:
            answer = self._http.post(
                self._url, data=form, auth=self._auth, timeout=self._timeout, headers=trace_headers()
            )
        except requests.RequestException as error:
            if _never_sent(error):
                raise MessagingError(f"WhatsApp API unreachable: {error}", retryable=True) from None
            raise MessagingError(
                f"WhatsApp API gave no answer, outcome unknown: {error}", retryable=False, ambiguous=True
            ) from None
        if answer.status_code >= 300:
            retryable = answer.status_code == 429 or answer.status_code >= 500
            raise MessagingError(
                f"WhatsApp API answered {answer.status_code}: {answer.text[:300]}", retryable=retryable
            )
        try:
            return str(answer.json()["sid"])
        except (ValueError, KeyError, TypeError):
            return ""


def _never_sent(error: requests.RequestException) -> bool:
    """Only a failure to connect proves the request never left: a read
    timeout or a connection dropped mid-exchange may follow an accepted message."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    cause = error.args[0] if error.args else None
    return isinstance(error, requests.ConnectionError) and isinstance(
        getattr(cause, "reason", None), NewConnectionError
    )
