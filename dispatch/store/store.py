"""The only module that talks to Redis: script calls, reads, and error translation.

Methods speak the engine's language (a distributor, a SKU, a list of order items)
and build keys and arguments here; every rule that must be atomic is a Lua script.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from msgspec.msgpack import decode as msgpack_decode
from redis import exceptions as rex

from .._core import pack_calls
from ..config import Config
from ..errors import ConfigError, StoreUnavailableError
from . import keys, scripts
from .embedded import EmbeddedRedis

__all__ = ["Store"]

MIN_VERSION = (6, 2)
#: One script call: its keys, its arguments, then items whose fields follow the arguments.
_Call = tuple[list[str], list[Any], Sequence[Sequence[Any]]]
_ACCOUNT_STEPS = frozenset({"begin", "buy", "fence", "commit", "settle", "ticket_open", "ticket_decide", "ticket_finish"})
_SUPPLIER_STEPS = frozenset({"supplier_money", "supplier_status"})


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis failures become StoreUnavailableError (retryable); nothing else leaks out."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError) as e:
        raise StoreUnavailableError(f"redis is unavailable: {type(e).__name__}: {e}") from None
    except rex.RedisError as e:
        raise StoreUnavailableError(f"redis refused a command: {e}") from None


class Store:
    """A connection to the Redis that holds everything (embedded or external)."""

    def __init__(self, client: aioredis.Redis, embedded: EmbeddedRedis | None = None) -> None:
        self.client = client
        self.embedded = embedded
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(client.connection_pool.max_connections)

    @classmethod
    async def connect(cls, config: Config) -> Store:
        """Connect to ``config.redis_url``, or start the embedded redis-server when it is unset."""
        embedded = None
        url = config.redis_url
        if url is None:
            embedded = EmbeddedRedis(config.data_dir, binary=config.redis_server,
                                     appendfsync=config.appendfsync)
            await asyncio.to_thread(embedded.start)
            url = embedded.url
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=config.redis_pool_size, timeout=config.redis_timeout_s,
                socket_timeout=config.redis_timeout_s, socket_connect_timeout=config.redis_timeout_s)
        except ValueError as e:
            if embedded:
                embedded.stop()
            raise ConfigError(f"redis_url is not a valid Redis URL: {e}") from None
        store = cls(aioredis.Redis(connection_pool=pool), embedded)
        try:
            await store._check_server()
        except BaseException:
            await store.close()
            raise
        return store

    async def _check_server(self) -> None:
        with translated():
            info = await self.client.info("server")
        version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
        if version < MIN_VERSION:
            raise ConfigError(f"Redis {info['redis_version']} is too old: card-dispatch needs >= 6.2")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            for conn in self._idle:
                await conn.disconnect()
            await self.client.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def ping(self) -> bool:
        with translated():
            return bool(await self.client.ping())

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A connection of the script path's own small pool: a coalesced call needs one
        for a whole batch, so the generic pool's waiting and timeouts are not worth
        their cost here. A connection that saw an error is dropped, never reused
        (a reply may still be on its way)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else self.client.connection_pool.make_connection()
            try:
                yield conn
            except BaseException:
                await conn.disconnect()
                raise
            self._idle.append(conn)

    async def _run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return (await self._run_many(name, [(keys_, args, ())]))[0]

    async def _run_many(self, name: str, calls: Sequence[_Call]) -> list[Any]:
        """EVALSHA of script *name* for every (keys, args, items) call, packed by the
        compiled core (each item's fields follow the args) and sent as one pipelined
        write; the replies, in order.

        On NOSCRIPT (Redis restarted, SCRIPT FLUSH) the script is loaded and every call
        sent again: each is safe to run twice. A round whose replies are lost is not
        re-sent here; the saga's recovery sweep finishes its orders.
        """
        script = self._scripts[name]
        sha = script.sha.encode()
        packed = pack_calls(sha, list(calls))
        with translated():
            for attempt in (1, 2):
                try:
                    async with self._connection() as conn:
                        await conn.send_packed_command(packed)
                        return [await conn.read_response() for _ in calls]
                except rex.NoScriptError:
                    if attempt == 2:
                        raise
                    await self.client.script_load(script.script)
        raise AssertionError("unreachable")

    # ---- saga steps: batches of order items, one script call per shard ----------
    def _step_call(self, name: str, shard: str, items: Sequence[Sequence[Any]]) -> _Call:
        if name in _ACCOUNT_STEPS:
            return keys.AcctKeys(shard).all, [len(items)], items
        k = keys.SkuKeys(shard)
        return k.all, [k.pool_prefix, len(items)], items

    async def account_script(self, name: str, dist: str, *args: Any) -> Any:
        """One call of an account script that takes a single item (tickets)."""
        return await self._run(name, keys.AcctKeys(dist).all, list(args))

    async def sku_script(self, name: str, sku: str, *args: Any) -> Any:
        """One call of a SKU script (its first argument, the pool prefix, is added here)."""
        k = keys.SkuKeys(sku)
        return await self._run(name, k.all, [k.pool_prefix, *args])

    async def supplier_script(self, name: str, supplier: str, *args: Any) -> Any:
        return await self._run(name, keys.SupplierKeys(supplier).all, list(args))

    async def step(self, name: str, shard: str, items: Sequence[Sequence[Any]]) -> list[Any]:
        """Run saga step *name* (begin, commit, settle on an account; take, sku_settle on
        a SKU) for *items* of one shard; one reply per item."""
        return (await self._run_many(name, [self._step_call(name, shard, items)]))[0]

    async def steps(self, name: str, batches: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """:meth:`step` for several shards in one pipelined round: {shard: replies}."""
        replies = await self._run_many(name, [self._step_call(name, s, items) for s, items in batches.items()])
        return dict(zip(batches, replies))

    # ---- account shard ---------------------------------------------------------
    async def topup(self, dist: str, reference: str, amount: int) -> list[Any]:
        return await self._run("topup", keys.AcctKeys(dist).all, [reference, amount])

    async def put_account(self, dist: str, mode: str, fields: dict[str, Any]) -> str:
        return await self._put(keys.AcctKeys(dist).acct, mode, fields)

    async def account(self, dist: str) -> dict[str, str]:
        with translated():
            raw = await self.client.hgetall(keys.AcctKeys(dist).acct)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def order(self, dist: str, order_id: str) -> tuple[bytes | None, bytes | None]:
        """(order record, codes blob) of one order; Nones when unknown."""
        k = keys.AcctKeys(dist)
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                p.hget(k.orders, order_id)
                p.hget(k.codes, order_id)
                rec, codes = await p.execute()
        return rec, codes

    async def order_id_by_ref(self, dist: str, ref: str) -> str | None:
        with translated():
            oid = await self.client.hget(keys.AcctKeys(dist).refs, ref)
        return oid.decode() if oid else None

    async def due(self, dists: Sequence[str], now_ms: int, pending_before_ms: int) -> list[tuple[list[bytes], list[bytes]]]:
        """Per distributor: (leases due by now_ms, orders pending since before pending_before_ms)."""
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                for d in dists:
                    k = keys.AcctKeys(d)
                    p.zrangebyscore(k.leases, "-inf", now_ms, 0, 1000)
                    p.zrangebyscore(k.pending, "-inf", pending_before_ms, 0, 1000)
                flat = await p.execute()
        return list(zip(flat[0::2], flat[1::2]))

    async def provisional(self, skus: Sequence[str], before_ms: int) -> dict[str, list[tuple[str, str]]]:
        """Per SKU: (order id, distributor) of purchases taken before *before_ms* and not
        yet confirmed bought (at most 1000 a SKU)."""
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                for sku in skus:
                    p.zrangebyscore(keys.SkuKeys(sku).prov, "-inf", before_ms, 0, 1000)
                ids = await p.execute()
            out = {}
            for sku, found in zip(skus, ids):
                if found:
                    recs = await self.client.hmget(keys.SkuKeys(sku).dlv, found)
                    out[sku] = [(i.decode(), msgpack_decode(r)["a"]) for i, r in zip(found, recs) if r is not None]
        return out

    async def clear_pending(self, dist: str, order_ids: Sequence[str]) -> None:
        with translated():
            await self.client.zrem(keys.AcctKeys(dist).pending, *order_ids)

    async def ledger(self, key: str, start: int = 0, stop: int = -1) -> list[list[str]]:
        """Entries *start*..*stop* (list indexes) of a ledger (an account's or a supplier's),
        each as its seven fields (see _account.lua)."""
        with translated():
            raw = await self.client.lrange(key, start, stop)
        return [e.decode().split("\x1f") for e in raw]

    # ---- SKU shard -----------------------------------------------------------------
    async def import_push(self, sku: str, seq: int, chunk: int, digest: bytes, codes: list[bytes]) -> list[Any]:
        k = keys.SkuKeys(sku)
        return await self._run("import_push", k.all, [k.pool_prefix, seq, chunk, digest, *codes])


    async def put_supplier(self, supplier: str, mode: str, fields: dict[str, Any]) -> str:
        return await self._put(keys.SupplierKeys(supplier).acct, mode, fields)

    async def put_sku(self, sku: str, mode: str, fields: dict[str, Any]) -> str:
        if mode == "create":
            with translated():
                await self.client.sadd(keys.SKUS, sku)  # first: a listed id without meta is skipped
        return await self._put(keys.SkuKeys(sku).meta, mode, fields)

    async def sku(self, sku: str) -> tuple[dict[str, str], dict[str, int]]:
        """(metadata, counters) of one SKU; empty metadata when unknown."""
        k = keys.SkuKeys(sku)
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                p.hgetall(k.meta)
                p.hgetall(k.stats)
                meta, stats = await p.execute()
        return ({a.decode(): b.decode() for a, b in meta.items()},
                {a.decode(): int(b) for a, b in stats.items()})

    async def pool_lengths(self, sku: str) -> dict[int, int]:
        """Length of every batch pool that holds codes (for conservation checks)."""
        k = keys.SkuKeys(sku)
        with translated():
            names = [n async for n in self.client.scan_iter(match=k.pool_prefix + "*", count=1000)]
            lengths = [await self.client.llen(n) for n in names]
        return {int(n.decode().rsplit(":", 1)[1]): ln for n, ln in zip(names, lengths)}

    async def deliveries(self, sku: str) -> dict[str, tuple[dict[str, Any], list[bytes]]]:
        """Every delivery record of a SKU: order id -> (record, codes)."""
        k = keys.SkuKeys(sku)
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                p.hgetall(k.dlv)
                p.hgetall(k.dlv_codes)
                recs, codes = await p.execute()
        return {oid.decode(): (msgpack_decode(raw), split_codes(codes.get(oid, b""))) for oid, raw in recs.items()}

    # ---- fingerprints ----------------------------------------------------------------
    async def fp_claim(self, seq: int, shards: list[tuple[list[str], list[bytes]]]) -> list[list[int]]:
        """Claim fingerprints, one (bucket keys, fields) per {f:XX} shard, in one pipelined
        round: the statuses of each shard's fields (see lua/fp_claim.lua)."""
        return await self._run_many("fp_claim", [(b, [seq], (f,)) for b, f in shards])

    async def fingerprint_key(self, wrapped_candidate: bytes) -> bytes:
        """The deployment's wrapped fingerprint key, set to the candidate if there is none yet."""
        with translated():
            await self.client.set(keys.FPKEY, wrapped_candidate, nx=True)
            return await self.client.get(keys.FPKEY)

    # ---- global catalog ----------------------------------------------------------------
    async def _put(self, key: str, mode: str, fields: dict[str, Any]) -> str:
        args: list[Any] = [mode]
        for f, v in fields.items():
            args += [f, v]
        reply = await self._run("put", [key], args)
        return reply.decode()

    async def members(self, registry: str) -> list[str]:
        with translated():
            return sorted(m.decode() for m in await self.client.smembers(registry))

    async def add_member(self, registry: str, member: str) -> None:
        with translated():
            await self.client.sadd(registry, member)

    async def record(self, table: str, field: str) -> bytes | None:
        with translated():
            return await self.client.hget(table, field)

    async def records(self, table: str) -> dict[str, bytes]:
        with translated():
            return {k.decode(): v for k, v in (await self.client.hgetall(table)).items()}

    async def put_record(self, table: str, field: str, value: bytes, *, create: bool) -> bool:
        """Write one record of a global table; with *create*, only if absent (returns False then)."""
        with translated():
            if create:
                return bool(await self.client.hsetnx(table, field, value))
            await self.client.hset(table, field, value)
            return True

    async def next_seq(self, name: str) -> int:
        with translated():
            return int(await self.client.hincrby(keys.SEQ, name, 1))

    async def set_api_key(self, dist: str, key_hash: str) -> None:
        """Make *key_hash* the distributor's only valid key (the old one stops working)."""
        await self._run("rotate_key", [keys.APIKEYS, keys.KEYOF], [dist, key_hash])

    async def dist_by_key_hash(self, key_hash: str) -> str | None:
        with translated():
            d = await self.client.hget(keys.APIKEYS, key_hash)
        return d.decode() if d else None

    async def scan(self, match: str = "*") -> list[bytes]:
        with translated():
            return [k async for k in self.client.scan_iter(match=match, count=1000)]

    # ---- daemon support (issue 4) ------------------------------------------------------
    async def ready(self) -> None:
        """Redis answers and every script is in its script cache (loaded again if flushed)."""
        with translated():
            await self.client.ping()
            scripts_ = list(self._scripts.values())
            present = await self.client.script_exists(*(s.sha for s in scripts_))
            for script, ok in zip(scripts_, present):
                if not ok:
                    await self.client.script_load(script.script)

    async def account_field(self, dist: str, field: str) -> str | None:
        with translated():
            value = await self.client.hget(keys.AcctKeys(dist).acct, field)
        return value.decode() if value is not None else None

    async def skus(self, ids: Sequence[str]) -> list[tuple[dict[str, str], dict[str, int]]]:
        """(metadata, counters) of many SKUs in one pipelined round; see :meth:`sku`."""
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                for sku in ids:
                    k = keys.SkuKeys(sku)
                    p.hgetall(k.meta)
                    p.hgetall(k.stats)
                flat = await p.execute()
        return [({a.decode(): b.decode() for a, b in meta.items()}, {a.decode(): int(b) for a, b in stats.items()})
                for meta, stats in zip(flat[0::2], flat[1::2])]

    async def order_records(self, dist: str, after: str, before: str, count: int) -> list[tuple[bytes, bytes | None]]:
        """Order records (with codes) of *dist* with ids in (after, before), oldest first
        ("" and "~" are below and above every id)."""
        k = keys.AcctKeys(dist)
        with translated():
            ids = await self.client.zrangebylex(k.index, "(" + after, "(" + before, 0, count)
            if not ids:
                return []
            async with self.client.pipeline(transaction=False) as p:
                p.hmget(k.orders, ids)
                p.hmget(k.codes, ids)
                recs, codes = await p.execute()
        return [(r, c) for r, c in zip(recs, codes) if r is not None]

    async def throttle(self, dist: str, rate: int, burst: int) -> tuple[bool, int]:
        """Take one request from the account's token bucket: (allowed, ms to wait if not)."""
        ok, wait_ms = await self._run("rate_limit", [keys.rate_bucket(dist)], [rate, burst])
        return bool(ok), int(wait_ms)

    async def remember(self, key: str, ttl_s: int) -> bool:
        """SET key NX EX ttl_s: True when it was not there (first sighting)."""
        with translated():
            return bool(await self.client.set(key, b"1", nx=True, ex=ttl_s))

    async def wrapped_fingerprint_key(self) -> bytes | None:
        with translated():
            return await self.client.get(keys.FPKEY)

    async def swap_fingerprint_key(self, expected: bytes, replacement: bytes) -> bool:
        return bool(await self._run("fpkey_swap", [keys.FPKEY], [expected, replacement]))

    # ---- after-sales and suppliers (issue 6) -----------------------------------------
    async def hash(self, key: str) -> dict[str, bytes]:
        """HGETALL of any key of keys.py, fields decoded."""
        with translated():
            return {k.decode(): v for k, v in (await self.client.hgetall(key)).items()}

    async def hashes(self, names: Sequence[str]) -> list[dict[str, bytes]]:
        """:meth:`hash` of many keys in one pipelined round."""
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                for n in names:
                    p.hgetall(n)
                flat = await p.execute()
        return [{k.decode(): v for k, v in h.items()} for h in flat]

    async def hash_fields(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        with translated():
            return await self.client.hmget(key, list(fields)) if fields else []

    async def set_field(self, key: str, field: str, value: Any) -> None:
        with translated():
            await self.client.hset(key, field, value)

    async def del_field(self, key: str, field: str) -> None:
        with translated():
            await self.client.hdel(key, field)

    async def events(self, stream: str, after: str = "-", count: int = 100) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries of an event stream after id *after* (exclusive), oldest first."""
        with translated():
            rows = await self.client.xrange(stream, "(" + after if after != "-" else "-", "+", count)
        return [(i.decode(), f) for i, f in rows]

def split_codes(blob: bytes) -> list[bytes]:
    """The codes of a delivery record (see pack_codes in lua/_sku.lua)."""
    out, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 2], "big")
        out.append(blob[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out
