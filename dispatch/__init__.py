"""card-dispatch: a card-code dispatch and inventory engine on Redis.

    async with dispatch.Engine(dispatch.Config.load()) as engine:
        order = await engine.purchase("acme", "steam-100", 1, external_ref="po-1")

Importing the package is cheap: the engine (and Redis, cryptography) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import (
    AlreadyClaimedError,
    ConfigError,
    ConflictError,
    DispatchError,
    DistributorSuspendedError,
    EmbeddedRedisError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    NotFoundError,
    OutOfStockError,
    PriceChangedError,
    ReservationExpiredError,
    SkuNotAllowedError,
    SkuPausedError,
    StoreUnavailableError,
    SupplierBlacklistedError,
    TicketWindowClosedError,
    UnauthorizedError,
    UnknownSkuError,
    ValidationError,
)
from .models import (
    Balance,
    BatchReport,
    Code,
    Distributor,
    Event,
    EventPage,
    Forecast,
    LedgerEntry,
    NewDistributor,
    Order,
    OrderPage,
    Sku,
    SkuDetail,
    Stock,
    Supplier,
    SupplierReport,
    SupplierStats,
    Ticket,
    Tier,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .sync import SyncEngine

__all__ = [
    # engine
    "Config", "Engine", "SyncEngine",
    # data
    "Balance", "BatchReport", "Code", "Distributor", "LedgerEntry", "NewDistributor", "Order",
    "OrderPage", "Sku", "Stock", "Supplier", "Tier",
    "Ticket", "SupplierReport", "SupplierStats", "SkuDetail", "Event", "EventPage", "Forecast",
    # errors
    "DispatchError", "ConfigError", "ConflictError", "DistributorSuspendedError", "EmbeddedRedisError",
    "IdempotencyConflictError", "InsufficientBalanceError", "NotFoundError", "OutOfStockError",
    "PriceChangedError", "ReservationExpiredError", "SkuNotAllowedError", "SkuPausedError",
    "StoreUnavailableError", "UnauthorizedError", "UnknownSkuError", "ValidationError",
    "AlreadyClaimedError", "TicketWindowClosedError", "SupplierBlacklistedError",
]
__version__ = "0.1.0"

_LAZY = {"Engine": ".engine", "SyncEngine": ".sync"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
