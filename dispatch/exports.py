"""What leaves the engine in bulk: orders and ledgers as CSV, monthly statements, and
the event streams."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from . import imports
from .errors import NotFoundError, ValidationError
from .models import EventPage, Statement, StatementLine
from .records import PAID, ms_id_floor, ms_to_dt, running
from .store import Store
from .vault import Vault

__all__ = ["Exports"]

_EXPORT_PAGE = 1000


def _mask(code: str) -> str:
    """All but the last 4 characters starred (all of a short code)."""
    return "*" * len(code) if len(code) < 8 else "*" * (len(code) - 4) + code[-4:]


def _csv_safe(text: str) -> str:
    """A value a spreadsheet would take for a formula gets a leading quote."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _month_ms(month: str) -> tuple[int, int]:
    """[start, end) of a ``YYYY-MM`` month (UTC), in ms."""
    m = re.fullmatch(r"(\d{4})-(\d{2})", month) if isinstance(month, str) else None
    if m is None or not 1 <= int(m[2]) <= 12 or int(m[1]) < 1970:
        raise ValidationError(f"month must be YYYY-MM (a month from 1970-01 on), not {month!r}")
    y, mo = int(m[1]), int(m[2])
    start = datetime(y, mo, 1, tzinfo=timezone.utc)
    end = datetime(y + mo // 12, mo % 12 + 1, 1, tzinfo=timezone.utc)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


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


class Exports:
    """Orders and ledgers for accounting, events for whoever follows them."""

    ORDER_COLUMNS = ("order_id", "distributor", "external_ref", "sku", "qty", "delivered", "unit_price", "total",
                     "refunded", "currency", "status", "mode", "created_at", "updated_at", "codes")
    LEDGER_COLUMNS = ("party_type", "party", "entry", "kind", "ref", "amount", "held_delta", "balance", "held", "at")
    STATEMENT_COLUMNS = ("distributor", "month", "line", "count", "amount", "held_delta", "balance", "held")

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    async def export_orders(self, start: datetime | None = None, end: datetime | None = None, *,
                            show_codes: bool = False, page: int = _EXPORT_PAGE) -> AsyncIterator[bytes]:
        """Every distributor's orders created in [start, end) as CSV: the header line, then
        blocks of up to *page* rows, distributor by distributor, oldest first.

        The ``codes`` column holds a paid order's codes masked (``************7X2Q``),
        or in clear with *show_codes* (an admin's explicit request).
        """
        lo = "" if start is None else ms_id_floor(int(start.timestamp() * 1000))[:-1] + "/"  # "/" < "0"
        hi = "~" if end is None else ms_id_floor(int(end.timestamp() * 1000))  # "~" > any id
        out = _CsvBlocks()
        out.writer.writerow(self.ORDER_COLUMNS)
        yield out.take()
        for dist in await self._store.accounts.ids():
            after = lo
            while rows := await self._store.orders.order_records(dist, after, hi, page):
                for r, ciphertexts in rows:
                    after = r.id
                    codes = ""
                    if ciphertexts and r.status in PAID:
                        plain = [imports.decode_secret(self._vault.decrypt(c, r.sku.encode()))[0]
                                 for c in ciphertexts]
                        codes = " ".join(plain if show_codes else map(_mask, plain))
                    out.writer.writerow((r.id, dist, _csv_safe(r.ref), r.sku, r.qty, r.delivered, r.unit_price,
                                         r.total, r.refunded, r.currency, r.status, r.mode,
                                         ms_to_dt(r.created).isoformat(), ms_to_dt(r.updated).isoformat(), codes))
                yield out.take()
                if len(rows) < page:
                    break

    async def export_ledger(self, start: datetime | None = None, end: datetime | None = None, *,
                            page: int = _EXPORT_PAGE) -> AsyncIterator[bytes]:
        """Every ledger entry made in [start, end) as CSV: distributors' balances, then
        suppliers' deposits. A party's ``amount`` column sums to its balance (deposit)."""
        lo = 0 if start is None else int(start.timestamp() * 1000)
        hi = 2 ** 62 if end is None else int(end.timestamp() * 1000)
        out = _CsvBlocks()
        out.writer.writerow(self.LEDGER_COLUMNS)
        yield out.take()
        parties = [("distributor", d, self._store.accounts.ledger) for d in await self._store.accounts.ids()]
        parties += [("supplier", s, self._store.aftersales.supplier_ledger)
                    for s in await self._store.aftersales.supplier_ids()]
        for kind, party, read in parties:
            start_at = bal = held = 0
            while entries := await read(party, start_at, start_at + page - 1):
                for n, (what, ref, b, h, bal, held, ms, _) in enumerate(running(entries, bal, held), start_at):
                    if lo <= ms < hi:
                        out.writer.writerow((kind, party, n, what, _csv_safe(ref), b, h, bal, held,
                                             ms_to_dt(ms).isoformat()))
                yield out.take()
                start_at += len(entries)
                if len(entries) < page:
                    break

    async def statement(self, distributor: str, month: str, *, page: int = _EXPORT_PAGE) -> Statement:
        """*distributor*'s statement for *month* (``YYYY-MM``, UTC): the balance and held
        amount it opened and closed with, and its ledger entries summed by kind."""
        start, end = _month_ms(month)
        if await self._store.accounts.get(distributor) is None:
            raise NotFoundError(f"unknown distributor {distributor}")
        balance = held = 0
        opening: tuple[int, int] | None = None
        lines: dict[str, list[int]] = {}
        reconciled = True  # every entry that carries its running figures agrees with the sums
        at = 0
        while entries := await self._store.accounts.ledger(distributor, at, at + page - 1):
            for kind, _, b, h, bal, hld, ms, off in running(entries, balance, held):
                if ms >= end:
                    break
                if ms >= start:
                    if opening is None:
                        opening = (balance, held)
                    line = lines.setdefault(kind, [0, 0, 0])
                    line[0] += 1
                    line[1] += b
                    line[2] += h
                balance, held, reconciled = bal, hld, reconciled and not off
            else:
                at += len(entries)
                if len(entries) == page:
                    continue
            break
        opening = opening or (balance, held)
        out = [StatementLine(kind=k, count=n, amount=b, held_delta=h) for k, (n, b, h) in sorted(lines.items())]
        return Statement(distributor=distributor, month=month, opening_balance=opening[0], opening_held=opening[1],
                         lines=out, closing_balance=balance, closing_held=held, reconciled=reconciled)

    @staticmethod
    def statement_csv(s: Statement) -> bytes:
        """A statement as CSV: its opening, a line per kind, its closing."""
        out = _CsvBlocks()
        out.writer.writerow(Exports.STATEMENT_COLUMNS)
        out.writer.writerow((s.distributor, s.month, "opening", "", "", "", s.opening_balance, s.opening_held))
        for x in s.lines:
            out.writer.writerow((s.distributor, s.month, x.kind, x.count, x.amount, x.held_delta, "", ""))
        out.writer.writerow((s.distributor, s.month, "closing", "", "", "", s.closing_balance, s.closing_held))
        return out.take()

    async def events(self, stream: str, after: str | None = None, limit: int = 100) -> EventPage:
        """Events of one stream, oldest first: ``dist:<id>`` (orders, tickets),
        ``sku:<id>`` (stock levels) or ``supplier:<id>`` (blacklisting)."""
        kind, _, id_ = stream.partition(":")
        if kind not in ("dist", "sku", "supplier") or not id_:
            raise ValidationError('stream must be "dist:<id>", "sku:<id>" or "supplier:<id>"')
        out = await self._store.events(kind, id_, after, limit)
        return EventPage(events=out, next_after=out[-1].event_id if len(out) == limit else None)
