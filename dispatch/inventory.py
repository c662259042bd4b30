"""Stock: batches of codes imported into a SKU's pools, deduplicated across every batch
ever imported; their sale order; voiding and parking them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from array import array
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from . import imports
from .catalog import Catalog
from .config import Config
from .errors import ConflictError, NotFoundError, SupplierBlacklistedError, ValidationError
from .models import Amount, BatchReport, BatchSummary, DuplicateLine, Id, MalformedLine
from .records import BatchRec, check, ms_to_dt, new_id
from .store import Store
from .vault import Vault

__all__ = ["Inventory", "rating"]

_MALFORMED_SHOWN = 1000
_RATING_PRIOR = 10  # a new supplier starts as if it had delivered this many good codes
#: Codes whose fingerprints are claimed together. fp_claim reads and writes a bucket's
#: fingerprints with one call each, so the more a window brings to each of the 65,536
#: buckets, the fewer calls a code costs Redis; a window holds 20 bytes a code and its secret.
_CLAIM_WINDOW = 1 << 20
#: Chunks pushed in one pipelined write, while the next ones are encrypted.
_PUSH_GROUP = 4
#: Distinct expiries in one import: each is a pool of its own (a sub-batch).
_MAX_EXPIRIES = 1000
#: first_expiring: the score of codes without an expiry (plus their seq), after every expiry in ms.
_NO_EXPIRY = 1 << 52


def rating(delivered: int, invalidated: int) -> float:
    """0-100: the share of a supplier's good codes, smoothed toward 100 while the sample is small."""
    return round(100 * (delivered - invalidated + _RATING_PRIOR) / (delivered + _RATING_PRIOR), 1)


class _Window:
    """Consecutive chunks of an import waiting for their claims: per chunk, its number
    and its fresh codes as Fingerprints.fresh packs them (secrets, ends, fingerprints);
    the line number and the expiry (unix ms, 0 for none) of each fresh code."""

    __slots__ = ("chunks", "codes", "lines", "expiries")

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes, bytes, bytes]] = []
        self.codes = 0
        self.lines = array("I")
        self.expiries = array("q")

    def add(self, chunk_no: int, secrets_: bytes, ends: bytes, fps: bytes, lines: array[int],
            expiries: array[int]) -> None:
        self.chunks.append((chunk_no, secrets_, ends, fps))
        self.codes += len(fps) // 16
        self.lines += lines
        self.expiries += expiries


class _Duplicates:
    """The duplicate lines of an import: counted, and the first _MALFORMED_SHOWN of each
    kind (in this file, of earlier batches) kept to be told."""

    def __init__(self) -> None:
        self.count = 0
        self.in_file: list[DuplicateLine] = []
        self.earlier: list[DuplicateLine] = []

    def shown(self) -> list[DuplicateLine]:
        return sorted(self.in_file + self.earlier, key=lambda d: d.line)[:_MALFORMED_SHOWN]


def _by_expiry(expiries: array[int]) -> dict[int, list[int]]:
    """Expiry -> the indexes of the codes that have it, in order."""
    out: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(expiries):
        out[e].append(i)
    return out


async def _chain(first: imports.ParsedChunk, rest: Any) -> Any:
    yield first
    async for chunk in rest:
        yield chunk


class Inventory:
    """Imports, batches and the order their codes are sold in."""

    def __init__(self, store: Store, config: Config, vault: Vault, catalog: Catalog) -> None:
        self._store = store
        self._config = config
        self._vault = vault
        self._catalog = catalog

    # ---- import ----------------------------------------------------------------------
    async def import_codes(self, source: Any, *, sku: str, supplier: str, unit_cost: int,
                           batch_id: str | None = None, format: str = "auto") -> BatchReport:
        """Load a batch of codes into a SKU's stock.

        *source* is a path, bytes, or a (sync or async) iterable of byte blocks, in
        the text or CSV format. Each code is encrypted; codes seen before in this
        file or in any earlier batch (any SKU) are counted as duplicates and
        skipped, and reported with their line numbers. Lines that break the SKU's code
        or PIN rule are malformed. Sending the same *batch_id* again resumes it:
        nothing is added twice, and a batch sent again whole once imported answers its
        report with ``replayed``. A body that is not text, or holds no line, is refused
        (ValidationError) before anything is stored. A code whose ``expires_at`` (CSV)
        leaves no more than the SKU's minimum shelf life is malformed; the others are
        kept in one pool per expiry (sub-batches), retired when it comes.
        """
        rules = await self._catalog.get_sku(sku)
        intake = imports.Intake(rules.code_rule, rules.pin_rule, now_ms=time.time_ns() // 1_000_000,
                                min_shelf_life_s=rules.min_shelf_life_s, max_expiries=_MAX_EXPIRIES)
        s = await self._store.aftersales.supplier(supplier)
        if s is None:
            raise NotFoundError(f"unknown supplier {supplier}")
        if s.status == "blacklisted":
            raise SupplierBlacklistedError(f"supplier {supplier} is blacklisted: its codes are not taken")
        unit_cost = check(unit_cost, Amount, "unit_cost")
        batch_id = check(batch_id or "b" + new_id().lower(), Id, "batch_id")
        chunks = aiter(imports.parse_codes(source, format=format, max_length=self._config.max_code_length,
                                           chunk_lines=self._config.import_chunk))
        # The start of the body is judged (text? a valid header?) before anything is stored.
        first = await anext(chunks, None)
        if first is None:
            raise ValidationError("the import holds no codes: its body is empty or blank")
        batch = await self._open_batch(batch_id, sku, supplier, unit_cost, rules.buckets)
        before = (batch.status, batch.accepted, batch.duplicate, batch.malformed)

        fingerprints = self._vault.fingerprints()
        accepted = malformed = 0
        dups = _Duplicates()
        bad: list[MalformedLine] = []
        window, chunk_no = _Window(), 0
        # One window in flight (claimed, then encrypted and pushed) while the next is read.
        storing: asyncio.Future[int] | None = None
        try:
            async for chunk in _chain(first, chunks):
                chunk, expiries = intake.conform(chunk)
                malformed += len(chunk.malformed)
                for line, reason in chunk.malformed[: max(0, _MALFORMED_SHOWN - len(bad))]:
                    bad.append(MalformedLine(line=line, reason=reason))
                # Off the event loop (the core lets go of the GIL): the window in flight
                # keeps sending and reading meanwhile.
                secrets_, ends, fps, again = await asyncio.to_thread(fingerprints.fresh, chunk.codes, chunk.secrets)
                lines = chunk.lines
                if again:  # the fresh codes' lines and expiries only
                    kept = self._repeats(fingerprints, chunk, fps, dups)
                    lines = [lines[i] for i in kept]
                    expiries = expiries and [expiries[i] for i in kept]
                window.add(chunk_no, secrets_, ends, fps, array("I", lines),
                           array("q", expiries) if expiries else array("q", bytes(8 * len(lines))))
                chunk_no += 1
                if window.codes >= _CLAIM_WINDOW:
                    if storing is not None:
                        accepted += await storing
                    storing, window = asyncio.ensure_future(self._store_window(batch, window, dups)), _Window()
            if storing is not None:
                accepted += await storing
            accepted += await self._store_window(batch, window, dups)
        finally:
            if storing is not None:
                storing.cancel()
        duplicate = dups.count
        replayed = before == ("imported", accepted, duplicate, malformed)
        if not replayed:
            batch.status, batch.accepted, batch.duplicate, batch.malformed = "imported", accepted, duplicate, malformed
            await self._store.inventory.save_batch(batch)
        shown = dups.shown()
        return BatchReport(batch_id=batch_id, sku=sku, supplier=supplier, accepted=accepted, duplicate=duplicate,
                           malformed=malformed, malformed_lines=bad, malformed_truncated=malformed > len(bad),
                           duplicate_lines=shown, duplicate_truncated=duplicate > len(shown), replayed=replayed)

    @staticmethod
    def _repeats(fingerprints: Any, chunk: imports.ParsedChunk, fps: bytes, dups: _Duplicates) -> list[int]:
        """The indexes in *chunk* of its fresh codes (*fps*, in order), telling the others
        as repeats within the file. A repeat's fingerprint was seen before its line, so it
        never equals the next fresh one: one pass pairs them."""
        kept, j, n = [], 0, len(fps) // 16
        for i, (code, line) in enumerate(zip(chunk.codes, chunk.lines)):
            if j < n and fingerprints.fingerprint(code) == fps[16 * j:16 * j + 16]:
                kept.append(i)
                j += 1
            else:
                dups.count += 1
                if len(dups.in_file) < _MALFORMED_SHOWN:
                    dups.in_file.append(DuplicateLine(line=line, of="this_file"))
        return kept

    async def _store_window(self, batch: BatchRec, window: _Window, dups: _Duplicates) -> int:
        """Claim the fingerprints of a window, then encrypt the codes this batch owns and
        push them chunk by chunk: the codes stored. Codes of earlier batches are told
        to *dups*."""
        if not window.chunks:
            return 0
        owned, others = await self._store.inventory.claim_fingerprints(
            batch.seq, b"".join(c[3] for c in window.chunks))
        dups.count += len(others)
        owners: dict[int, BatchRec] = {}
        for at in sorted(others)[:max(0, _MALFORMED_SHOWN - len(dups.earlier))]:
            seq = others[at]
            if seq not in owners:
                owners[seq] = await self.batch_by_seq(seq)
            b = owners[seq]
            # another supplier's batch is not named: its codes are not this supplier's to know
            dups.earlier.append(DuplicateLine(line=window.lines[at], of="this_sku" if b.sku == batch.sku else "other_sku",
                                              batch_id=b.batch_id if b.supplier == batch.supplier else None))
        aad = batch.sku.encode()
        stored = at = 0
        group: list[tuple[int, int, bytes, list[bytes], int]] = []
        pushing: asyncio.Future[None] | None = None
        try:
            for chunk_no, secrets_, ends, fps in window.chunks:
                n = len(fps) // 16
                keep = bytes(owned[at:at + n])
                expiries = window.expiries[at:at + n]
                at += n
                if keep.count(0):
                    fps = b"".join(fps[16 * i:16 * i + 16] for i in range(n) if keep[i])
                    expiries = array("q", [e for e, k in zip(expiries, keep) if k])
                # off the event loop too, which meanwhile writes the group in flight
                ciphertexts = await asyncio.to_thread(self._vault.encrypt_chunk, secrets_, ends, keep, aad)
                stored += len(ciphertexts)
                if not any(expiries):
                    group.append((batch.seq, chunk_no, hashlib.sha256(fps).digest(), ciphertexts, 0))
                else:  # each expiry to its own pool
                    for expires, picked in _by_expiry(expiries).items():
                        seq = batch.seq
                        if expires:
                            seq = batch.subs.get(expires) or await self._add_sub_batch(batch, expires)
                        part = b"".join(fps[16 * i:16 * i + 16] for i in picked)
                        group.append((seq, chunk_no, hashlib.sha256(part).digest(), [ciphertexts[i] for i in picked],
                                      expires))
                if len(group) >= _PUSH_GROUP:
                    if pushing is not None:
                        await pushing
                    pushing, group = asyncio.ensure_future(self._store.inventory.push_chunks(batch, group)), []
            if pushing is not None:
                await pushing
            if group:
                await self._store.inventory.push_chunks(batch, group)
        finally:
            if pushing is not None:
                pushing.cancel()
        return stored

    async def _add_sub_batch(self, batch: BatchRec, expires: int) -> int:
        """A pool for the batch's codes that expire at *expires*, placed in the sale order
        and parked if the batch is, before any code goes to it."""
        seq = await self._store.inventory.add_sub_batch(batch, expires)
        await self.requeue(batch.sku, only=batch)
        if batch.seq in (await self._store.inventory.batch_counts(batch.sku))[1]:
            await self._store.inventory.park_batch(batch, True)
        return seq

    async def _open_batch(self, batch_id: str, sku: str, supplier: str, unit_cost: int, buckets: int) -> BatchRec:
        # a batch keeps the buckets it was opened with: a resumed import puts each part where it went first
        fresh = BatchRec(batch_id=batch_id, sku=sku, supplier=supplier, unit_cost=unit_cost,
                         seq=await self._store.inventory.next_batch_seq(), created=time.time_ns() // 1_000_000,
                         buckets=buckets, route=self._store.inventory.route(sku, buckets))
        if await self._store.inventory.create_batch(fresh):
            await self.requeue(sku, only=fresh)
            return fresh
        earlier = await self.batch(batch_id)
        if (earlier.sku, earlier.supplier, earlier.unit_cost) != (sku, supplier, unit_cost):
            raise ConflictError(f"batch {batch_id} exists for SKU {earlier.sku}, supplier {earlier.supplier}, "
                                f"unit cost {earlier.unit_cost}")
        if earlier.status == "voided":
            raise ConflictError(f"batch {batch_id} is voided")
        return earlier

    # ---- batches ---------------------------------------------------------------------
    async def batch(self, batch_id: str) -> BatchRec:
        b = await self._store.inventory.batch(batch_id)
        if b is None:
            raise NotFoundError(f"unknown batch {batch_id}")
        return b

    async def batch_by_seq(self, seq: int) -> BatchRec:
        batch_id = await self._store.inventory.batch_id_of(seq)
        if batch_id is None:
            raise NotFoundError(f"no batch has seq {seq}")
        return await self.batch(batch_id)

    async def batch_counts(self, batches: Iterable[BatchRec]) -> dict[str, tuple[int, int, bool, int]]:
        """batch id -> (codes delivered, codes invalidated, parked, codes expired) from the
        SKU shards, over all the batch's pools."""
        by_sku: dict[str, list[BatchRec]] = defaultdict(list)
        for b in batches:
            by_sku[b.sku].append(b)
        out = {}
        for sku, group in by_sku.items():
            stats, parked = await self._store.inventory.batch_counts(sku)
            for b in group:
                out[b.batch_id] = (sum(stats.get(f"{seq}:d", 0) for seq in b.seqs),
                                   sum(stats.get(f"{seq}:i", 0) for seq in b.seqs), b.seq in parked,
                                   sum(stats.get(f"{seq}:e", 0) for seq in b.seqs))
        return out

    async def summaries(self, batches: list[BatchRec]) -> list[BatchSummary]:
        """Each of *batches* with its counts (delivered, invalidated and expired read from its SKU)."""
        counts = await self.batch_counts(batches)
        return [BatchSummary(batch_id=b.batch_id, sku=b.sku, supplier=b.supplier, unit_cost=b.unit_cost,
                             status="parked" if counts[b.batch_id][2] and b.status != "voided" else b.status,
                             accepted=b.accepted, duplicate=b.duplicate, malformed=b.malformed, voided=b.voided,
                             delivered=counts[b.batch_id][0], invalidated=counts[b.batch_id][1],
                             created_at=ms_to_dt(b.created), expired=counts[b.batch_id][3]) for b in batches]

    async def sku_batches(self, sku: str) -> list[BatchSummary]:
        """A SKU's batches, oldest first, with their counts."""
        await self._catalog.get_sku(sku)
        batches = sorted((b for b in await self._store.inventory.batches() if b.sku == sku), key=lambda b: b.seq)
        return await self.summaries(batches)

    async def supplier_rating(self, supplier: str) -> float:
        counts = (await self.batch_counts(await self._store.inventory.supplier_batches(supplier))).values()
        return rating(sum(c[0] for c in counts), sum(c[1] for c in counts))

    async def void_batch(self, batch_id: str) -> int:
        """Withdraw a batch's unsold codes from sale; returns how many left the pool."""
        batch = await self.batch(batch_id)
        now, n = await self._store.inventory.void_batch(batch)
        if now or batch.status != "voided":
            batch.status, batch.voided = "voided", batch.voided + n
            await self._store.inventory.save_batch(batch)
        return n

    async def park_batch(self, batch: BatchRec, park: bool) -> None:
        """Take a batch's codes off sale but keep them (park), or put them back."""
        await self._store.inventory.park_batch(batch, park)

    async def requeue(self, sku: str, only: BatchRec | None = None) -> None:
        """Set the sale priority of the SKU's batches (or of the batch *only*, new or with
        a new sub-batch) from its sale order: oldest first (the seq), best-rated supplier
        first, then oldest, or first expiring first (codes without an expiry last, oldest
        first). A batch's sub-batches rank as the batch, but by their own expiry."""
        order = (await self._catalog.get_sku(sku)).sale_order
        if only is not None and order == "oldest_first" and not only.subs:
            return  # a new batch's priority is its seq already
        batches = [only] if only is not None else [b for b in await self._store.inventory.batches() if b.sku == sku]
        ratings: dict[str, float] = {}
        scores: list[tuple[int, int]] = []
        for b in batches:
            score = b.seq
            if order == "best_rated":
                if b.supplier not in ratings:
                    ratings[b.supplier] = await self.supplier_rating(b.supplier)
                score += (1000 - round(ratings[b.supplier] * 10)) << 32
            for seq, expires in [(b.seq, 0), *((s, e) for e, s in b.subs.items())]:
                scores.append((seq, (expires or _NO_EXPIRY + b.seq) if order == "first_expiring" else score))
        if scores:
            await self._store.inventory.set_priorities(sku, scores)
