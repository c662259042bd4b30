"""Stock in Redis: batches, their pools (one LIST per batch on the SKU's shard), the
fingerprints that dedupe every code ever imported, and the fingerprint key."""

from __future__ import annotations

import asyncio
import math
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

    async def _sku_script(self, name: str, shards: Sequence[str], *args: Any) -> list[Any]:
        """Script *name* with *args* on each of *shards* (a SKU's buckets), in one round:
        the replies, in order. The SKU's stock level is told what changed in its buckets."""
        return await self._sku_calls(name, shards, [args])

    async def _sku_calls(self, name: str, shards: Sequence[str], arg_lists: Sequence[Sequence[Any]]) -> list[Any]:
        """Script *name* with each of *arg_lists* on each of *shards*, in one round: the
        replies, shard by shard. The SKU's stock level is told what changed in its buckets."""
        calls = []
        for shard in shards:
            k = keys.SkuKeys(shard)
            calls += [(k.all, [k.pool_prefix, *args], ()) for args in arg_lists]
        replies = await self._db.run_many(name, calls)
        await self._db.tell_levels(shards)
        return replies

    @staticmethod
    def _batch_shards(batch: BatchRec) -> list[str]:
        """The buckets a batch's codes were spread over."""
        return [keys.bucket_shard(batch.sku, b) for b in range(batch.buckets)]

    def route(self, sku: str, buckets: int) -> str:
        """Where a new batch of *sku* spread over *buckets* puts its codes (BatchRec.route):
        an equal share on every master that holds some of the buckets, as the cluster's
        slots are served now, and on each master an equal share to each of its buckets;
        "" (the buckets in turn) where that is the same. A purchase takes from a bucket on
        its buyer's master, and buyers' accounts fall on the masters evenly: an equal
        share per bucket would leave a master with fewer buckets dry first."""
        on: dict[str, list[int]] = {}
        for b in range(buckets):
            on.setdefault(self._db.node_of(keys.sku_tag(keys.bucket_shard(sku, b))), []).append(b)
        counts = [len(held) for held in on.values()]
        if len(set(counts)) <= 1:
            return ""
        turns = math.lcm(*counts)
        if turns > keys.MAX_BUCKETS:  # a longer route than the buckets are worth: near enough
            turns = max(counts)
        return ",".join(str(held[t % len(held)]) for t in range(turns) for held in on.values())

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
        "seq:e" expired), and the seqs of its parked batches, over its buckets."""
        counts: dict[str, int] = {}
        parked: set[int] = set()
        for shard in await self._db.catalog.shards(sku):
            c, p = await self.shard_batch_counts(shard)
            for f, n in c.items():
                counts[f] = counts.get(f, 0) + n
            parked |= p
        return counts, parked

    async def shard_batch_counts(self, shard: str) -> tuple[dict[str, int], set[int]]:
        """:meth:`batch_counts` in one shard of a SKU (its own, or a bucket's shard id)."""
        k = keys.SkuKeys(shard)
        with translated():
            stats = await self._db.client.hgetall(k.batch_stats)
            parked = await self._db.client.smembers(k.parked)
        return {f.decode(): int(v) for f, v in stats.items() if f != keys.PIN_FIELD}, {int(p) for p in parked}

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
        batch is voided.

        A batch spread over buckets puts every one of them a share of each chunk's codes
        (code i goes to the bucket at i mod its length in its route), each part once
        (under the chunk's number in that bucket); a sub-batch's pool and its expiry are in
        each bucket that has a share."""
        shards = self._batch_shards(batch)
        route = [int(b) for b in batch.route.split(",")] if batch.route else list(range(len(shards)))
        calls, told = [], []
        for seq, chunk, digest, codes, expires in chunks:
            parts: list[list[bytes]] = [[] for _ in shards]
            if len(shards) == 1:
                parts[0] = codes
            else:
                for at, b in enumerate(route):
                    parts[b] += codes[at::len(route)]
            for b, shard in enumerate(shards):
                part = parts[b]
                if part or b == 0:
                    k = keys.SkuKeys(shard)
                    calls.append((k.all, [k.pool_prefix, seq, chunk, digest, expires], (part,)))
                    told.append((chunk, shard))
        replies = await self._db.run_many("import_push", calls)
        await self._db.tell_levels(shard for _, shard in told)
        for (chunk, _), reply in zip(told, replies):
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
        await self._sku_script("sku_requeue", await self._db.catalog.shards(sku), len(scores), *flat)

    async def void_batch(self, batch: BatchRec) -> tuple[bool, int]:
        """Withdraw the batch's unsold codes, from each of its pools (its own and its
        sub-batches') in every bucket it was spread over: (voided now, not before; codes
        withdrawn)."""
        replies = await self._sku_calls("batch_void", self._batch_shards(batch), [[seq] for seq in batch.seqs])
        return any(r[0] == b"ok" for r in replies), sum(int(r[1]) for r in replies)

    async def park_batch(self, batch: BatchRec, park: bool) -> None:
        """Take the batch's codes off sale but keep them (park), or put them back (unpark):
        each of its pools, in every bucket it was spread over."""
        action = "park" if park else "unpark"
        await self._sku_calls("batch_park", self._batch_shards(batch), [[seq, action] for seq in batch.seqs])

    async def retire_expired(self, skus: Sequence[str], window_s: float, alert_codes: int) -> int:
        """Retire the batches of *skus* past their sell-by and count the codes reaching it
        within *window_s*, in every bucket of each (sku_expire): how many SKUs had batches
        retired. A SKU's own shard tells stock.expiring once the codes of all its buckets
        reach *alert_codes*, so its buckets go first (one pipelined write each way)."""
        window_ms = int(window_s * 1000)
        spread = await self._db.catalog.shards_of(skus)
        buckets = [shard for shards in spread for shard in shards[1:]]
        retired: set[str] = set()
        others: dict[str, int] = {}
        if buckets:
            calls = [(k.all, [k.pool_prefix, window_ms, 0, 0], ()) for k in map(keys.SkuKeys, buckets)]
            changed = []
            for shard, (now, n) in zip(buckets, await self._db.run_many("sku_expire", calls)):
                sku = shard.partition(keys.BUCKET)[0]
                others[sku] = others.get(sku, 0) + int(n)
                if int(now):
                    retired.add(sku)
                    changed.append(shard)
            await self._db.tell_levels(changed)  # before the SKUs' own shards set their levels
        calls = [(k.all, [k.pool_prefix, window_ms, alert_codes, others.get(sku, 0)], ())
                 for sku, k in zip(skus, map(keys.SkuKeys, skus))]
        for sku, (now, _) in zip(skus, await self._db.run_many("sku_expire", calls) if calls else ()):
            if int(now):
                retired.add(sku)
        return len(retired)

    # ---- what audit() reads ------------------------------------------------------------
    async def retired(self, sku: str) -> set[int]:
        """The seqs of the batches retired past their sell-by in one shard of a SKU (*sku*:
        its own, or a bucket's shard id)."""
        with translated():
            return {int(s) for s in await self._db.client.smembers(keys.SkuKeys(sku).expired)}

    async def pools(self, sku: str) -> dict[int, list[bytes]]:
        """Every batch pool that holds codes in one shard of a SKU (*sku*: its own, or a
        bucket's shard id): seq -> its codes."""
        k = keys.SkuKeys(sku)
        c = self._db.client
        with translated():
            names = [n async for n in self._db.scan(k.pool_prefix + "*", near=k.meta)]
            return {int(n.decode().rsplit(":", 1)[1]): await c.lrange(n, 0, -1) for n in names}

    async def deliveries(self, sku: str) -> dict[str, tuple[dict[str, Any], list[bytes] | None]]:
        """Every delivery record in one shard of a SKU: order id -> (record, codes; None where the
        SKU keeps none: a delivered order's codes are kept by its account)."""
        k = keys.SkuKeys(sku)
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                p.hgetall(k.dlv)
                p.hgetall(k.dlv_codes)
                recs, codes = await p.execute()
        recs.pop(keys.PIN_FIELD, None)
        return {oid.decode(): (msgpack_decode(raw), split_codes(codes[oid]) if oid in codes else None)
                for oid, raw in recs.items()}
