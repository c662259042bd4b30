"""The connection to Redis, and the store's parts, one per concept.

Only ``dispatch/store/`` talks to Redis. :class:`Store` holds the connection and runs
scripts (packed by the compiled core, pipelined, NOSCRIPT handled); its parts
(``store.catalog``, ``store.accounts``, ``store.orders``, ``store.inventory``,
``store.aftersales``, ``store.webhooks``) speak the engine's language (a distributor,
a SKU, a list of order items), build keys and arguments, and turn replies into typed
results or errors (replies.py). Every rule that must be atomic is a Lua script.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis import exceptions as rex

from .._core import pack_calls
from ..config import Config
from ..errors import ConfigError
from ..models import Event
from ..records import decode_events
from . import keys, scripts
from .accounts import AccountStore
from .aftersales import AfterSalesStore
from .catalog import CatalogStore
from .embedded import EmbeddedRedis
from .inventory import InventoryStore
from .orders import OrderStore
from .replies import translated
from .webhooks import WebhookStore

__all__ = ["Store"]

MIN_VERSION = (6, 2)
#: One script call: its keys, its arguments, then items whose fields follow the arguments.
Call = tuple[list[str], list[Any], Sequence[Sequence[Any]]]


class Store:
    """A connection to the Redis that holds everything (embedded or external)."""

    def __init__(self, client: aioredis.Redis, embedded: EmbeddedRedis | None = None) -> None:
        self.client = client
        self.embedded = embedded
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(client.connection_pool.max_connections)
        self.catalog = CatalogStore(self)
        self.accounts = AccountStore(self)
        self.orders = OrderStore(self)
        self.inventory = InventoryStore(self)
        self.aftersales = AfterSalesStore(self)
        self.webhooks = WebhookStore(self)

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

    async def run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """One call of script *name*; its reply."""
        return (await self.run_many(name, [(keys_, args, ())]))[0]

    async def run_many(self, name: str, calls: Sequence[Call]) -> list[Any]:
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

    # ---- small helpers of the parts ---------------------------------------------------
    async def put(self, key: str, mode: str, fields: dict[str, Any]) -> str:
        """Create (``create``) or change (``update``) a record hash: ok | exists | not_found."""
        args: list[Any] = [mode]
        for f, v in fields.items():
            args += [f, v]
        return (await self.run("put", [key], args)).decode()

    async def members(self, registry: str) -> list[str]:
        """The ids of a registry (SKUs, distributors, suppliers), sorted."""
        with translated():
            return sorted(m.decode() for m in await self.client.smembers(registry))

    async def ledger(self, key: str, start: int, stop: int) -> list[list[str]]:
        """Entries *start*..*stop* (list indexes) of a ledger, each as its seven fields
        (kind, ref, amount, held delta, balance, held, ms; see _account.lua)."""
        with translated():
            raw = await self.client.lrange(key, start, stop)
        return [e.decode().split("\x1f") for e in raw]

    async def ready(self) -> None:
        """Redis answers and every script is in its script cache (loaded again if flushed)."""
        with translated():
            await self.client.ping()
            scripts_ = list(self._scripts.values())
            present = await self.client.script_exists(*(s.sha for s in scripts_))
            for script, ok in zip(scripts_, present):
                if not ok:
                    await self.client.script_load(script.script)

    async def events(self, kind: str, id_: str, after: str | None, count: int) -> list[Event]:
        """Up to *count* events of the stream of a distributor (``dist``), a SKU (``sku``)
        or a supplier (``supplier``) after event *after* (exclusive; None: from the start),
        oldest first. An entry that tells several orders' news holds events
        ``<entry>.0``, ``<entry>.1``...: a page may end inside it."""
        entry, _, sub = (after or "").partition(".")
        start = entry if sub else "(" + entry if entry else "-"
        with translated():
            rows = await self.client.xrange(keys.events_key(kind, id_), start, "+", count)
        out = [e for i, f in rows for e in decode_events(i.decode(), f)]
        if sub:  # the rest of the entry the last page ended in
            out = [e for e in out if not e.event_id.startswith(entry + ".") or int(e.event_id[len(entry) + 1:]) > int(sub)]
        return out[:count]
