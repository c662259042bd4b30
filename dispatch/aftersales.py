"""After-sales and supplier accountability: the part of the engine that handles failure.

A ticket is a claim on one delivered code. Approving it is a saga like an order's,
each step one idempotent script on one shard, the ticket ``pending`` in its account
until the last step (the sweep finishes it after a crash):

1. ``ticket_decide``  (account)   open -> approving; the first decision wins
2. ``sku_invalidate`` (SKU)       the code becomes invalidated; a replacement is taken if asked
3. ``supplier_money`` (supplier)  the batch's unit cost is charged to the supplier's deposit
4. ``ticket_finish``  (account)   the unit price is refunded (or the replacement kept); approved

Suppliers are rated by the share of their delivered codes that stayed valid, and
blacklisted (by hand, or automatically above ``blacklist_invalid_rate``); a
blacklisted supplier's unsold codes are parked or voided (``blacklist_action``).
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from typing import Any, Literal

import msgspec

from . import imports
from .catalog import Catalog
from .config import Config
from .errors import ConflictError, NotFoundError, ValidationError
from .inventory import Inventory, rating
from .models import Amount, Code, LedgerEntry, Supplier, SupplierReport, SupplierStats, Ticket
from .paging import window
from .records import MAX_TEXT, TEXT_PATTERN, TicketRec, check, check_ref, ledger_entries, ms_to_dt, new_id
from .sagas import Sagas
from .store import Store
from .vault import Vault

__all__ = ["AfterSales", "text"]

_UNSET: Any = msgspec.UNSET


def text(value: Any, what: str) -> str:
    """A free-text field (a reason, a note), trimmed; ValidationError naming *what*."""
    if not isinstance(value, str) or len(value) > MAX_TEXT or not re.search(TEXT_PATTERN, value):
        raise ValidationError(f"{what} must be 1-{MAX_TEXT} characters, not all spaces, without control "
                              "characters (tab and newline aside)")
    return value.strip()


class AfterSales:
    """Suppliers (deposits, ratings, blacklisting) and tickets (claims on delivered codes)."""

    def __init__(self, store: Store, config: Config, vault: Vault, catalog: Catalog, inventory: Inventory,
                 sagas: Sagas) -> None:
        self._store = store
        self._config = config
        self._vault = vault
        self._catalog = catalog
        self._inventory = inventory
        self._sagas = sagas

    # ---- suppliers -----------------------------------------------------------------------
    async def create_supplier(self, supplier: str, name: str, deposit: int = 0) -> Supplier:
        """Register a supplier, with an opening deposit (a ledger entry ``deposit``/``initial``)."""
        s = check(dict(supplier=supplier, name=name), Supplier, "supplier")
        deposit = check(deposit, Amount, "deposit")
        fields = {"name": s.name, "balance": 0, "held": 0, "status": "active", "invalidated": 0,
                  "created": time.time_ns() // 1_000_000}
        if not await self._store.aftersales.create_supplier(s.supplier, fields):
            raise ConflictError(f"supplier {s.supplier} exists already")
        if deposit:
            return await self.deposit(s.supplier, deposit, "initial")
        return s

    async def get_supplier(self, supplier: str) -> Supplier:
        a = await self._store.aftersales.supplier(supplier)
        if a is None:
            raise NotFoundError(f"unknown supplier {supplier}")
        return Supplier(supplier=supplier, name=a.name, deposit=a.balance, status=a.status)  # type: ignore[arg-type]

    async def list_suppliers(self, *, after: str | None = None, limit: int | None = None) -> list[SupplierStats]:
        """Suppliers by id (those after *after*, at most *limit*), with their stats."""
        ids = window(await self._store.aftersales.supplier_ids(), after, limit)
        return [await self.supplier_stats(s) for s in ids]

    async def supplier_stats(self, supplier: str) -> SupplierStats:
        """Deposit, status, delivered and invalidated codes, invalid rate and rating."""
        report = await self.supplier_report(supplier)
        return SupplierStats(**{f: getattr(report, f) for f in SupplierStats.__struct_fields__})

    async def update_supplier(self, supplier: str, *, name: str = _UNSET, status: str = _UNSET,
                              reason: str = "manual") -> Supplier:
        """Rename a supplier, or blacklist it (``status="blacklisted"``: its unsold codes are
        parked or voided, by ``blacklist_action``) or reinstate it (parked codes go back on sale)."""
        current = await self.get_supplier(supplier)
        if name is not _UNSET:
            current.name = check(dict(supplier=supplier, name=name), Supplier, "supplier").name
            await self._store.aftersales.update_supplier(supplier, {"name": current.name})
        if status is not _UNSET:
            if status not in ("active", "blacklisted"):
                raise ValidationError('status must be "active" or "blacklisted"')
            await self._set_supplier_status(supplier, status, text(reason, "reason"))
        return await self.get_supplier(supplier)

    async def deposit(self, supplier: str, amount: int, reference: str) -> Supplier:
        """Credit a supplier's deposit; idempotent by *reference*."""
        amount = check(amount, Amount, "amount")
        if amount <= 0:
            raise ValidationError("amount must be a positive integer (minor units)")
        await self._store.aftersales.supplier_money(supplier, "deposit", check_ref(reference, "reference"), amount)
        return await self.get_supplier(supplier)

    async def supplier_ledger(self, supplier: str) -> list[LedgerEntry]:
        """The supplier's deposits and charges, oldest first."""
        await self.get_supplier(supplier)
        return ledger_entries(await self._store.aftersales.supplier_ledger(supplier))

    async def supplier_report(self, supplier: str) -> SupplierReport:
        """Deposit, delivered and invalidated codes (per batch too), invalid rate and rating."""
        a = await self._store.aftersales.supplier(supplier)
        if a is None:
            raise NotFoundError(f"unknown supplier {supplier}")
        rows = await self._inventory.summaries(await self._store.inventory.supplier_batches(supplier))
        delivered = sum(r.delivered for r in rows)
        invalidated = sum(r.invalidated for r in rows)
        return SupplierReport(supplier=supplier, name=a.name, status=a.status,  # type: ignore[arg-type]
                              deposit=a.balance, delivered=delivered, invalidated=invalidated,
                              invalid_rate=round(invalidated / delivered, 4) if delivered else 0.0,
                              rating=rating(delivered, invalidated),
                              blacklist_reason=a.reason if a.status == "blacklisted" and a.reason else None,
                              batches=rows)

    async def _set_supplier_status(self, supplier: str, status: str, reason: str,
                                   invalid_rate: float = 0.0) -> None:
        await self._store.aftersales.set_supplier_status(supplier, status, reason, round(invalid_rate * 10_000))
        # Also when it was so already: finishes a blacklisting that a crash interrupted
        # (each step is idempotent).
        for b in await self._store.inventory.supplier_batches(supplier):
            if b.status == "voided":
                continue
            if status == "blacklisted" and self._config.blacklist_action == "void":
                await self._inventory.void_batch(b.batch_id)
            else:
                await self._inventory.park_batch(b, status == "blacklisted")

    async def _after_invalidation(self, supplier: str) -> None:
        """Blacklist the supplier if its invalid rate is now over the limit; re-rank its
        batches in SKUs sold best-rated first."""
        report = await self.supplier_report(supplier)
        cfg = self._config
        if (cfg.auto_blacklist and report.status == "active" and report.delivered >= cfg.blacklist_min_delivered
                and report.invalid_rate > cfg.blacklist_invalid_rate):
            await self._set_supplier_status(
                supplier, "blacklisted",
                f"auto: {report.invalidated} of {report.delivered} codes invalid "
                f"({report.invalid_rate:.2%} > {cfg.blacklist_invalid_rate:.2%})", report.invalid_rate)
        for sku in {b.sku for b in report.batches}:
            if (await self._catalog.get_sku(sku)).sale_order == "best_rated":
                await self._inventory.requeue(sku)

    # ---- tickets -------------------------------------------------------------------------
    async def open_ticket(self, distributor: str, order_id: str, code: str, reason: str) -> Ticket:
        """File an after-sales claim on *code* of one of the distributor's delivered orders,
        within ``ticket_window_s`` of delivery. A code is claimed once (AlreadyClaimedError)."""
        reason = text(reason, "reason")
        if not isinstance(code, str) or not 1 <= len(code) <= imports.MAX_FIELD_LENGTH:
            raise ValidationError(f"code must be 1-{imports.MAX_FIELD_LENGTH} characters")
        rec, codes = await self._store.orders.order(distributor, order_id)
        if rec is None:
            raise NotFoundError(f"no order {order_id}")
        if rec.status not in ("delivered", "partially_refunded"):
            raise ConflictError(f"order {order_id} is {rec.status}; tickets are filed on delivered codes")
        index = None
        for i, c in enumerate(codes):
            plain = imports.decode_secret(self._vault.decrypt(c, rec.sku.encode()))[0]
            if hmac.compare_digest(plain.encode(), code.strip().encode()):
                index = i
        if index is None:
            raise ValidationError(f"that code is not one of order {order_id}'s codes")
        t = await self._store.aftersales.open_ticket(distributor, "tk_" + new_id(), order_id, index, reason,
                                                     self._config.ticket_window_s * 1000)
        return self._ticket(distributor, t)

    async def _ticket_rec(self, ticket_id: str, distributor: str | None = None) -> tuple[str, TicketRec]:
        owner = await self._store.aftersales.ticket_owner(ticket_id) if isinstance(ticket_id, str) else None
        if owner is None or (distributor is not None and owner != distributor):
            raise NotFoundError(f"no ticket {ticket_id}")  # another distributor's tickets do not exist for it
        t = await self._store.aftersales.ticket(owner, ticket_id)
        if t is None:
            raise NotFoundError(f"no ticket {ticket_id}")
        return owner, t

    async def get_ticket(self, ticket_id: str, distributor: str | None = None) -> Ticket:
        """A ticket; with *distributor*, only if it is that distributor's."""
        dist, t = await self._ticket_rec(ticket_id, distributor)
        return self._ticket(dist, t, admin=distributor is None)

    async def list_tickets(self, distributor: str | None = None, status: str | None = None, *,
                           after: str | None = None, limit: int | None = None) -> list[Ticket]:
        """Tickets (of one distributor, or all), oldest first, optionally of one status;
        those after ticket id *after*, at most *limit*."""
        owners = {distributor} if distributor is not None else await self._store.aftersales.ticket_owners()
        out = []
        for dist in sorted(owners):
            for t in await self._store.aftersales.tickets(dist):
                if (status is None or t.status == status) and (after is None or t.id > after):
                    out.append(self._ticket(dist, t, admin=distributor is None))
        return sorted(out, key=lambda t: t.ticket_id)[:limit]

    async def resolve_ticket(self, ticket_id: str, decision: Literal["approve", "reject"], *,
                             replace: bool | None = None, note: str | None = None) -> Ticket:
        """Approve or reject an open ticket. Approval invalidates the code, charges the
        supplier's deposit the batch's unit cost, and refunds the unit price, or, with
        *replace* (default: the SKU's ``after_sales``), delivers another code instead
        while there is stock. Idempotent: repeating the decision answers the same ticket."""
        if decision not in ("approve", "reject"):
            raise ValidationError('decision must be "approve" or "reject"')
        note = "" if note is None else text(note, "note")
        dist, t = await self._ticket_rec(ticket_id)
        if replace is None:
            replace = (await self._catalog.get_sku(t.sku)).after_sales == "replace"
        t = (await self._store.aftersales.decide_ticket(dist, ticket_id, decision, bool(replace), note)).ticket
        if t.status == "approving":
            t = await self._sagas.run(self._approve(dist, t))
        return self._ticket(dist, t, admin=True)

    async def _approve(self, dist: str, t: TicketRec) -> TicketRec:
        """Steps 2-4 of an approval (see the module docstring); safe to run again."""
        approval = await self._store.aftersales.invalidate(dist, t)
        batch = await self._inventory.batch_by_seq(approval.seq)
        await self._store.aftersales.supplier_money(batch.supplier, "charge", t.id, batch.unit_cost)
        done = await self._store.aftersales.finish_ticket(dist, t, approval.replacement, batch.unit_cost)
        await self._after_invalidation(batch.supplier)
        return done

    async def recover_ticket(self, dist: str, ticket_id: str) -> bool:
        """Finish an approval a crash interrupted (the sweep's part for tickets)."""
        t = await self._store.aftersales.ticket(dist, ticket_id)
        if t is not None and t.status == "approving":
            await self._approve(dist, t)
        else:
            await self._store.orders.clear_pending(dist, [ticket_id])
        return True

    def _ticket(self, dist: str, t: TicketRec, admin: bool = False) -> Ticket:
        replacement = None
        if t.replacement:
            secret = self._vault.decrypt(base64.b64decode(t.replacement), t.sku.encode())
            replacement = Code(*imports.decode_secret(secret))
        return Ticket(ticket_id=t.id, order_id=t.order, sku=t.sku, code_index=t.index, reason=t.reason,
                      status=t.status, created_at=ms_to_dt(t.created), updated_at=ms_to_dt(t.updated),
                      outcome=t.outcome or None, refund=t.refund, replacement=replacement,  # type: ignore[arg-type]
                      note=t.note or None, distributor=dist if admin else None)
