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
from .models import Amount, BatchReport, Id, MalformedLine
from .records import BatchRec, check, new_id
from .store import Store
from .vault import Vault

__all__ = ["Inventory", "rating"]

_MALFORMED_SHOWN = 1000
_RATING_PRIOR = 10  # a new supplier starts as if it had delivered this many good codes


def rating(delivered: int, invalidated: int) -> float:
    """0-100: the share of a supplier's good codes, smoothed toward 100 while the sample is small."""
    return round(100 * (delivered - invalidated + _RATING_PRIOR) / (delivered + _RATING_PRIOR), 1)


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
        skipped. Sending the same *batch_id* again resumes it: nothing is added twice.
        """
        await self._catalog.get_sku(sku)
        s = await self._store.aftersales.supplier(supplier)
        if s is None:
            raise NotFoundError(f"unknown supplier {supplier}")
        if s.status == "blacklisted":
            raise SupplierBlacklistedError(f"supplier {supplier} is blacklisted: its codes are not taken")
        unit_cost = check(unit_cost, Amount, "unit_cost")
        batch_id = check(batch_id or "b" + new_id().lower(), Id, "batch_id")
        batch = await self._open_batch(batch_id, sku, supplier, unit_cost)

        vault = self._vault
        seen: set[bytes] = set()
        accepted = duplicate = malformed = 0
        bad: list[MalformedLine] = []
        chunk_no = 0
        # Two chunks in flight: the next one is read and fingerprinted while Redis
        # claims and stores the last one.
        inflight: list[asyncio.Future[tuple[int, int]]] = []
        try:
            async for chunk in imports.parse_codes(source, format=format, max_length=self._config.max_code_length,
                                                  chunk_lines=self._config.import_chunk):
                malformed += len(chunk.malformed)
                for line, reason in chunk.malformed[: max(0, _MALFORMED_SHOWN - len(bad))]:
                    bad.append(MalformedLine(line=line, reason=reason))
                fresh, fps, again = vault.fingerprint_chunk(chunk.codes, chunk.secrets, seen)
                duplicate += again
                if len(inflight) == 2:
                    stored, taken = await inflight.pop(0)
                    accepted, duplicate = accepted + stored, duplicate + taken
                inflight.append(asyncio.ensure_future(self._store_chunk(batch, chunk_no, fresh, fps)))
                chunk_no += 1
            for done in inflight:
                stored, taken = await done
                accepted, duplicate = accepted + stored, duplicate + taken
        finally:
            for left in inflight:
                left.cancel()
        batch.status, batch.accepted, batch.duplicate, batch.malformed = "imported", accepted, duplicate, malformed
        await self._store.inventory.save_batch(batch)
        return BatchReport(batch_id=batch_id, sku=sku, supplier=supplier, accepted=accepted, duplicate=duplicate,
                           malformed=malformed, malformed_lines=bad, malformed_truncated=malformed > len(bad))

    async def _store_chunk(self, batch: BatchRec, chunk_no: int, secrets_: list[bytes],
                           fps: list[bytes]) -> tuple[int, int]:
        """Claim the fingerprints of one chunk, encrypt the codes this batch owns, push them:
        (codes stored, duplicates of earlier batches)."""
        owned = await self._store.inventory.claim_fingerprints(batch.seq, fps)
        digest = hashlib.sha256(b"".join(fp for fp, ok in zip(fps, owned) if ok)).digest()
        ciphertexts = self._vault.encrypt_many([s for s, ok in zip(secrets_, owned) if ok], batch.sku.encode())
        await self._store.inventory.push_chunk(batch, chunk_no, digest, ciphertexts)
        return len(ciphertexts), len(fps) - len(ciphertexts)

    async def _open_batch(self, batch_id: str, sku: str, supplier: str, unit_cost: int) -> BatchRec:
        fresh = BatchRec(batch_id=batch_id, sku=sku, supplier=supplier, unit_cost=unit_cost,
                         seq=await self._store.inventory.next_batch_seq(), created=time.time_ns() // 1_000_000)
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
