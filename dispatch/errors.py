"""Every exception the package raises, under one root.

Each error carries a stable ``code`` (the HTTP contract's snake_case name) and
whether a client may try again (``retryable``); the HTTP status of each is the
server's business (``dispatch.server.responses.ERRORS``). Messages never contain a
plaintext card code.
"""

from __future__ import annotations

__all__ = [
    "DispatchError",
    "ValidationError",
    "ConfigError",
    "NotFoundError",
    "UnknownSkuError",
    "OutOfStockError",
    "InsufficientBalanceError",
    "IdempotencyConflictError",
    "PriceChangedError",
    "SkuNotAllowedError",
    "DistributorSuspendedError",
    "SkuPausedError",
    "UnauthorizedError",
    "ForbiddenError",
    "ConflictError",
    "ReservationExpiredError",
    "StoreUnavailableError",
    "EmbeddedRedisError",
    "BadRequestError",
    "MethodNotAllowedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "AlreadyClaimedError",
    "TicketWindowClosedError",
    "SupplierBlacklistedError",
]


class DispatchError(Exception):
    """Root of every error raised by card-dispatch."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.details = details


class ValidationError(DispatchError, ValueError):
    """The request or input is malformed."""

    code = "validation_error"


class ConfigError(DispatchError, ValueError):
    """A configuration value is invalid."""

    code = "config_error"


class NotFoundError(DispatchError, LookupError):
    """No such object."""

    code = "not_found"


class UnknownSkuError(NotFoundError):
    """No such SKU."""

    code = "unknown_sku"


class OutOfStockError(DispatchError):
    """Not enough codes in stock for this order."""

    code = "out_of_stock"


class InsufficientBalanceError(DispatchError):
    """The balance (plus credit limit) does not cover this order."""

    code = "insufficient_balance"


class IdempotencyConflictError(DispatchError):
    """This external_ref was already used with a different request."""

    code = "idempotency_conflict"


class PriceChangedError(DispatchError):
    """The unit price is above the order's max_unit_price."""

    code = "price_changed"


class SkuNotAllowedError(DispatchError, PermissionError):
    """This distributor may not buy this SKU."""

    code = "sku_not_allowed"


class SkuPausedError(SkuNotAllowedError):
    """This SKU is paused and cannot be sold."""

    code = "sku_paused"


class DistributorSuspendedError(DispatchError, PermissionError):
    """This distributor is suspended."""

    code = "distributor_suspended"


class LimitExceededError(DispatchError, PermissionError):
    """The order would go past one of this distributor's transaction limits; the message
    names the limit (max_order_qty, max_order_amount, daily, monthly) and what is left."""

    code = "limit_exceeded"


class VerificationRequiredError(DispatchError, PermissionError):
    """Only distributors whose real name is verified may buy here."""

    code = "verification_required"


class UnauthorizedError(DispatchError, PermissionError):
    """Missing or invalid credentials."""

    code = "unauthorized"


class ForbiddenError(DispatchError, PermissionError):
    """The admin token's role does not allow this; the message names the role it needs."""

    code = "forbidden"


class ConflictError(DispatchError):
    """The object exists already, or is in a state that forbids this change."""

    code = "conflict"


class StoreUnavailableError(DispatchError, ConnectionError):
    """Redis is unreachable or failed; the request may be retried."""

    code = "store_unavailable"
    retryable = True


class EmbeddedRedisError(DispatchError, RuntimeError):
    """The embedded redis-server could not be started."""

    code = "embedded_redis_error"


class ReservationExpiredError(ConflictError):
    """The reservation's lease ended before it was confirmed."""

    code = "reservation_expired"


# ---- the daemon ---------------------------------------------------------------------


class BadRequestError(DispatchError):
    """The request is not valid HTTP."""

    code = "bad_request"


class MethodNotAllowedError(DispatchError):
    """The path exists but does not take this method (``details["allow"]`` lists the ones it takes)."""

    code = "method_not_allowed"


class PayloadTooLargeError(DispatchError):
    """The request headers or body are over the configured limit."""

    code = "payload_too_large"


class RateLimitedError(DispatchError):
    """Too many requests; ``details["retry_after"]`` says in how many seconds to try again."""

    code = "rate_limited"
    retryable = True


# ---- after-sales --------------------------------------------------------------------


class AlreadyClaimedError(ConflictError):
    """The code is claimed by a ticket already (a code is claimed once)."""

    code = "already_claimed"


class TicketWindowClosedError(ConflictError):
    """The order was delivered longer ago than the after-sales window allows."""

    code = "ticket_window_closed"


class SupplierBlacklistedError(ConflictError):
    """The supplier is blacklisted: its codes are not taken."""

    code = "supplier_blacklisted"
