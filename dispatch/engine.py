"""The engine: the async API that platforms embed and the daemon serves.

:class:`Engine` owns the life cycle (the store, the vault, the background sweep and
webhook deliveries) and is a thin facade over its components, one per concept:

==============  ==========================================================  ==============
``catalog``     SKUs, tiers, prices and their cache, stock figures           catalog.py
``accounts``    distributors, API keys, top-ups, balances, rate limits       accounts.py
``subs``        sub-distributors: their prices, transfers, parents' reads     subs.py
``compliance``  transaction limits, real-name verification                  compliance.py
``orders``      purchases and reservations (one step, or sagas), reads       orders.py
``inventory``   imports, batches, their sale order, void and park            inventory.py
``aftersales``  suppliers (deposits, ratings, blacklist) and tickets         aftersales.py
``exports``     orders and ledgers as CSV, statements, event streams         exports.py
``tiers``       volume tiers: rules, automatic tiers, pins                   tiers.py
``recovery``    the sweep: expired leases, sagas a crash left half done      recovery.py
``webhooks``    events delivered over HTTP                                   webhooks.py
``admins``      named admin tokens and their roles                           admins.py
``trail``       the audit trail of admin writes                              trail.py
==============  ==========================================================  ==============

Each component takes what it needs (the store, the config, the vault, the components
it builds on) in its constructor; the engine's public methods are theirs
(``engine.create_sku`` is the catalog's ``create_sku``). A method that changes what
admins own (``_Write``: SKUs, accounts, money, suppliers, tickets, webhooks, tokens) is
recorded in the audit trail on every call, whoever calls it (trail.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import inspect
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from .accounts import Accounts
from .admins import Admins
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
from .subs import Subs
from .tiers import Tiers
from .trail import Trail
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


class _Write(_Via):
    """A facade method that changes what admins own: each call is recorded in the audit
    trail (trail.py) as action *name* on the *kind* target named by argument *param*."""

    def __init__(self, part: str | None, func: Callable[..., Any], kind: str, param: str | None) -> None:
        super().__init__(part or "", func)
        self.kind, self.param, self.action = kind, param, func.__name__
        self._signature = inspect.signature(func)

    def __set_name__(self, owner: type, name: str) -> None:
        self.action = name

    def __get__(self, engine: Engine | None, owner: type) -> Any:
        if engine is None:
            return self
        trail = engine._parts.get("trail")
        if trail is None:
            raise DispatchError("the engine is not started")
        write = super().__get__(engine, owner) if self.part else self.__wrapped__.__get__(engine, owner)

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            bound = self._signature.bind(None, *args, **kwargs).arguments
            return await trail.record(self.action, self.kind, bound.get(self.param) if self.param else None,
                                      lambda: write(*args, **kwargs))

        recorded.__doc__, recorded.__name__ = self.__doc__, self.action
        return recorded


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
        accounts = Accounts(store, cfg, catalog)
        subs = Subs(store, cfg, catalog, accounts)
        orders = Orders(store, cfg, vault, catalog, sagas, subs)
        aftersales = AfterSales(store, cfg, vault, catalog, inventory, sagas)
        tiers = Tiers(store, catalog)
        recovery = Recovery(store, cfg, orders, aftersales, tiers)
        compliance, admins = Compliance(store, vault), Admins(store)
        webhooks = self._webhooks = Webhooks(store, vault, timeout_s=cfg.webhook_timeout_s,
                                             max_attempts=cfg.webhook_max_attempts,
                                             backoff_base_s=cfg.webhook_backoff_s,
                                             backoff_cap_s=cfg.webhook_backoff_cap_s)

        async def batch(batch_id: str) -> Any:
            return (await inventory.summaries([await inventory.batch(batch_id)]))[0]

        # what the trail reads of each kind of target, before and after a write
        trail = Trail(store, dict(sku=catalog.get_sku, tier=catalog.get_tier, stock=catalog.stock,
                                  distributor=accounts.get_distributor, rate_limit=accounts.rate_limit,
                                  limits=compliance.limits, verification=compliance.verification,
                                  tier_rules=lambda _: tiers.tier_rules(), distributor_tier=tiers.tier_status,
                                  supplier=aftersales.get_supplier, ticket=aftersales.get_ticket, batch=batch,
                                  webhook=webhooks.target, admin_token=admins.admin_token))
        self._parts = dict(catalog=catalog, accounts=accounts, subs=subs, orders=orders, inventory=inventory,
                           aftersales=aftersales, exports=Exports(store, vault), recovery=recovery,
                           compliance=compliance, tiers=tiers, webhooks=webhooks, admins=admins, trail=trail)
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
    create_sku = _Write("catalog", Catalog.create_sku, "sku", "sku")
    get_sku = _Via("catalog", Catalog.get_sku)
    list_skus = _Via("catalog", Catalog.list_skus)
    sku_detail = _Via("catalog", Catalog.sku_detail)
    buckets_on_every_master = _Via("catalog", Catalog.buckets_on_every_master)
    sku_details = _Via("catalog", Catalog.sku_details)
    create_tier = _Write("catalog", Catalog.create_tier, "tier", "tier")
    get_tier = _Via("catalog", Catalog.get_tier)
    list_tiers = _Via("catalog", Catalog.list_tiers)
    unit_price = _Via("catalog", Catalog.unit_price)
    stock = _Via("catalog", Catalog.stock)
    stocks = _Via("catalog", Catalog.stocks)
    forecast = _Via("catalog", Catalog.forecast)

    create_distributor = _Write("accounts", Accounts.create_distributor, "distributor", "distributor")
    update_distributor = _Write("accounts", Accounts.update_distributor, "distributor", "distributor")
    get_distributor = _Via("accounts", Accounts.get_distributor)
    list_distributors = _Via("accounts", Accounts.list_distributors)
    catalog = _Via("accounts", Accounts.catalog)
    rotate_api_key = _Write("accounts", Accounts.rotate_api_key, "distributor", "distributor")
    authenticate = _Via("accounts", Accounts.authenticate)
    access = _Via("accounts", Accounts.access)
    topup = _Write("accounts", Accounts.topup, "distributor", "distributor")
    balance = _Via("accounts", Accounts.balance)
    ledger = _Via("accounts", Accounts.ledger)
    rate_limit = _Via("accounts", Accounts.rate_limit)
    set_rate_limit = _Write("accounts", Accounts.set_rate_limit, "rate_limit", "distributor")
    throttle = _Via("accounts", Accounts.throttle)
    remember_signature = _Via("accounts", Accounts.remember_signature)

    create_subdistributor = _Via("subs", Subs.create_subdistributor)
    update_subdistributor = _Via("subs", Subs.update_subdistributor)
    get_subdistributor = _Via("subs", Subs.get_subdistributor)
    list_subdistributors = _Via("subs", Subs.list_subdistributors)
    rotate_subdistributor_key = _Via("subs", Subs.rotate_subdistributor_key)
    transfer = _Via("subs", Subs.transfer)
    subdistributor_orders = _Via("subs", Subs.subdistributor_orders)

    purchase = _Via("orders", Orders.purchase)
    confirm = _Via("orders", Orders.confirm)
    cancel = _Via("orders", Orders.cancel)
    get_order = _Via("orders", Orders.get_order)
    get_order_by_ref = _Via("orders", Orders.get_order_by_ref)
    list_orders = _Via("orders", Orders.list_orders)

    import_codes = _Write("inventory", Inventory.import_codes, "stock", "sku")
    void_batch = _Write("inventory", Inventory.void_batch, "batch", "batch_id")
    sku_batches = _Via("inventory", Inventory.sku_batches)

    create_supplier = _Write("aftersales", AfterSales.create_supplier, "supplier", "supplier")
    get_supplier = _Via("aftersales", AfterSales.get_supplier)
    list_suppliers = _Via("aftersales", AfterSales.list_suppliers)
    supplier_stats = _Via("aftersales", AfterSales.supplier_stats)
    update_supplier = _Write("aftersales", AfterSales.update_supplier, "supplier", "supplier")
    deposit = _Write("aftersales", AfterSales.deposit, "supplier", "supplier")
    supplier_ledger = _Via("aftersales", AfterSales.supplier_ledger)
    supplier_report = _Via("aftersales", AfterSales.supplier_report)
    open_ticket = _Via("aftersales", AfterSales.open_ticket)
    get_ticket = _Via("aftersales", AfterSales.get_ticket)
    list_tickets = _Via("aftersales", AfterSales.list_tickets)
    resolve_ticket = _Write("aftersales", AfterSales.resolve_ticket, "ticket", "ticket_id")

    export_orders = _Via("exports", Exports.export_orders)
    export_ledger = _Via("exports", Exports.export_ledger)
    statement = _Via("exports", Exports.statement)
    limits = _Via("compliance", Compliance.limits)
    set_limits = _Write("compliance", Compliance.set_limits, "limits", "distributor")
    verification = _Via("compliance", Compliance.verification)
    verify = _Write("compliance", Compliance.verify, "verification", "distributor")
    unverify = _Write("compliance", Compliance.unverify, "verification", "distributor")
    tier_rules = _Via("tiers", Tiers.tier_rules)
    set_tier_rules = _Write("tiers", Tiers.set_tier_rules, "tier_rules", None)
    tier_status = _Via("tiers", Tiers.tier_status)
    pin_tier = _Write("tiers", Tiers.pin_tier, "distributor_tier", "distributor")
    unpin_tier = _Write("tiers", Tiers.unpin_tier, "distributor_tier", "distributor")
    apply_tiers = _Via("tiers", Tiers.apply_tiers)
    statement_csv = _Via("exports", Exports.statement_csv)
    events = _Via("exports", Exports.events)

    set_webhook = _Write("webhooks", Webhooks.set_target, "webhook", "distributor")
    remove_webhook = _Write("webhooks", Webhooks.remove_target, "webhook", "distributor")
    replay_webhook = _Write("webhooks", Webhooks.replay, "webhook_delivery", "job_id")
    replay_webhooks = _Write("webhooks", Webhooks.replay_all, "webhook_deliveries", None)

    create_admin_token = _Write("admins", Admins.create_admin_token, "admin_token", "name")
    revoke_admin_token = _Write("admins", Admins.revoke_admin_token, "admin_token", "name")
    list_admin_tokens = _Via("admins", Admins.list_admin_tokens)
    admin_by_token = _Via("admins", Admins.admin_by_token)
    audit_trail = _Via("trail", Trail.audit_trail)
    refused = _Via("trail", Trail.refused)

    sweep = _Via("recovery", Recovery.sweep)
    _update_sku = _Via("catalog", Catalog.update_sku)
    _requeue = _Via("inventory", Inventory.requeue)

    async def _change_sku(self, sku: str, **changes: Any) -> Any:
        """Change a SKU (see :meth:`Catalog.update_sku`); a new ``sale_order`` re-ranks
        its batches at once."""
        s = await self._update_sku(sku, **changes)
        if changes.get("sale_order", msgspec.UNSET) is not msgspec.UNSET:
            await self._requeue(sku)
        return s

    update_sku = _Write(None, _change_sku, "sku", "sku")

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

    async def _new_master_key(self) -> KeyRotation:
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

    rotate_master_key = _Write(None, _new_master_key, "master_key", None)
