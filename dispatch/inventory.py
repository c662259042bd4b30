"""Stock: batches of codes imported into a SKU's pools, deduplicated across every batch
ever imported; their sale order; voiding and parking them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from . import imports
from .catalog import Catalog
from .config import Config
from .errors import ConflictError, NotFoundError, SupplierBlacklistedError
from .models import Amount, BatchReport, BatchSummary, Id, MalformedLine
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


def rating(delivered: int, invalidated: int) -> float:
    """0-100: the share of a supplier's good codes, smoothed toward 100 while the sample is small."""
    return round(100 * (delivered - invalidated + _RATING_PRIOR) / (delivered + _RATING_PRIOR), 1)


class _Window:
    """Consecutive chunks of an import waiting for their claims: per chunk, its number
    and its fresh codes as Fingerprints.fresh packs them (secrets, ends, fingerprints)."""

    __slots__ = ("chunks", "codes")

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes, bytes, bytes]] = []
        self.codes = 0

    def add(self, chunk_no: int, secrets_: bytes, ends: bytes, fps: bytes) -> None:
        self.chunks.append((chunk_no, secrets_, ends, fps))
        self.codes += len(fps) // 16


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
        skipped. Sending the same *batch_id* again resumes it: nothing is added twice,
        and a batch sent again whole once imported answers its report with ``replayed``.
        """
        buckets = (await self._catalog.get_sku(sku)).buckets
        s = await self._store.aftersales.supplier(supplier)
        if s is None:
            raise NotFoundError(f"unknown supplier {supplier}")
        if s.status == "blacklisted":
            raise SupplierBlacklistedError(f"supplier {supplier} is blacklisted: its codes are not taken")
        unit_cost = check(unit_cost, Amount, "unit_cost")
        batch_id = check(batch_id or "b" + new_id().lower(), Id, "batch_id")
        batch = await self._open_batch(batch_id, sku, supplier, unit_cost, buckets)
        before = (batch.status, batch.accepted, batch.duplicate, batch.malformed)

        fingerprints = self._vault.fingerprints()
        accepted = duplicate = malformed = 0
        bad: list[MalformedLine] = []
        window, chunk_no = _Window(), 0
        # One window in flight (claimed, then encrypted and pushed) while the next is read.
        storing: asyncio.Future[tuple[int, int]] | None = None
        try:
            async for chunk in imports.parse_codes(source, format=format, max_length=self._config.max_code_length,
                                                  chunk_lines=self._config.import_chunk):
                malformed += len(chunk.malformed)
                for line, reason in chunk.malformed[: max(0, _MALFORMED_SHOWN - len(bad))]:
                    bad.append(MalformedLine(line=line, reason=reason))
                # Off the event loop (the core lets go of the GIL): the window in flight
                # keeps sending and reading meanwhile.
                secrets_, ends, fps, again = await asyncio.to_thread(fingerprints.fresh, chunk.codes, chunk.secrets)
                duplicate += again
                window.add(chunk_no, secrets_, ends, fps)
                chunk_no += 1
                if window.codes >= _CLAIM_WINDOW:
                    if storing is not None:
                        stored, taken = await storing
                        accepted, duplicate = accepted + stored, duplicate + taken
                    storing, window = asyncio.ensure_future(self._store_window(batch, window)), _Window()
            if storing is not None:
                stored, taken = await storing
                accepted, duplicate = accepted + stored, duplicate + taken
            stored, taken = await self._store_window(batch, window)
            accepted, duplicate = accepted + stored, duplicate + taken
        finally:
            if storing is not None:
                storing.cancel()
        replayed = before == ("imported", accepted, duplicate, malformed)
        if not replayed:
            batch.status, batch.accepted, batch.duplicate, batch.malformed = "imported", accepted, duplicate, malformed
            await self._store.inventory.save_batch(batch)
        return BatchReport(batch_id=batch_id, sku=sku, supplier=supplier, accepted=accepted, duplicate=duplicate,
                           malformed=malformed, malformed_lines=bad, malformed_truncated=malformed > len(bad),
                           replayed=replayed)

    async def _store_window(self, batch: BatchRec, window: _Window) -> tuple[int, int]:
        """Claim the fingerprints of a window, then encrypt the codes this batch owns and
        push them chunk by chunk: (codes stored, duplicates of earlier batches)."""
        if not window.chunks:
            return 0, 0
        owned = await self._store.inventory.claim_fingerprints(batch.seq, b"".join(c[3] for c in window.chunks))
        aad = batch.sku.encode()
        stored = at = 0
        group: list[tuple[int, bytes, list[bytes]]] = []
        pushing: asyncio.Future[None] | None = None
        try:
            for chunk_no, secrets_, ends, fps in window.chunks:
                n = len(fps) // 16
                keep = bytes(owned[at:at + n])
                at += n
                if keep.count(0):
                    fps = b"".join(fps[16 * i:16 * i + 16] for i in range(n) if keep[i])
                # off the event loop too, which meanwhile writes the group in flight
                ciphertexts = await asyncio.to_thread(self._vault.encrypt_chunk, secrets_, ends, keep, aad)
                stored += len(ciphertexts)
                group.append((chunk_no, hashlib.sha256(fps).digest(), ciphertexts))
                if len(group) == _PUSH_GROUP:
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
        return stored, window.codes - stored

    async def _open_batch(self, batch_id: str, sku: str, supplier: str, unit_cost: int, buckets: int) -> BatchRec:
        # a batch keeps the buckets it was opened with: a resumed import puts each part where it went first
        fresh = BatchRec(batch_id=batch_id, sku=sku, supplier=supplier, unit_cost=unit_cost,
                         seq=await self._store.inventory.next_batch_seq(), created=time.time_ns() // 1_000_000,
                         buckets=buckets)
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

    async def batch_counts(self, batches: Iterable[BatchRec]) -> dict[str, tuple[int, int, bool]]:
        """batch id -> (codes delivered, codes invalidated, parked) from the SKU shards."""
        by_sku: dict[str, list[BatchRec]] = defaultdict(list)
        for b in batches:
            by_sku[b.sku].append(b)
        out = {}
        for sku, group in by_sku.items():
            stats, parked = await self._store.inventory.batch_counts(sku)
            for b in group:
                out[b.batch_id] = (stats.get(f"{b.seq}:d", 0), stats.get(f"{b.seq}:i", 0), b.seq in parked)
        return out

    async def summaries(self, batches: list[BatchRec]) -> list[BatchSummary]:
        """Each of *batches* with its counts (delivered and invalidated read from its SKU)."""
        counts = await self.batch_counts(batches)
        return [BatchSummary(batch_id=b.batch_id, sku=b.sku, supplier=b.supplier, unit_cost=b.unit_cost,
                             status="parked" if counts[b.batch_id][2] and b.status != "voided" else b.status,
                             accepted=b.accepted, duplicate=b.duplicate, malformed=b.malformed, voided=b.voided,
                             delivered=counts[b.batch_id][0], invalidated=counts[b.batch_id][1],
                             created_at=ms_to_dt(b.created)) for b in batches]

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
        """Set the sale priority of the SKU's batches (or of the new batch *only*) from its
        sale order: oldest first (the seq), or best-rated supplier first, then oldest."""
        best_rated = (await self._catalog.get_sku(sku)).sale_order == "best_rated"
        if only is not None and not best_rated:
            return  # a new batch's priority is its seq already
        batches = [only] if only is not None else [b for b in await self._store.inventory.batches() if b.sku == sku]
        ratings: dict[str, float] = {}
        scores: list[tuple[int, int]] = []
        for b in batches:
            score = b.seq
            if best_rated:
                if b.supplier not in ratings:
                    ratings[b.supplier] = await self.supplier_rating(b.supplier)
                score += (1000 - round(ratings[b.supplier] * 10)) << 32
            scores.append((b.seq, score))
        if scores:
            await self._store.inventory.set_priorities(sku, scores)
