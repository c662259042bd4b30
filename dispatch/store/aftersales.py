"""After-sales in Redis: suppliers (deposit, ledger, status) on their own shards, and
tickets, kept in their distributor's account with a global index of who owns which."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import msgspec

from ..records import TicketRec, decode_ticket
from . import keys
from .accounts import LedgerRow
from .replies import Approval, Decided, refusal, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AfterSalesStore", "SupplierRow"]


class SupplierRow(msgspec.Struct):
    """A supplier as its hash holds it; ``balance`` is the deposit."""

    name: str
    balance: int
    status: str
    reason: str = ""


class AfterSalesStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    # ---- suppliers -------------------------------------------------------------------
    async def create_supplier(self, supplier: str, fields: dict[str, Any]) -> bool:
        """False if it exists."""
        with translated():
            await self._db.client.sadd(keys.SUPPLIERS, supplier)
        return await self._db.put(keys.SupplierKeys(supplier).acct, "create", fields) == "ok"

    async def update_supplier(self, supplier: str, fields: dict[str, Any]) -> bool:
        return await self._db.put(keys.SupplierKeys(supplier).acct, "update", fields) == "ok"

    async def supplier_ids(self) -> list[str]:
        return await self._db.members(keys.SUPPLIERS)

    async def supplier(self, supplier: str) -> SupplierRow | None:
        with translated():
            raw = await self._db.client.hgetall(keys.SupplierKeys(supplier).acct)
        if not raw:
            return None
        return msgspec.convert({k.decode(): v.decode() for k, v in raw.items()}, SupplierRow, strict=False)

    async def supplier_ledger(self, supplier: str, start: int = 0, stop: int = -1) -> list[LedgerRow]:
        return await self._db.ledger(keys.SupplierKeys(supplier).ledger, start, stop)

    async def supplier_money(self, supplier: str, kind: str, reference: str, amount: int) -> int:
        """A deposit (credit) or a charge (debit) of *amount*, once per (kind, reference):
        the deposit after it. NotFoundError, IdempotencyConflictError."""
        reply = await self._db.run("supplier_money", keys.SupplierKeys(supplier).all, [kind, reference, amount])
        if reply[0] not in (b"ok", b"again"):
            raise refusal("supplier_money", reply[0], supplier=supplier, ref=reference)
        return int(reply[1])

    async def set_supplier_status(self, supplier: str, status: str, reason: str, invalid_rate_bps: int) -> None:
        """Blacklist or reinstate (told on the supplier's event stream). NotFoundError."""
        reply = await self._db.run("supplier_status", keys.SupplierKeys(supplier).all,
                                   [status, reason, invalid_rate_bps])
        if reply[0] not in (b"ok", b"again"):
            raise refusal("supplier_status", reply[0], supplier=supplier)

    # ---- tickets ---------------------------------------------------------------------
    async def ticket_owner(self, ticket_id: str) -> str | None:
        with translated():
            owner = await self._db.client.hget(keys.TICKETS, ticket_id)
        return None if owner is None else owner.decode()

    async def ticket_owners(self) -> set[str]:
        """Every distributor that has filed a ticket."""
        with translated():
            return {d.decode() for d in await self._db.client.hvals(keys.TICKETS)}

    async def ticket(self, dist: str, ticket_id: str) -> TicketRec | None:
        with translated():
            raw = await self._db.client.hget(keys.AcctKeys(dist).tickets, ticket_id)
        return None if raw is None else decode_ticket(raw)

    async def tickets(self, dist: str) -> list[TicketRec]:
        with translated():
            raw = await self._db.client.hgetall(keys.AcctKeys(dist).tickets)
        return [decode_ticket(r) for r in raw.values()]

    async def open_ticket(self, dist: str, ticket_id: str, order_id: str, index: int, reason: str,
                          window_ms: int) -> TicketRec:
        """File a ticket on code *index* of an order. AlreadyClaimedError,
        TicketWindowClosedError, ConflictError (not delivered), NotFoundError."""
        c = self._db.client
        with translated():
            await c.hset(keys.TICKETS, ticket_id, dist)  # first: a ticket is never without its owner
        reply = await self._db.run("ticket_open", keys.AcctKeys(dist).all,
                                   [ticket_id, order_id, index, reason, window_ms])
        if reply[0] == b"ok":
            return decode_ticket(reply[1])
        with translated():
            await c.hdel(keys.TICKETS, ticket_id)
        detail = reply[1].decode() if len(reply) > 1 else ""
        raise refusal("ticket_open", reply[0], order=order_id, ticket_id=detail, state=detail,
                      window_s=window_ms // 1000)

    async def decide_ticket(self, dist: str, ticket_id: str, decision: str, replace: bool, note: str) -> Decided:
        """The first decision on a ticket wins: NotFoundError; ConflictError if another
        decision was made."""
        reply = await self._db.run("ticket_decide", keys.AcctKeys(dist).all,
                                   [ticket_id, decision, int(replace), note])
        if reply[0] == b"not_found":
            raise refusal("ticket_decide", reply[0], ticket=ticket_id)
        t = decode_ticket(reply[1])
        if reply[0] == b"conflict":
            raise refusal("ticket_decide", reply[0], ticket=ticket_id, state=t.status)
        return Decided(reply[0].decode(), t)

    async def invalidate(self, dist: str, t: TicketRec) -> Approval:
        """The SKU side of an approval: the ticket's code is invalidated, a replacement
        taken if the ticket asks for one and there is stock (in the bucket the order's
        codes came from)."""
        rec, _ = await self._db.orders.order(dist, t.order)
        shard = keys.bucket_shard(t.sku, rec.bk if rec is not None else 0)
        k = keys.SkuKeys(shard)
        reply = await self._db.run("sku_invalidate", k.all, [k.pool_prefix, t.id, t.order, t.index, int(t.replace)])
        await self._db.tell_levels([shard])
        if reply[0] not in (b"refund", b"replaced"):
            raise refusal("sku_invalidate", reply[0], ticket=t.id)
        return Approval(int(reply[1]), reply[2] if reply[0] == b"replaced" else None)

    async def finish_ticket(self, dist: str, t: TicketRec, replacement: bytes | None, cost: int) -> TicketRec:
        """The account side of an approval: the refund (or the replacement kept), approved."""
        outcome, blob = ("replaced", base64.b64encode(replacement).decode()) if replacement else ("refund", "")
        reply = await self._db.run("ticket_finish", keys.AcctKeys(dist).all, [t.id, outcome, blob, cost])
        if reply[0] not in (b"ok", b"again"):
            raise refusal("ticket_finish", reply[0], ticket=t.id)
        return decode_ticket(reply[1])
