"""What comes back from Redis, turned into what the engine speaks: errors and typed results.

Two translations happen here and nowhere else:

- a Redis failure (connection, timeout, a refused command) becomes
  :class:`~dispatch.errors.StoreUnavailableError`, which is retryable (:func:`translated`);
- a script's refusal, a status string such as ``insufficient_balance``, becomes the
  exception of :data:`REFUSALS` (in the spirit of redis-py's ``EXCEPTION_CLASSES``),
  with a message made from the call's own context (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from redis import exceptions as rex

from .. import errors as e
from ..records import OrderRec, TicketRec

__all__ = ["translated", "refusal", "REFUSALS", "Existing", "Taken", "Settled", "SkuState", "Approval", "Decided"]


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis failures become StoreUnavailableError (retryable); nothing else leaks out."""
    try:
        yield
    except e.StoreUnavailableError:
        raise  # already said (a round short of its replicas)
    except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError) as exc:
        raise e.StoreUnavailableError(f"redis is unavailable: {type(exc).__name__}: {exc}") from None
    except (rex.RedisError, rex.RedisClusterException) as exc:
        raise e.StoreUnavailableError(f"redis refused a command: {exc}") from None
    except (AttributeError, TypeError) as exc:
        # redis-py closes a cluster node's connections when it reads the slot map again
        # (after a failover), in use or not; a command on one then fails inside redis-py
        if not _raised_in_redis(exc):
            raise
        raise e.StoreUnavailableError(f"redis is unavailable: a connection closed under a command ({exc})") from None


def _raised_in_redis(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


#: A script's refusal -> (error, message). A message is formatted with the call's
#: context (``sku``, ``dist``, ``ref``, ``order``, ...); None keeps the error's own text.
#: Entries under a script name override the common meaning of a status for that script.
REFUSALS: dict[str, dict[str, tuple[type[e.DispatchError], str | None]]] = {
    "": {
        "out_of_stock": (e.OutOfStockError, None),
        "paused": (e.SkuPausedError, None),
        "unknown_sku": (e.UnknownSkuError, "unknown SKU {sku}"),
        "unknown_distributor": (e.NotFoundError, "unknown distributor {dist}"),
        "unknown_supplier": (e.NotFoundError, "unknown supplier {supplier}"),
        "suspended": (e.DistributorSuspendedError, None),
        "not_allowed": (e.SkuNotAllowedError, None),
        "verification_required": (e.VerificationRequiredError, "distributor {dist}'s real name is not verified"),
        "limit_exceeded": (e.LimitExceededError, "the order goes past the {limit} limit of {dist}: {left} left"),
        "insufficient_balance": (e.InsufficientBalanceError, "the order costs {cost}, {available} is available"),
        "conflict": (e.IdempotencyConflictError,
                     "external_ref {ref!r} was used for another request (order {order})"),
        "gone": (e.StoreUnavailableError, "the order took too long and was abandoned (nothing was charged); "
                                          "send it again"),
        "not_found": (e.NotFoundError, "no order {order}"),
        "invalid_state": (e.ConflictError, "order {order} is {state}; it cannot be {action}ed"),
    },
    "topup": {"conflict": (e.IdempotencyConflictError, "top-up {ref} was made earlier with another amount")},
    "transfer": {"conflict": (e.IdempotencyConflictError, "transfer {ref} was made earlier with another amount"),
                 "insufficient_balance": (e.InsufficientBalanceError,
                                          "the transfer moves {cost}, {available} is available")},
    "supplier_money": {"conflict": (e.IdempotencyConflictError,
                                    "deposit {ref} was made earlier with another amount")},
    "import_push": {
        "mismatch": (e.ConflictError, "batch {batch} was sent before with other content (chunk {chunk} differs); "
                                      "use a new batch id"),
        "voided": (e.ConflictError, "batch {batch} is voided"),
    },
    "ticket_open": {
        "claimed": (e.AlreadyClaimedError, "that code is claimed by ticket {ticket_id}"),
        "window_closed": (e.TicketWindowClosedError,
                          "order {order} was delivered more than {window_s} s ago"),
        "invalid_state": (e.ConflictError, "order {order} is {state}; tickets are filed on delivered codes"),
        "bad_index": (e.NotFoundError, "no order {order}"),
    },
    "ticket_decide": {
        "not_found": (e.NotFoundError, "no ticket {ticket}"),
        "conflict": (e.ConflictError, "ticket {ticket} is {state} already"),
    },
    "ticket_finish": {"not_found": (e.DispatchError, "ticket {ticket} vanished while it was approved")},
    "sku_invalidate": {
        "not_found": (e.DispatchError, "ticket {ticket}: the SKU shard answered not_found"),
        "invalid_state": (e.DispatchError, "ticket {ticket}: the SKU shard answered invalid_state"),
    },
}


def refusal(script: str, status: bytes | str, **context: Any) -> e.DispatchError:
    """The error for *script*'s refusal *status*, its message made from *context*
    (which also becomes the error's ``details``)."""
    name = status.decode() if isinstance(status, bytes) else status
    hit = REFUSALS.get(script, {}).get(name) or REFUSALS[""].get(name)
    if hit is None:
        return e.DispatchError(f"unexpected reply {name!r} from script {script}")
    cls, template = hit
    return cls(template.format(**context) if template else "", **context)


# ---- typed results ----------------------------------------------------------------------

class Existing(NamedTuple):
    """An account step found the order's external_ref used before, by this request body:
    the earlier order (a replay), and its codes when the step read them."""

    rec: OrderRec
    codes: list[bytes] | None = None


class Taken(NamedTuple):
    """What the SKU step of an order answered: ``ok`` and the codes (encrypted), or the
    refusal (``out_of_stock``, ``paused``, ``unknown_sku``) the account step is told."""

    outcome: str
    codes: list[bytes]

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Settled(NamedTuple):
    """The account side of ending a reservation: ``ok`` (done now), ``again`` (was done),
    ``expired`` (the lease ended first), ``not_due``, ``invalid_state``; the order, and
    its codes once delivered."""

    result: str
    rec: OrderRec
    codes: list[bytes]


class SkuState(NamedTuple):
    """A SKU's metadata (strings, as set) and its counters, summed over its buckets;
    ``meta`` is empty when unknown. ``spread``: the buckets that may hold its codes."""

    meta: dict[str, str]
    stats: dict[str, int]
    spread: int = 1


class Approval(NamedTuple):
    """The SKU side of an approved ticket: the invalidated code's batch, and the
    replacement's ciphertext (None: refund)."""

    seq: int
    replacement: bytes | None


class Decided(NamedTuple):
    """A ticket decision: ``ok`` (made now) or ``again`` (the same one, made before)."""

    result: str
    ticket: TicketRec
