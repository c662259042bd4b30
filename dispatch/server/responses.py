"""What the server sends: precomputed status lines, the one table from error to HTTP
status and code, and the two kinds of reply (a whole body, or a stream of blocks).

Handlers never build an error body: they raise, and :func:`error_reply` turns the
exception into ``{"error": {"code", "message", "retryable"}}`` by this table. An
exception that is not a DispatchError the client may see is a 500 with a generic
message; the details go to the server log only.
"""

from __future__ import annotations

import http
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from .. import errors
from .messages import ErrorBody, ErrorDetail

__all__ = ["Reply", "StreamReply", "STATUS_LINES", "ERRORS", "lookup", "error_reply", "json_reply", "encode"]

log = logging.getLogger("dispatch.server")

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}

#: Every error a client may see, as (status, code): the one place an error's HTTP status is
#: given. An error not listed takes the entry of its nearest listed base class; anything
#: else is a 500 internal_error.
ERRORS: dict[type[errors.DispatchError], tuple[int, str]] = {cls: (status, cls.code) for cls, status in (
    (errors.BadRequestError, 400),              # malformed HTTP (the connection is closed)
    (errors.UnauthorizedError, 401),
    (errors.ForbiddenError, 403),               # the admin token's role lacks the route's
    (errors.InsufficientBalanceError, 402),
    (errors.SkuNotAllowedError, 403),
    (errors.DistributorSuspendedError, 403),
    (errors.LimitExceededError, 403),
    (errors.VerificationRequiredError, 403),
    (errors.NotFoundError, 404),                # also unknown routes
    (errors.UnknownSkuError, 404),
    (errors.MethodNotAllowedError, 405),        # with Allow
    (errors.OutOfStockError, 409),
    (errors.IdempotencyConflictError, 409),
    (errors.PriceChangedError, 409),
    (errors.ConflictError, 409),                # exists already / wrong state
    (errors.ReservationExpiredError, 409),
    (errors.SkuPausedError, 409),               # not SkuNotAllowedError's 403: the SKU, not the buyer
    (errors.AlreadyClaimedError, 409),          # a ticket holds the code already
    (errors.TicketWindowClosedError, 409),
    (errors.SupplierBlacklistedError, 409),
    (errors.PayloadTooLargeError, 413),
    (errors.ValidationError, 422),              # also bad JSON and bad query strings
    (errors.RateLimitedError, 429),             # with Retry-After
    (errors.StoreUnavailableError, 503),        # retryable
)}

# Messages that would tell a client about the inside (Redis addresses, replies).
_PUBLIC_MESSAGE = {errors.StoreUnavailableError: "the store is unavailable; try again"}

encode = msgspec.json.Encoder().encode
JSON = b"application/json"


class Reply:
    """A whole response: status, body bytes and extra headers (name, value) in bytes."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = JSON,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


class StreamReply:
    """A response whose body is produced block by block (sent chunked)."""

    __slots__ = ("status", "blocks", "content_type", "headers")

    def __init__(self, status: int, blocks: AsyncIterator[bytes], content_type: bytes,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.blocks = blocks
        self.content_type = content_type
        self.headers = headers or []


def json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, encode(payload))


def lookup(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) of *exc* by :data:`ERRORS`, or None if it has no entry (a 500)."""
    for cls in type(exc).__mro__:
        hit = ERRORS.get(cls)  # type: ignore[call-overload]
        if hit is not None:
            return hit
    return None


def error_reply(exc: BaseException) -> Reply:
    """The response for *exc*, by the table above."""
    hit = lookup(exc) if isinstance(exc, errors.DispatchError) else None
    if hit is None:
        log.error("internal error: %s: %s", type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return Reply(500, _INTERNAL)
    assert isinstance(exc, errors.DispatchError)
    status, code = hit
    public = _PUBLIC_MESSAGE.get(type(exc))  # type: ignore[call-overload]
    if public is not None:
        log.warning("%s: %s", code, exc.message)
    body = encode(ErrorBody(ErrorDetail(code=code, message=public or exc.message, retryable=exc.retryable)))
    headers: list[tuple[bytes, bytes]] = []
    retry_after = exc.details.get("retry_after")
    if isinstance(retry_after, (int, float)):
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    allow = exc.details.get("allow")
    if isinstance(allow, (list, tuple)):
        headers.append((b"allow", ", ".join(allow).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="dispatch"'))
    return Reply(status, body, headers=headers)


_INTERNAL = encode(ErrorBody(ErrorDetail(code="internal_error", message="internal error", retryable=False)))
