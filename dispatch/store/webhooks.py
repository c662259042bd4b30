"""Webhook deliveries in Redis (the ``{w}`` keys): targets, a cursor per event stream,
and jobs, each due at a time (a ZSET) or failed for good."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import msgspec

from . import keys
from .replies import translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["WebhookStore", "Target", "Job", "StreamNews"]

_LISTS = [keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED]
_ENQUEUE = [keys.WEBHOOK_CURSOR, keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE]


class Target(msgspec.Struct, array_like=True):
    """A registered webhook: "admin" or "dist:<id>"."""

    url: str
    secret: bytes               # vault ciphertext, AAD b"webhook:" + target name
    created: int


class Job(msgspec.Struct, array_like=True):
    """One event for one target, until it is delivered or fails for good."""

    target: str
    event: str                  # the event id: "<shard>:<entry id>"
    type: str
    entity: str
    version: int
    body: bytes                 # made once, so every attempt sends the same bytes
    created: int
    attempts: int = 0
    last_error: str = ""
    next_at: int = 0


class StreamNews(NamedTuple):
    """What is new on one event stream: the targets that listen to it and the entries
    after its cursor (none read when nobody listens), and where the cursor moves to."""

    stream: str
    shard: str                  # "a:acme", "s:g100", "p:sup"
    listeners: list[str]
    entries: list[tuple[str, dict[bytes, bytes]]]
    end: str | None             # None: the cursor stays


_enc = msgspec.msgpack.Encoder()
_dec_job = msgspec.msgpack.Decoder(Job)
_dec_target = msgspec.msgpack.Decoder(Target)


class WebhookStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    # ---- targets -------------------------------------------------------------------
    async def set_target(self, name: str, distributor: str | None, target: Target) -> bool:
        """Register (or replace) target *name*; False when *distributor* is not listed."""
        c = self._db.client
        with translated():
            if distributor is not None and not await c.sismember(keys.DISTS, distributor):
                return False
            await c.hset(keys.WEBHOOK_TARGETS, name, _enc.encode(target))
        return True

    async def remove_target(self, name: str) -> bool:
        with translated():
            return bool(await self._db.client.hdel(keys.WEBHOOK_TARGETS, name))

    async def targets(self, names: list[str]) -> dict[str, Target]:
        """The registered ones among *names*."""
        if not names:
            return {}
        with translated():
            raw = await self._db.client.hmget(keys.WEBHOOK_TARGETS, names)
        return {n: _dec_target.decode(r) for n, r in zip(names, raw) if r is not None}

    # ---- streams -> jobs --------------------------------------------------------------
    async def news(self, read_count: int) -> list[StreamNews]:
        """Every event stream whose cursor has somewhere to go: up to *read_count* entries
        after it for the streams some target listens to (the admin target: all; a
        distributor's: its own), just the end for the others."""
        c = self._db.client
        with translated():
            async with c.pipeline(transaction=False) as p:
                p.smembers(keys.DISTS)
                p.smembers(keys.SKUS)
                p.smembers(keys.SUPPLIERS)
                p.hgetall(keys.WEBHOOK_CURSOR)
                p.hkeys(keys.WEBHOOK_TARGETS)
                dists, skus, sups, cursors, names = await p.execute()
            registered = {n.decode() for n in names}
            streams = []
            for kind, ids in (("dist", dists), ("sku", skus), ("supplier", sups)):
                for i in sorted(ids):
                    i = i.decode()
                    listeners = (["admin"] if "admin" in registered else []) + \
                        (["dist:" + i] if kind == "dist" and "dist:" + i in registered else [])
                    streams.append((keys.events_key(kind, i), listeners))
            async with c.pipeline(transaction=False) as p:
                for key, listeners in streams:
                    if listeners:
                        p.xread({key: cursors.get(key.encode(), b"0-0")}, count=read_count)
                    else:  # nobody listens: only move the cursor to the end, reading nothing
                        p.xrevrange(key, count=1)
                replies = await p.execute()
        out = []
        for (key, listeners), reply in zip(streams, replies):
            shard = key[len(keys.PREFIX) + 1:-len("}:events")]
            cursor = cursors.get(key.encode())
            if not listeners:
                if reply and reply[0][0] != cursor:
                    out.append(StreamNews(key, shard, [], [], reply[0][0].decode()))
            elif reply:
                entries = [(i.decode(), f) for i, f in reply[0][1]]
                out.append(StreamNews(key, shard, listeners, entries, entries[-1][0]))
        return out

    async def enqueue(self, moves: list[tuple[StreamNews, list[tuple[str, Job]]]], now: int) -> None:
        """For each stream: its jobs (entry id, job) made once each, and its cursor moved
        to its end, in one script call per stream (see lua/webhook_enqueue.lua)."""
        calls = []
        for news, jobs in moves:
            args: list[bytes | str | int] = [news.stream, news.end or "", now]
            for entry_id, job in jobs:
                args += [entry_id, f"{job.target}:{job.event}", _enc.encode(job)]
            calls.append((_ENQUEUE, args, ()))
        if calls:
            await self._db.run_many("webhook_enqueue", calls)

    # ---- jobs ------------------------------------------------------------------------
    async def claim(self, now: int, lease_until: int, count: int) -> list[tuple[str, Job]]:
        """Up to *count* jobs due by *now*, leased until *lease_until*: (job id, job)."""
        flat = await self._db.run("webhook_claim", [keys.WEBHOOK_DUE, keys.WEBHOOK_JOBS], [now, lease_until, count])
        return [(flat[k].decode(), _dec_job.decode(flat[k + 1])) for k in range(0, len(flat), 2)]

    async def settle(self, job_id: str, lease_until: int, outcome: str, job: Job | None = None) -> None:
        """Record a claimed job's outcome (done, retry, failed) while its claim holds."""
        await self._db.run("webhook_settle", _LISTS, [job_id, lease_until, outcome,
                                                      _enc.encode(job) if job else b"", job.next_at if job else 0])

    async def backlog(self) -> tuple[int, int]:
        """(jobs waiting for a try, jobs failed for good)."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                p.zcard(keys.WEBHOOK_DUE)
                p.zcard(keys.WEBHOOK_FAILED)
                due, failed = await p.execute()
        return due, failed

    async def failed(self, limit: int) -> list[tuple[str, Job, int]]:
        """Jobs failed for good, the most recent first: (job id, job, ms it failed)."""
        c = self._db.client
        with translated():
            pairs = await c.zrevrange(keys.WEBHOOK_FAILED, 0, limit - 1, withscores=True) if limit > 0 else []
            raw = await c.hmget(keys.WEBHOOK_JOBS, [jid for jid, _ in pairs]) if pairs else []
        return [(jid.decode(), _dec_job.decode(r), int(at)) for (jid, at), r in zip(pairs, raw) if r is not None]

    async def failed_ids(self) -> list[str]:
        with translated():
            return [i.decode() for i in await self._db.client.zrange(keys.WEBHOOK_FAILED, 0, -1)]

    async def replay(self, ids: list[str], now: int) -> int:
        """Make jobs due now with their attempts reset; how many there were."""
        if not ids:
            return 0
        with translated():
            raw = await self._db.client.hmget(keys.WEBHOOK_JOBS, ids)
        calls = [(_LISTS, [jid, _enc.encode(msgspec.structs.replace(_dec_job.decode(r), attempts=0, next_at=now)),
                           now], ()) for jid, r in zip(ids, raw) if r is not None]
        return sum(await self._db.run_many("webhook_replay", calls)) if calls else 0
