"""The engine: the async API that platforms embed and the daemon serves.

:class:`Engine` owns the life cycle (the store, the vault, the background sweep and
webhook deliveries) and is a thin facade over its components, one per concept:

==============  ==========================================================  ==============
``catalog``     SKUs, tiers, prices and their cache, stock figures           catalog.py
``accounts``    distributors, API keys, top-ups, balances, rate limits       accounts.py
``compliance``  transaction limits, real-name verification                  compliance.py
``orders``      purchases and reservations (one step, or sagas), reads       orders.py
``inventory``   imports, batches, their sale order, void and park            inventory.py
``aftersales``  suppliers (deposits, ratings, blacklist) and tickets         aftersales.py
``exports``     orders and ledgers as CSV, statements, event streams         exports.py
``tiers``       volume tiers: rules, automatic tiers, pins                   tiers.py
``recovery``    the sweep: expired leases, sagas a crash left half done      recovery.py
``webhooks``    events delivered over HTTP                                   webhooks.py
==============  ==========================================================  ==============

Each component takes what it needs (the store, the config, the vault, the components
it builds on) in its constructor; the engine's public methods are theirs
(``engine.create_sku`` is the catalog's ``create_sku``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from .accounts import Accounts
from .aftersales import AfterSales
from .audit import audit
from .catalog import Catalog
from .compliance import Compliance
from .config import Config
from .errors import ConfigError, ConflictError, DispatchError
from .exports import Exports
from .inventory import Inventory
from .models import KeyRotation
from .orders import Orders
from .recovery import Recovery
from .sagas import Sagas
from .store import Store
from .tiers import Tiers
from .vault import Vault, load_master_keys
from .webhooks import Webhooks

__all__ = ["Engine", "tune_gc"]


def tune_gc() -> None:
    """Make the garbage collector cheap for a process that serves orders (the daemon and
    the benchmarks call it once started; an embedding application may too).

    Every order allocates a few dozen container objects (futures, tasks, reply lists)
    and nearly all die by reference counting, yet with the default thresholds the
    collector runs every 700 allocations, rescanning every live task and future.
    What was allocated at start-up is frozen out of the scans, and the youngest
    generation is collected every 50,000 allocations instead.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


class _Via:
    """A facade method: the component's own bound method (its signature and docstring)."""

    def __init__(self, part: str, func: Callable[..., Any]) -> None:
        self.part, self.name = part, func.__name__
        self.__doc__, self.__wrapped__ = func.__doc__, func

    def __get__(self, engine: Engine | None, owner: type) -> Any:
        if engine is None:
            return self
        part = engine._parts.get(self.part)
        if part is None:
            raise DispatchError("the engine is not started")
        return getattr(part, self.name)


class Engine:
    """A card-code dispatch engine on Redis (embedded or external).

    Use ``async with Engine(config) as engine:`` or ``await engine.start()`` /
    ``await engine.close()``. With ``sweep=True`` (the default) background tasks
    expire lapsed reservations, finish orders a crash left half done and deliver
    webhooks.
    """

    def __init__(self, config: Config | None = None, *, sweep: bool = True) -> None:
        self.config = config if config is not None else Config.load()
        self._sweep_enabled = sweep
        self._store: Store | None = None
        self._vault: Vault | None = None
        self._webhooks: Webhooks | None = None
        self._sagas: Sagas | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._parts: dict[str, Any] = {}  # the components, once started

    # ---- life cycle ------------------------------------------------------------------
    async def start(self) -> Engine:
        """Connect (or start the embedded Redis), load keys, start the sweep."""
        if self._store is not None:
            return self
        cfg = self.config
        master_keys = load_master_keys(cfg)
        store = await Store.connect(cfg)
        try:
            vault = Vault(master_keys)
            wrapped = await store.inventory.fingerprint_key(vault.wrap_fingerprint_key(secrets.token_bytes(32)))
            vault.set_fingerprint_key(wrapped)
        except BaseException:
            await store.close()
            raise
        self._store, self._vault = store, vault
        sagas = self._sagas = Sagas(store.orders, coalesce=cfg.coalesce, cap=cfg.coalesce_max)
        catalog = Catalog(store, cfg)
        inventory = Inventory(store, cfg, vault, catalog)
        orders = Orders(store, cfg, vault, catalog, sagas)
        aftersales = AfterSales(store, cfg, vault, catalog, inventory, sagas)
        tiers = Tiers(store, catalog)
        recovery = Recovery(store, cfg, orders, aftersales, tiers)
        self._parts = dict(catalog=catalog, accounts=Accounts(store, cfg, catalog), orders=orders, inventory=inventory,
                           aftersales=aftersales, exports=Exports(store, vault), recovery=recovery,
                           compliance=Compliance(store, vault), tiers=tiers)
        self._webhooks = Webhooks(store, vault, timeout_s=cfg.webhook_timeout_s, max_attempts=cfg.webhook_max_attempts,
                                  backoff_base_s=cfg.webhook_backoff_s, backoff_cap_s=cfg.webhook_backoff_cap_s)
        if self._sweep_enabled:
            self._stop = asyncio.Event()
            self._background = [asyncio.create_task(recovery.run(self._stop), name="dispatch-sweep"),
                                asyncio.create_task(self._webhooks.run(self._stop), name="dispatch-webhooks")]
        return self

    async def close(self) -> None:
        """Stop the sweep and webhook deliveries, let orders in flight and queued calls
        finish, close Redis (stopping the embedded one)."""
        self._stop.set()  # a cancel can be swallowed by a library mid-call; the stop cannot
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background = []
        if self._webhooks is not None:
            await self._webhooks.aclose()
            self._webhooks = None
        if self._sagas is not None:
            await self._sagas.close()
        self._parts = {}
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise DispatchError("the engine is not started")
        return self._store

    @property
    def vault(self) -> Vault:
        if self._vault is None:
            raise DispatchError("the engine is not started")
        return self._vault

    @property
    def webhooks(self) -> Webhooks:
        """Webhook targets and deliveries (delivered in the background when the engine sweeps)."""
        if self._webhooks is None:
            raise DispatchError("the engine is not started")
        return self._webhooks

    # ---- the facade --------------------------------------------------------------------
    create_sku = _Via("catalog", Catalog.create_sku)
    get_sku = _Via("catalog", Catalog.get_sku)
    list_skus = _Via("catalog", Catalog.list_skus)
    sku_detail = _Via("catalog", Catalog.sku_detail)
    sku_details = _Via("catalog", Catalog.sku_details)
    create_tier = _Via("catalog", Catalog.create_tier)
    get_tier = _Via("catalog", Catalog.get_tier)
    list_tiers = _Via("catalog", Catalog.list_tiers)
    unit_price = _Via("catalog", Catalog.unit_price)
    stock = _Via("catalog", Catalog.stock)
    stocks = _Via("catalog", Catalog.stocks)
    forecast = _Via("catalog", Catalog.forecast)

    create_distributor = _Via("accounts", Accounts.create_distributor)
    update_distributor = _Via("accounts", Accounts.update_distributor)
    get_distributor = _Via("accounts", Accounts.get_distributor)
    list_distributors = _Via("accounts", Accounts.list_distributors)
    catalog = _Via("accounts", Accounts.catalog)
    rotate_api_key = _Via("accounts", Accounts.rotate_api_key)
    authenticate = _Via("accounts", Accounts.authenticate)
    access = _Via("accounts", Accounts.access)
    topup = _Via("accounts", Accounts.topup)
    balance = _Via("accounts", Accounts.balance)
    ledger = _Via("accounts", Accounts.ledger)
    rate_limit = _Via("accounts", Accounts.rate_limit)
    set_rate_limit = _Via("accounts", Accounts.set_rate_limit)
    throttle = _Via("accounts", Accounts.throttle)
    remember_signature = _Via("accounts", Accounts.remember_signature)

    purchase = _Via("orders", Orders.purchase)
    confirm = _Via("orders", Orders.confirm)
    cancel = _Via("orders", Orders.cancel)
    get_order = _Via("orders", Orders.get_order)
    get_order_by_ref = _Via("orders", Orders.get_order_by_ref)
    list_orders = _Via("orders", Orders.list_orders)

    import_codes = _Via("inventory", Inventory.import_codes)
    void_batch = _Via("inventory", Inventory.void_batch)
    sku_batches = _Via("inventory", Inventory.sku_batches)

    create_supplier = _Via("aftersales", AfterSales.create_supplier)
    get_supplier = _Via("aftersales", AfterSales.get_supplier)
    list_suppliers = _Via("aftersales", AfterSales.list_suppliers)
    supplier_stats = _Via("aftersales", AfterSales.supplier_stats)
    update_supplier = _Via("aftersales", AfterSales.update_supplier)
    deposit = _Via("aftersales", AfterSales.deposit)
    supplier_ledger = _Via("aftersales", AfterSales.supplier_ledger)
    supplier_report = _Via("aftersales", AfterSales.supplier_report)
    open_ticket = _Via("aftersales", AfterSales.open_ticket)
    get_ticket = _Via("aftersales", AfterSales.get_ticket)
    list_tickets = _Via("aftersales", AfterSales.list_tickets)
    resolve_ticket = _Via("aftersales", AfterSales.resolve_ticket)

    export_orders = _Via("exports", Exports.export_orders)
    export_ledger = _Via("exports", Exports.export_ledger)
    statement = _Via("exports", Exports.statement)
    limits = _Via("compliance", Compliance.limits)
    set_limits = _Via("compliance", Compliance.set_limits)
    verification = _Via("compliance", Compliance.verification)
    verify = _Via("compliance", Compliance.verify)
    unverify = _Via("compliance", Compliance.unverify)
    tier_rules = _Via("tiers", Tiers.tier_rules)
    set_tier_rules = _Via("tiers", Tiers.set_tier_rules)
    tier_status = _Via("tiers", Tiers.tier_status)
    pin_tier = _Via("tiers", Tiers.pin_tier)
    unpin_tier = _Via("tiers", Tiers.unpin_tier)
    apply_tiers = _Via("tiers", Tiers.apply_tiers)
    statement_csv = _Via("exports", Exports.statement_csv)
    events = _Via("exports", Exports.events)

    sweep = _Via("recovery", Recovery.sweep)
    _update_sku = _Via("catalog", Catalog.update_sku)
    _requeue = _Via("inventory", Inventory.requeue)

    async def update_sku(self, sku: str, **changes: Any) -> Any:
        """Change a SKU (see :meth:`Catalog.update_sku`); a new ``sale_order`` re-ranks
        its batches at once."""
        s = await self._update_sku(sku, **changes)
        if changes.get("sale_order", msgspec.UNSET) is not msgspec.UNSET:
            await self._requeue(sku)
        return s

    async def audit(self) -> list[str]:
        """Check the invariants (docs/design.md) over the whole store; returns what is wrong.
        Reads everything: for tests, load-test verification and operators."""
        return await audit(self.store)

    async def ready(self) -> None:
        """Redis answers and the scripts are loaded; StoreUnavailableError otherwise."""
        await self.store.ready()

    def coalescer_stats(self) -> dict[str, tuple[int, int]]:
        """(script calls sent, items in them) per step since start: items / calls is the mean batch."""
        if self._sagas is None:
            raise DispatchError("the engine is not started")
        return self._sagas.stats()

    def replication_stats(self) -> tuple[int, int, dict[str, int]]:
        """(changes of Redis master seen, rounds left short of ``min_replicas_acked``,
        codes taken out of each SKU's pools by reconciliation) since start."""
        return self.store.replication.stats()

    async def rotate_master_key(self) -> KeyRotation:
        """Make a new master key and re-wrap the fingerprint key under it.

        Stored codes keep their key id: they stay readable while every key returned in
        ``old_master_keys`` stays configured. Shown once: set DISPATCH_MASTER_KEY to the
        new key and DISPATCH_OLD_MASTER_KEYS to the old ones before the next start (a
        daemon started with the old configuration cannot read the fingerprint key).
        """
        current = load_master_keys(self.config)
        for _ in range(1000):
            new = secrets.token_bytes(32)
            try:
                vault = Vault([new, *current])
            except ConfigError:  # its one-byte key id is taken by a kept key: draw again
                continue
            break
        else:
            raise ConfigError("no free key id is left: drop old master keys no stored code uses")
        inventory = self.store.inventory
        wrapped = await inventory.wrapped_fingerprint_key()
        if wrapped is None:
            raise DispatchError("no fingerprint key is stored")
        rewrapped = vault.wrap_fingerprint_key(self.vault.unwrap_fingerprint_key(wrapped))
        if not await inventory.swap_fingerprint_key(wrapped, rewrapped):
            raise ConflictError("the fingerprint key changed meanwhile (another rotation?); try again")
        return KeyRotation(master_key=base64.b64encode(new).decode(),
                           old_master_keys=[base64.b64encode(k).decode() for k in current])
