"""The recovery sweep: leases that ran out, sagas a crash left half done, and the
volume tiers that are due (tiers.py).

Every saga step is idempotent and every saga leaves a trace until its last step
(a reservation or ticket in its account's ``pending`` set), so the sweep only has to
find those older than ``recovery_grace_s`` and run their remaining steps. Several sweeps at once only
race each other to the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .aftersales import AfterSales
from .config import Config
from .errors import DispatchError
from .orders import Orders
from .store import Store
from .tiers import Tiers

__all__ = ["Recovery"]

log = logging.getLogger("dispatch.engine")


class Recovery:
    def __init__(self, store: Store, config: Config, orders: Orders, aftersales: AfterSales, tiers: Tiers) -> None:
        self._store = store
        self._tiers = tiers
        self._config = config
        self._orders = orders
        self._aftersales = aftersales

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``sweep_interval_s`` until *stop* is set (or the task is cancelled)."""
        interval = self._config.sweep_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
                    return
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep failed; trying again in %ss", interval)

    async def sweep(self, grace_s: float | None = None) -> tuple[int, int]:
        """Expire lapsed reservations, finish orders left mid-saga for longer than
        *grace_s* (default ``recovery_grace_s``), and retire batches past their sell-by
        (the sales do too: this keeps the stock figures of a SKU that does not sell
        current), and decide the volume tiers that are due. Returns (expired, recovered)."""
        await self._store.replication.check()  # after a change of master, reconciled first
        cfg = self._config
        await self._store.inventory.retire_expired(await self._store.catalog.sku_ids(), cfg.expiring_window_s,
                                                   cfg.expiring_alert_codes)
        grace = self._config.recovery_grace_s if grace_s is None else grace_s
        now = time.time_ns() // 1_000_000
        before = now - int(grace * 1000)
        dists = await self._store.accounts.ids()
        due = await self._store.orders.due(dists, now, before)
        expiries, recoveries = [], []
        for dist, (leases, pending) in zip(dists, due):
            expiries += [self._orders.expire(dist, oid) for oid in leases]
            recoveries += [self._aftersales.recover_ticket(dist, oid) if oid.startswith("tk_")
                           else self._orders.recover(dist, oid) for oid in pending]
        results = await asyncio.gather(*expiries, *recoveries, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, DispatchError):
                log.error("sweep step failed: %r", r)
        await self._tiers.sweep(dists)
        expired = sum(1 for r in results[:len(expiries)] if r is True)
        recovered = sum(1 for r in results[len(expiries):] if r is True)
        return expired, recovered
