"""Stock in Redis: batches, their pools (one LIST per batch on the SKU's shard), the
fingerprints that dedupe every code ever imported, and the fingerprint key."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from msgspec.msgpack import decode as msgpack_decode

from .._core import group_claims
from ..records import BatchRec, decode_batch, encode
from . import keys
from .replies import refusal, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["InventoryStore", "split_codes"]

_CLAIM_LANES = 8  # connections an import's claims are spread over (see claim_fingerprints)


def split_codes(blob: bytes) -> list[bytes]:
    """The codes of a delivery record (see pack_codes in lua/_sku.lua)."""
    out, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 2], "big")
        out.append(blob[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


class InventoryStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    async def _sku_script(self, name: str, sku: str, *args: Any) -> Any:
        k = keys.SkuKeys(sku)
        return await self._db.run(name, k.all, [k.pool_prefix, *args])

    # ---- batches -------------------------------------------------------------------
    async def next_batch_seq(self) -> int:
        with translated():
            return int(await self._db.client.hincrby(keys.SEQ, "batch", 1))

    async def create_batch(self, batch: BatchRec) -> bool:
        """Record a new batch (and index it by seq and by supplier); False if its id exists."""
        c = self._db.client
        with translated():
            if not await c.hsetnx(keys.BATCHES, batch.batch_id, encode(batch)):
                return False
            await c.hset(keys.BATCH_SEQ, str(batch.seq), batch.batch_id)
            await c.sadd(keys.SupplierKeys(batch.supplier).batches, batch.batch_id)
        return True

    async def add_sub_batch(self, batch: BatchRec, expires: int) -> int:
        """A new seq for the codes of *batch* that expire at *expires* (ms), recorded
        (in the batch, and seq -> batch id) before any code goes to its pool."""
        seq = await self.next_batch_seq()
        batch.subs[expires] = seq
        with translated():
            await self._db.client.hset(keys.BATCH_SEQ, str(seq), batch.batch_id)
        await self.save_batch(batch)
        return seq

    async def save_batch(self, batch: BatchRec) -> None:
        with translated():
            await self._db.client.hset(keys.BATCHES, batch.batch_id, encode(batch))

    async def batch(self, batch_id: str) -> BatchRec | None:
        with translated():
            raw = await self._db.client.hget(keys.BATCHES, batch_id)
        return None if raw is None else decode_batch(raw)

    async def batch_id_of(self, seq: int) -> str | None:
        with translated():
            raw = await self._db.client.hget(keys.BATCH_SEQ, str(seq))
        return None if raw is None else raw.decode()

    async def batches(self) -> list[BatchRec]:
        """Every batch of every SKU."""
        with translated():
            raw = await self._db.client.hgetall(keys.BATCHES)
        return [decode_batch(r) for r in raw.values()]

    async def supplier_batches(self, supplier: str) -> list[BatchRec]:
        c = self._db.client
        with translated():
            ids = sorted(m.decode() for m in await c.smembers(keys.SupplierKeys(supplier).batches))
            raws = await c.hmget(keys.BATCHES, ids) if ids else []
        return [decode_batch(r) for r in raws if r is not None]

    async def batch_counts(self, sku: str) -> tuple[dict[str, int], set[int]]:
        """Per-batch counters of a SKU ("seq:d" codes delivered, "seq:i" invalidated,
        "seq:e" expired), and the seqs of its parked batches."""
        k = keys.SkuKeys(sku)
        with translated():
            stats = await self._db.client.hgetall(k.batch_stats)
            parked = await self._db.client.smembers(k.parked)
        return {f.decode(): int(v) for f, v in stats.items()}, {int(p) for p in parked}

    # ---- imports ---------------------------------------------------------------------
    async def claim_fingerprints(self, seq: int, fps: bytes) -> tuple[bytearray, dict[int, int]]:
        """Claim packed 16-byte fingerprints (all distinct) for batch *seq*: a flag per
        fingerprint, 1 where the code is this batch's (claimed now, or by this batch
        before), 0 where an earlier batch has it; and for each of those, its index in
        *fps* -> the seq of the batch that has it.

        One fp_claim call per {f:XX} shard. Redis reads at most 16 KB of a connection per
        event-loop turn and, with appendfsync always, fsyncs after every turn that wrote,
        so the calls are spread over _CLAIM_LANES connections: each turn then reads (and
        one fsync covers) that many times more claims.
        """
        groups = group_claims(fps)
        calls = [([keys.fingerprint_shard(shard)], [seq, entries], ()) for shard, entries, _ in groups]
        lanes = [calls[k::_CLAIM_LANES] for k in range(_CLAIM_LANES)]
        answers = await asyncio.gather(*(self._db.run_many("fp_claim", lane) for lane in lanes if lane))
        owned = bytearray(b"\x01") * (len(fps) // 16)
        others: dict[int, int] = {}
        mine = str(seq).encode()
        for k, replies in enumerate(answers):
            for (_, _, positions), reply in zip(groups[k::_CLAIM_LANES], replies):
                if reply:
                    where = memoryview(positions).cast("I")
                    for j in range(0, len(reply), 2):
                        if reply[j + 1] != mine:
                            at = where[reply[j] - 1]
                            owned[at] = 0
                            others[at] = int(reply[j + 1])
        return owned, others

    async def push_chunks(self, batch: BatchRec,
                          chunks: Sequence[tuple[int, int, bytes, list[bytes], int]]) -> None:
        """Put chunks ``(seq, chunk number, digest, codes, expiry ms or 0)`` on sale in
        the batch's pools, in order and once each (a chunk sent again with the same
        digest adds nothing), in one pipelined write. ConflictError if one differs or the
        batch is voided."""
        k = keys.SkuKeys(batch.sku)
        replies = await self._db.run_many(
            "import_push", [(k.all, [k.pool_prefix, seq, chunk, digest, expires], (codes,))
                            for seq, chunk, digest, codes, expires in chunks])
        for (_, chunk, _, _, _), reply in zip(chunks, replies):
            if reply[0] not in (b"ok", b"again"):
                raise refusal("import_push", reply[0], sku=batch.sku, batch=batch.batch_id, chunk=chunk)

    async def fingerprint_key(self, wrapped_candidate: bytes) -> bytes:
        """The deployment's wrapped fingerprint key, set to the candidate if there is none yet."""
        with translated():
            await self._db.client.set(keys.FPKEY, wrapped_candidate, nx=True)
            return await self._db.client.get(keys.FPKEY)

    async def wrapped_fingerprint_key(self) -> bytes | None:
        with translated():
            return await self._db.client.get(keys.FPKEY)

    async def swap_fingerprint_key(self, expected: bytes, replacement: bytes) -> bool:
        """Replace the wrapped key if it is still *expected*."""
        return bool(await self._db.run("fpkey_swap", [keys.FPKEY], [expected, replacement]))

    # ---- sale order, void, park -----------------------------------------------------
    async def set_priorities(self, sku: str, scores: Sequence[tuple[int, int]]) -> None:
        """Set the sale priority of batches (seq, score) of a SKU: lowest sold first."""
        flat = [x for pair in scores for x in pair]
        await self._sku_script("sku_requeue", sku, len(scores), *flat)

    async def void_batch(self, batch: BatchRec) -> tuple[bool, int]:
        """Withdraw the batch's unsold codes, from each of its pools: (voided now, not
        before; codes withdrawn)."""
        now, n = False, 0
        for seq in batch.seqs:
            reply = await self._sku_script("batch_void", batch.sku, seq)
            now, n = now or reply[0] == b"ok", n + int(reply[1])
        return now, n

    async def park_batch(self, batch: BatchRec, park: bool) -> None:
        """Take the batch's codes off sale but keep them (park), or put them back (unpark)."""
        for seq in batch.seqs:
            await self._sku_script("batch_park", batch.sku, seq, "park" if park else "unpark")

    async def retire_expired(self, skus: Sequence[str], window_s: float, alert_codes: int) -> int:
        """Retire the batches of *skus* past their sell-by and count the codes reaching it
        within *window_s* (sku_expire: a stock.expiring event at *alert_codes*), in one
        pipelined write: how many SKUs had batches retired."""
        calls = []
        for sku in skus:
            k = keys.SkuKeys(sku)
            calls.append((k.all, [k.pool_prefix, int(window_s * 1000), alert_codes], ()))
        return sum(int(r[0]) for r in await self._db.run_many("sku_expire", calls)) if calls else 0

    # ---- what audit() reads ------------------------------------------------------------
    async def retired(self, sku: str) -> set[int]:
        """The seqs of the SKU's batches retired past their sell-by."""
        with translated():
            return {int(s) for s in await self._db.client.smembers(keys.SkuKeys(sku).expired)}

    async def pools(self, sku: str) -> dict[int, list[bytes]]:
        """Every batch pool of a SKU that holds codes: seq -> its codes."""
        k = keys.SkuKeys(sku)
        c = self._db.client
        with translated():
            names = [n async for n in self._db.scan(k.pool_prefix + "*", near=k.meta)]
            return {int(n.decode().rsplit(":", 1)[1]): await c.lrange(n, 0, -1) for n in names}

    async def deliveries(self, sku: str) -> dict[str, tuple[dict[str, Any], list[bytes] | None]]:
        """Every delivery record of a SKU: order id -> (record, codes; None where the
        SKU keeps none: a delivered order's codes are kept by its account)."""
        k = keys.SkuKeys(sku)
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                p.hgetall(k.dlv)
                p.hgetall(k.dlv_codes)
                recs, codes = await p.execute()
        return {oid.decode(): (msgpack_decode(raw), split_codes(codes[oid]) if oid in codes else None)
                for oid, raw in recs.items()}
