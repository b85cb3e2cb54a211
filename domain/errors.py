"""What the domain refuses, as exceptions the adapters turn into answers."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request the rules refuse. `code` is stable; `detail` is for people."""

    code = "invalid_request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(DomainError):
    code = "invalid_request"


class NotFound(DomainError):
    code = "not_found"


class UnknownSku(DomainError):
    code = "unknown_sku"


class InsufficientStock(DomainError):
    code = "insufficient_stock"

    def __init__(self, sku: str, available: int) -> None:
        super().__init__(f"only {available} of {sku} available", sku=sku, available=available)


class Conflict(DomainError):
    code = "conflict"


class ProviderError(DomainError):
    """The payment provider failed or refused; nothing was left half done."""

    code = "provider_error"


class PaymentNotFound(Exception):
    """An event names a payment this database does not have (yet): the checkout
    that created it may not have committed, so the event is retried."""


class PaymentNotConfirmed(Exception):
    """The provider's own API does not (yet) confirm a claimed success: the
    event is retried, and never applied on the callback's word alone."""


class ConfirmationNeeded(Exception):
    """A claimed Monetbil success may only apply once check-payment has been
    asked, which must happen outside the transaction (no row lock waits on
    the network): the caller rolls back, asks, and applies again."""

    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"check-payment must confirm transaction {transaction_id}")
        self.transaction_id = transaction_id


class Gone(DomainError):
    code = "gone"
