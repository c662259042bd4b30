"""After-sales and supplier accountability: the half of the Engine that handles failure.

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
import csv
import hmac
import io
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from . import imports
from .errors import (
    AlreadyClaimedError,
    ConflictError,
    DispatchError,
    IdempotencyConflictError,
    NotFoundError,
    SupplierBlacklistedError,
    TicketWindowClosedError,
    ValidationError,
)
from .forecast import forecast
from .models import (Amount, BatchSummary, Code, EventPage, Forecast, LedgerEntry, Supplier, SupplierReport,
                     Ticket)
from .records import (PAID, BatchRec, TicketRec, check, check_ref, decode_batch, decode_codes, decode_event,
                      decode_order, decode_ticket, ledger_entries, ms_id_floor, ms_to_dt, new_id)
from .store import keys

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["AfterSales"]

_UNSET: Any = msgspec.UNSET
_MAX_TEXT = 1000
_RATING_PRIOR = 10  # a new supplier starts as if it had delivered this many good codes
_EXPORT_PAGE = 1000


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= _MAX_TEXT \
            or any(ord(ch) < 32 and ch not in "\t\n" for ch in value):
        raise ValidationError(f"{what} must be 1-{_MAX_TEXT} characters, without control characters")
    return value.strip()


def _mask(code: str) -> str:
    """All but the last 4 characters starred (all of a short code)."""
    return "*" * len(code) if len(code) < 8 else "*" * (len(code) - 4) + code[-4:]


def _csv_safe(text: str) -> str:
    """A value a spreadsheet would take for a formula gets a leading quote."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def rating(delivered: int, invalidated: int) -> float:
    """0-100: the share of good codes, smoothed toward 100 while the sample is small."""
    return round(100 * (delivered - invalidated + _RATING_PRIOR) / (delivered + _RATING_PRIOR), 1)


class _CsvBlocks:
    """Rows written to CSV text a block at a time."""

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self.writer = csv.writer(self._buf, lineterminator="\n")

    def take(self) -> bytes:
        out = self._buf.getvalue().encode()
        self._buf.seek(0)
        self._buf.truncate()
        return out


class AfterSales:
    """Tickets, suppliers, exports, forecasts and events: mixed into :class:`Engine`."""

    # ---- suppliers -----------------------------------------------------------------------
    async def create_supplier(self: Engine, supplier: str, name: str, deposit: int = 0) -> Supplier:
        """Register a supplier, with an opening deposit (a ledger entry ``deposit``/``initial``)."""
        s = check(dict(supplier=supplier, name=name), Supplier, "supplier")
        deposit = check(deposit, Amount, "deposit")
        await self.store.add_member(keys.SUPPLIERS, s.supplier)
        fields = {"name": s.name, "balance": 0, "held": 0, "status": "active", "invalidated": 0,
                  "created": time.time_ns() // 1_000_000}
        if await self.store.put_supplier(s.supplier, "create", fields) == "exists":
            raise ConflictError(f"supplier {s.supplier} exists already")
        if deposit:
            return await self.deposit(s.supplier, deposit, "initial")
        return s

    async def get_supplier(self: Engine, supplier: str) -> Supplier:
        a = await self.store.hash(keys.SupplierKeys(supplier).acct)
        if not a:
            raise NotFoundError(f"unknown supplier {supplier}")
        return Supplier(supplier=supplier, name=a["name"].decode(), deposit=int(a["balance"]),
                        status=a["status"].decode())  # type: ignore[arg-type]

    async def list_suppliers(self: Engine) -> list[Supplier]:
        return [await self.get_supplier(s) for s in await self.store.members(keys.SUPPLIERS)]

    async def update_supplier(self: Engine, supplier: str, *, name: str = _UNSET, status: str = _UNSET,
                              reason: str = "manual") -> Supplier:
        """Rename a supplier, or blacklist it (``status="blacklisted"``: its unsold codes are
        parked or voided, by ``blacklist_action``) or reinstate it (parked codes go back on sale)."""
        current = await self.get_supplier(supplier)
        if name is not _UNSET:
            current.name = check(dict(supplier=supplier, name=name), Supplier, "supplier").name
            await self.store.put_supplier(supplier, "update", {"name": current.name})
        if status is not _UNSET:
            if status not in ("active", "blacklisted"):
                raise ValidationError('status must be "active" or "blacklisted"')
            await self._set_supplier_status(supplier, status, _text(reason, "reason"))
        return await self.get_supplier(supplier)

    async def deposit(self: Engine, supplier: str, amount: int, reference: str) -> Supplier:
        """Credit a supplier's deposit; idempotent by *reference*."""
        amount = check(amount, Amount, "amount")
        if amount <= 0:
            raise ValidationError("amount must be a positive integer (minor units)")
        reply = await self.store.supplier_script("supplier_money", supplier, "deposit",
                                                 check_ref(reference, "reference"), amount)
        status = reply[0].decode()
        if status == "unknown_supplier":
            raise NotFoundError(f"unknown supplier {supplier}")
        if status == "conflict":
            raise IdempotencyConflictError(f"deposit {reference} was made earlier with another amount")
        return await self.get_supplier(supplier)

    async def supplier_ledger(self: Engine, supplier: str) -> list[LedgerEntry]:
        """The supplier's deposits and charges, oldest first."""
        await self.get_supplier(supplier)
        return ledger_entries(await self.store.ledger(keys.SupplierKeys(supplier).ledger))

    async def supplier_report(self: Engine, supplier: str) -> SupplierReport:
        """Deposit, delivered and invalidated codes (per batch too), invalid rate and rating."""
        s = await self.get_supplier(supplier)
        a = await self.store.hash(keys.SupplierKeys(supplier).acct)
        batches = await self._supplier_batches(supplier)
        counts = await self._batch_counts(batches)
        rows = [BatchSummary(batch_id=b.batch_id, sku=b.sku, unit_cost=b.unit_cost,
                             status="parked" if counts[b.batch_id][2] and b.status != "voided" else b.status,
                             accepted=b.accepted, duplicate=b.duplicate, malformed=b.malformed, voided=b.voided,
                             delivered=counts[b.batch_id][0], invalidated=counts[b.batch_id][1],
                             created_at=ms_to_dt(b.created)) for b in batches]
        delivered = sum(r.delivered for r in rows)
        invalidated = sum(r.invalidated for r in rows)
        reason = a.get("reason", b"").decode()
        return SupplierReport(supplier=supplier, name=s.name, status=s.status, deposit=s.deposit,
                              delivered=delivered, invalidated=invalidated,
                              invalid_rate=round(invalidated / delivered, 4) if delivered else 0.0,
                              rating=rating(delivered, invalidated),
                              blacklist_reason=reason if s.status == "blacklisted" and reason else None,
                              batches=rows)

    async def _supplier_batches(self: Engine, supplier: str) -> list[BatchRec]:
        ids = await self.store.members(keys.SupplierKeys(supplier).batches)
        raws = await self.store.hash_fields(keys.BATCHES, ids)
        return [decode_batch(r) for r in raws if r is not None]

    async def _batch_counts(self: Engine, batches: Iterable[BatchRec]) -> dict[str, tuple[int, int, bool]]:
        """batch id -> (codes delivered, codes invalidated, parked) from the SKU shards."""
        by_sku: dict[str, list[BatchRec]] = defaultdict(list)
        for b in batches:
            by_sku[b.sku].append(b)
        out = {}
        for sku, group in by_sku.items():
            k = keys.SkuKeys(sku)
            stats = await self.store.hash(k.batch_stats)
            parked = set(await self.store.members(k.parked))
            for b in group:
                out[b.batch_id] = (int(stats.get(f"{b.seq}:d", 0)), int(stats.get(f"{b.seq}:i", 0)),
                                   str(b.seq) in parked)
        return out

    async def _set_supplier_status(self: Engine, supplier: str, status: str, reason: str,
                                   invalid_rate: float = 0.0) -> None:
        reply = await self.store.supplier_script("supplier_status", supplier, status, reason,
                                                 round(invalid_rate * 10_000))
        if reply[0] == b"unknown_supplier":
            raise NotFoundError(f"unknown supplier {supplier}")
        # Also on "again": finishes a blacklisting that a crash interrupted (each step is idempotent).
        for b in await self._supplier_batches(supplier):
            if b.status == "voided":
                continue
            if status == "blacklisted" and self.config.blacklist_action == "void":
                await self.void_batch(b.batch_id)
            else:
                await self.store.sku_script("batch_park", b.sku, b.seq,
                                            "park" if status == "blacklisted" else "unpark")

    async def _after_invalidation(self: Engine, supplier: str) -> None:
        """Blacklist the supplier if its invalid rate is now over the limit; re-rank its
        batches in SKUs sold best-rated first."""
        report = await self.supplier_report(supplier)
        cfg = self.config
        if (cfg.auto_blacklist and report.status == "active" and report.delivered >= cfg.blacklist_min_delivered
                and report.invalid_rate > cfg.blacklist_invalid_rate):
            await self._set_supplier_status(
                supplier, "blacklisted",
                f"auto: {report.invalidated} of {report.delivered} codes invalid "
                f"({report.invalid_rate:.2%} > {cfg.blacklist_invalid_rate:.2%})", report.invalid_rate)
        for sku in {b.sku for b in report.batches}:
            if (await self.get_sku(sku)).sale_order == "best_rated":
                await self._requeue(sku)

    async def _requeue(self: Engine, sku: str, only: BatchRec | None = None) -> None:
        """Set the sale priority of the SKU's batches (or of the new batch *only*) from its
        sale order: oldest first (the seq), or best-rated supplier first, then oldest."""
        best_rated = (await self.get_sku(sku)).sale_order == "best_rated"
        if only is not None and not best_rated:
            return  # a new batch's priority is its seq already
        if only is not None:
            batches = [only]
        else:
            batches = [b for b in map(decode_batch, (await self.store.records(keys.BATCHES)).values())
                       if b.sku == sku]
        ratings: dict[str, float] = {}
        scores: list[int] = []
        for b in batches:
            score = b.seq
            if best_rated:
                if b.supplier not in ratings:
                    counts = (await self._batch_counts(await self._supplier_batches(b.supplier))).values()
                    ratings[b.supplier] = rating(sum(c[0] for c in counts), sum(c[1] for c in counts))
                score += (1000 - round(ratings[b.supplier] * 10)) << 32
            scores += [b.seq, score]
        if scores:
            await self.store.sku_script("sku_requeue", sku, len(scores) // 2, *scores)

    async def _batch_by_seq(self: Engine, seq: int) -> BatchRec:
        batch_id = await self.store.record(keys.BATCH_SEQ, str(seq))
        if batch_id is None:
            raise DispatchError(f"no batch has seq {seq}")
        return await self._batch(batch_id.decode())

    # ---- tickets -------------------------------------------------------------------------
    async def open_ticket(self: Engine, distributor: str, order_id: str, code: str, reason: str) -> Ticket:
        """File an after-sales claim on *code* of one of the distributor's delivered orders,
        within ``ticket_window_s`` of delivery. A code is claimed once (AlreadyClaimedError)."""
        reason = _text(reason, "reason")
        if not isinstance(code, str) or not 1 <= len(code) <= self.config.max_code_length:
            raise ValidationError(f"code must be 1-{self.config.max_code_length} characters")
        raw, blob = await self.store.order(distributor, order_id)
        if raw is None:
            raise NotFoundError(f"no order {order_id}")
        rec = decode_order(raw)
        if rec.status not in ("delivered", "partially_refunded"):
            raise ConflictError(f"order {order_id} is {rec.status}; tickets are filed on delivered codes")
        index = None
        for i, c in enumerate(decode_codes(blob) if blob else []):
            plain = imports.decode_secret(self.vault.decrypt(c, rec.sku.encode()))[0]
            if hmac.compare_digest(plain.encode(), code.strip().encode()):
                index = i
        if index is None:
            raise ValidationError(f"that code is not one of order {order_id}'s codes")
        ticket_id = "tk_" + new_id()
        await self.store.set_field(keys.TICKETS, ticket_id, distributor)
        reply = await self.store.account_script("ticket_open", distributor, ticket_id, order_id, index, reason,
                                                self.config.ticket_window_s * 1000)
        status = reply[0].decode()
        if status == "ok":
            return self._ticket(distributor, decode_ticket(reply[1]))
        await self.store.del_field(keys.TICKETS, ticket_id)
        if status == "claimed":
            held_by = reply[1].decode()
            raise AlreadyClaimedError(f"that code is claimed by ticket {held_by}", ticket_id=held_by)
        if status == "window_closed":
            raise TicketWindowClosedError(f"order {order_id} was delivered more than "
                                          f"{self.config.ticket_window_s} s ago")
        if status == "invalid_state":
            raise ConflictError(f"order {order_id} is {reply[1].decode()}; tickets are filed on delivered codes")
        raise NotFoundError(f"no order {order_id}")

    async def _ticket_rec(self: Engine, ticket_id: str, distributor: str | None = None) -> tuple[str, TicketRec]:
        owner = await self.store.record(keys.TICKETS, ticket_id) if isinstance(ticket_id, str) else None
        if owner is None or (distributor is not None and owner.decode() != distributor):
            raise NotFoundError(f"no ticket {ticket_id}")  # another distributor's tickets do not exist for it
        dist = owner.decode()
        raw = await self.store.record(keys.AcctKeys(dist).tickets, ticket_id)
        if raw is None:
            raise NotFoundError(f"no ticket {ticket_id}")
        return dist, decode_ticket(raw)

    async def get_ticket(self: Engine, ticket_id: str, distributor: str | None = None) -> Ticket:
        """A ticket; with *distributor*, only if it is that distributor's."""
        dist, t = await self._ticket_rec(ticket_id, distributor)
        return self._ticket(dist, t, admin=distributor is None)

    async def list_tickets(self: Engine, distributor: str | None = None, status: str | None = None) -> list[Ticket]:
        """Tickets (of one distributor, or all), oldest first, optionally of one status."""
        if distributor is not None:
            owners = {distributor}
        else:
            owners = {d.decode() for d in (await self.store.records(keys.TICKETS)).values()}
        out = []
        for dist in sorted(owners):
            for raw in (await self.store.records(keys.AcctKeys(dist).tickets)).values():
                t = decode_ticket(raw)
                if status is None or t.status == status:
                    out.append(self._ticket(dist, t, admin=distributor is None))
        return sorted(out, key=lambda t: t.ticket_id)

    async def resolve_ticket(self: Engine, ticket_id: str, decision: Literal["approve", "reject"], *,
                             replace: bool | None = None, note: str | None = None) -> Ticket:
        """Approve or reject an open ticket. Approval invalidates the code, charges the
        supplier's deposit the batch's unit cost, and refunds the unit price, or, with
        *replace* (default: the SKU's ``after_sales``), delivers another code instead
        while there is stock. Idempotent: repeating the decision answers the same ticket."""
        if decision not in ("approve", "reject"):
            raise ValidationError('decision must be "approve" or "reject"')
        note = "" if note is None else _text(note, "note")
        dist, t = await self._ticket_rec(ticket_id)
        if replace is None:
            replace = (await self.get_sku(t.sku)).after_sales == "replace"
        reply = await self.store.account_script("ticket_decide", dist, ticket_id, decision, int(bool(replace)), note)
        result = reply[0].decode()
        if result == "not_found":
            raise NotFoundError(f"no ticket {ticket_id}")
        t = decode_ticket(reply[1])
        if result == "conflict":
            raise ConflictError(f"ticket {ticket_id} is {t.status} already")
        if t.status == "approving":
            t = await self._saga(self._approve(dist, t))
        return self._ticket(dist, t, admin=True)

    async def _approve(self: Engine, dist: str, t: TicketRec) -> TicketRec:
        """Steps 2-4 of an approval (see the module docstring); safe to run again."""
        reply = await self.store.sku_script("sku_invalidate", t.sku, t.id, t.order, t.index, int(t.replace))
        outcome = reply[0].decode()
        if outcome not in ("refund", "replaced"):
            raise DispatchError(f"ticket {t.id}: the SKU shard answered {outcome}")
        batch = await self._batch_by_seq(int(reply[1]))
        await self.store.supplier_script("supplier_money", batch.supplier, "charge", t.id, batch.unit_cost)
        replacement = base64.b64encode(reply[2]).decode() if outcome == "replaced" else ""
        done = await self.store.account_script("ticket_finish", dist, t.id, outcome, replacement, batch.unit_cost)
        if done[0] == b"not_found":
            raise DispatchError(f"ticket {t.id} vanished while it was approved")
        await self._after_invalidation(batch.supplier)
        return decode_ticket(done[1])

    async def _recover_ticket(self: Engine, dist: str, ticket_id: str) -> bool:
        """Finish an approval a crash interrupted (the sweep's part for tickets)."""
        raw = await self.store.record(keys.AcctKeys(dist).tickets, ticket_id)
        if raw is not None and decode_ticket(raw).status == "approving":
            await self._approve(dist, decode_ticket(raw))
        else:
            await self.store.clear_pending(dist, [ticket_id])
        return True

    def _ticket(self: Engine, dist: str, t: TicketRec, admin: bool = False) -> Ticket:
        replacement = None
        if t.replacement:
            secret = self.vault.decrypt(base64.b64decode(t.replacement), t.sku.encode())
            replacement = Code(*imports.decode_secret(secret))
        return Ticket(ticket_id=t.id, order_id=t.order, sku=t.sku, code_index=t.index, reason=t.reason,
                      status=t.status, created_at=ms_to_dt(t.created), updated_at=ms_to_dt(t.updated),
                      outcome=t.outcome or None, refund=t.refund, replacement=replacement,  # type: ignore[arg-type]
                      note=t.note or None, distributor=dist if admin else None)

    # ---- exports -------------------------------------------------------------------------
    _ORDER_COLUMNS = ("order_id", "distributor", "external_ref", "sku", "qty", "delivered", "unit_price", "total",
                      "refunded", "currency", "status", "mode", "created_at", "updated_at", "codes")

    async def export_orders(self: Engine, start: datetime | None = None, end: datetime | None = None, *,
                            show_codes: bool = False, page: int = _EXPORT_PAGE) -> AsyncIterator[bytes]:
        """Every distributor's orders created in [start, end) as CSV: the header line, then
        blocks of up to *page* rows, distributor by distributor, oldest first.

        The ``codes`` column holds a paid order's codes masked (``************7X2Q``),
        or in clear with *show_codes* (an admin's explicit request).
        """
        lo = "" if start is None else ms_id_floor(int(start.timestamp() * 1000))[:-1] + "/"  # "/" < "0"
        hi = "~" if end is None else ms_id_floor(int(end.timestamp() * 1000))  # "~" > any id
        out = _CsvBlocks()
        out.writer.writerow(self._ORDER_COLUMNS)
        yield out.take()
        for dist in await self.store.members(keys.DISTS):
            after = lo
            while rows := await self.store.order_records(dist, after, hi, page):
                for raw, blob in rows:
                    r = decode_order(raw)
                    after = r.id
                    codes = ""
                    if blob and r.status in PAID:
                        plain = [imports.decode_secret(self.vault.decrypt(c, r.sku.encode()))[0]
                                 for c in decode_codes(blob)]
                        codes = " ".join(plain if show_codes else map(_mask, plain))
                    out.writer.writerow((r.id, dist, _csv_safe(r.ref), r.sku, r.qty, r.delivered, r.unit_price,
                                         r.total, r.refunded, r.currency, r.status, r.mode,
                                         ms_to_dt(r.created).isoformat(), ms_to_dt(r.updated).isoformat(), codes))
                yield out.take()
                if len(rows) < page:
                    break

    _LEDGER_COLUMNS = ("party_type", "party", "entry", "kind", "ref", "amount", "held_delta", "balance", "held", "at")

    async def export_ledger(self: Engine, start: datetime | None = None, end: datetime | None = None, *,
                            page: int = _EXPORT_PAGE) -> AsyncIterator[bytes]:
        """Every ledger entry made in [start, end) as CSV: distributors' balances, then
        suppliers' deposits. A party's ``amount`` column sums to its balance (deposit)."""
        lo = 0 if start is None else int(start.timestamp() * 1000)
        hi = 2 ** 62 if end is None else int(end.timestamp() * 1000)
        out = _CsvBlocks()
        out.writer.writerow(self._LEDGER_COLUMNS)
        yield out.take()
        parties = [("distributor", d, keys.AcctKeys(d).ledger) for d in await self.store.members(keys.DISTS)]
        parties += [("supplier", s, keys.SupplierKeys(s).ledger) for s in await self.store.members(keys.SUPPLIERS)]
        for kind, party, key in parties:
            start_at = 0
            while entries := await self.store.ledger(key, start_at, start_at + page - 1):
                for n, (what, ref, b, h, bal, held, ms) in enumerate(entries, start_at):
                    if lo <= int(ms) < hi:
                        out.writer.writerow((kind, party, n, what, _csv_safe(ref), b, h, bal, held,
                                             ms_to_dt(int(ms)).isoformat()))
                yield out.take()
                start_at += len(entries)
                if len(entries) < page:
                    break

    # ---- restock forecast ----------------------------------------------------------------
    async def forecast(self: Engine, sku: str, available: int) -> Forecast:
        """Days of cover and a reorder quantity for *sku* from its hourly sales."""
        hourly = {int(h): int(n) for h, n in (await self.store.hash(keys.SkuKeys(sku).sales)).items()}
        return forecast(hourly, time.time_ns() // 3_600_000_000_000, available,
                        window_days=self.config.forecast_window_days,
                        lead_time_days=self.config.restock_lead_time_days)

    # ---- events --------------------------------------------------------------------------
    async def events(self: Engine, stream: str, after: str | None = None, limit: int = 100) -> EventPage:
        """Events of one stream, oldest first: ``dist:<id>`` (orders, tickets),
        ``sku:<id>`` (stock levels) or ``supplier:<id>`` (blacklisting)."""
        kind, _, id_ = stream.partition(":")
        if kind not in ("dist", "sku", "supplier") or not id_:
            raise ValidationError('stream must be "dist:<id>", "sku:<id>" or "supplier:<id>"')
        rows = await self.store.events(keys.events_key(kind, id_), after or "-", limit)
        out = [decode_event(i, f) for i, f in rows]
        return EventPage(events=out, next_after=out[-1].event_id if len(out) == limit else None)

    async def _refuse_blacklisted(self: Engine, supplier: str) -> None:
        if (await self.get_supplier(supplier)).status == "blacklisted":
            raise SupplierBlacklistedError(f"supplier {supplier} is blacklisted: its codes are not taken")

