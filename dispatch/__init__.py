"""card-dispatch: a card-code dispatch and inventory engine on Redis.

    async with dispatch.Engine(dispatch.Config.load()) as engine:
        order = await engine.purchase("acme", "steam-100", 1, external_ref="po-1")
"""

from .config import Config
from .engine import Engine
from .errors import (
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
    UnauthorizedError,
    UnknownSkuError,
    ValidationError,
)
from .models import (
    Balance,
    BatchReport,
    Code,
    Distributor,
    LedgerEntry,
    NewDistributor,
    Order,
    OrderPage,
    Sku,
    Stock,
    Supplier,
    Tier,
)
from .sync import SyncEngine

__all__ = [
    # engine
    "Config", "Engine", "SyncEngine",
    # data
    "Balance", "BatchReport", "Code", "Distributor", "LedgerEntry", "NewDistributor", "Order",
    "OrderPage", "Sku", "Stock", "Supplier", "Tier",
    # errors
    "DispatchError", "ConfigError", "ConflictError", "DistributorSuspendedError", "EmbeddedRedisError",
    "IdempotencyConflictError", "InsufficientBalanceError", "NotFoundError", "OutOfStockError",
    "PriceChangedError", "ReservationExpiredError", "SkuNotAllowedError", "SkuPausedError",
    "StoreUnavailableError", "UnauthorizedError", "UnknownSkuError", "ValidationError",
]
__version__ = "0.1.0"
