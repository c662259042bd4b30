"""The connection to Redis, and the store's parts, one per concept.

Only ``dispatch/store/`` talks to Redis. :class:`Store` holds the connection and runs
scripts (packed by the compiled core, pipelined, NOSCRIPT handled), on one Redis or
on a Redis Cluster (``store.cluster``: each round split by the master owning each
call's slot, MOVED and ASK followed); its parts
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
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis import exceptions as rex

from .._core import pack_calls
from ..config import Config, SentinelUrl, cluster_url, sentinel_url
from ..errors import ConfigError, DispatchError, StoreUnavailableError
from ..models import Event
from ..records import decode_events
from . import keys, scripts
from .accounts import AccountStore
from .aftersales import AfterSalesStore
from .catalog import CatalogStore
from .embedded import EmbeddedRedis
from .inventory import InventoryStore
from .orders import OrderStore
from .replication import SELLING, Replication
from .replies import translated
from .webhooks import WebhookStore

__all__ = ["Store"]

MIN_VERSION = (6, 2)
CLUSTER_SLOTS = 16384
#: Times a cluster round is re-sent for the calls redirected (MOVED, ASK, TRYAGAIN, NOSCRIPT).
_REDIRECTS = 5
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
#: One script call: its keys, its arguments, then items whose fields follow the arguments.
Call = tuple[list[str], list[Any], Sequence[Sequence[Any]]]


class Store:
    """A connection to the Redis that holds everything (embedded or external)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, embedded: EmbeddedRedis | None = None,
                 pool_size: int = 64, replication: tuple[int, int, float] = (0, 1000, 5.0)) -> None:
        self.client = client
        self.embedded = embedded
        #: True on a Redis Cluster: a purchase then runs as a saga of one-shard steps.
        self.cluster = isinstance(client, RedisCluster)
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._idle: list[Connection] = []
        self._pool_size = pool_size if self.cluster else client.connection_pool.max_connections
        self._slots = asyncio.Semaphore(self._pool_size)
        self._node_slots: dict[str, asyncio.Semaphore] = {}
        self.catalog = CatalogStore(self)
        self.accounts = AccountStore(self)
        self.orders = OrderStore(self)
        self.inventory = InventoryStore(self)
        self.aftersales = AfterSalesStore(self)
        self.webhooks = WebhookStore(self)
        #: Replicas waited for after each round, the master's identity watched (replication.py).
        self.replication = Replication(self, *replication)

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
        timeouts = dict(socket_timeout=config.redis_timeout_s, socket_connect_timeout=config.redis_timeout_s)
        seeds, sentinels = cluster_url(url), sentinel_url(url)
        if sentinels is not None:
            client: aioredis.Redis | RedisCluster = _sentinel_master(sentinels, config.redis_pool_size,
                                                                     config.redis_timeout_s, timeouts)
        elif seeds is not None:
            # The script path takes at most redis_pool_size connections of a node; the
            # rest are for plain commands, which redis-py's cluster client routes itself.
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in seeds.seeds], ssl=seeds.tls,
                username=seeds.username, password=seeds.password, max_connections=2 * config.redis_pool_size,
                **timeouts)
        else:
            try:
                pool = aioredis.BlockingConnectionPool.from_url(
                    url, max_connections=config.redis_pool_size, timeout=config.redis_timeout_s, **timeouts)
            except ValueError as e:
                if embedded:
                    embedded.stop()
                raise ConfigError(f"redis_url is not a valid Redis URL: {e}") from None
            client = aioredis.Redis(connection_pool=pool)
        store = cls(client, embedded, config.redis_pool_size,
                    (config.min_replicas_acked, config.replica_ack_timeout_ms, config.redis_timeout_s))
        try:
            if store.cluster:
                await store._initialize_cluster()
            await store._check_server()
        except BaseException:
            await store.close()
            raise
        return store

    async def _initialize_cluster(self) -> None:
        """The slot map, from the first seed node that answers."""
        assert isinstance(self.client, RedisCluster)
        try:
            with translated():
                await self.client.initialize()
        except StoreUnavailableError as e:
            if "not enabled" in str(e):
                raise ConfigError("redis_url names a Redis Cluster (redis+cluster://), but its seed nodes "
                                  "are not in cluster mode: use redis:// for one Redis") from None
            raise

    async def _each_master(self, *command: Any) -> list[Any]:
        """A command that is not about a key (INFO, PING, SCRIPT...) run on the one Redis,
        or on every master of a cluster: their replies."""
        if isinstance(self.client, RedisCluster):
            return [await node.execute_command(*command) for node in self.client.get_primaries()]
        return [await self.client.execute_command(*command)]

    async def _check_server(self) -> None:
        """Every master is Redis >= 6.2, in the mode the URL says; a cluster serves every slot."""
        with translated():
            infos = await self._each_master("INFO", "server")
            for info in infos:
                version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
                if version < MIN_VERSION:
                    raise ConfigError(f"Redis {info['redis_version']} is too old: card-dispatch needs >= 6.2")
            if not self.cluster:
                if str((await self.client.info("cluster")).get("cluster_enabled")) == "1":
                    raise ConfigError("redis_url names one Redis (redis://), but it is a Redis Cluster node: "
                                      "use redis+cluster://host:port[,host:port...]")
                self.replication.use_server(version)
                await self.replication.check()
                return
            for state in await self._each_master("CLUSTER INFO"):
                assigned = int(state.get("cluster_slots_assigned", 0))
                if state.get("cluster_state") != "ok" or assigned != CLUSTER_SLOTS:
                    raise StoreUnavailableError(
                        f"the Redis Cluster is not ok: cluster_state {state.get('cluster_state')}, "
                        f"{assigned} of {CLUSTER_SLOTS} slots assigned")

    async def close(self) -> None:
        await self.replication.close()
        with contextlib.suppress(Exception):
            await self._drop_idle()
            await self.client.aclose()
            if isinstance(self.client.connection_pool, SentinelConnectionPool):
                await self.client.connection_pool.sentinel_manager.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A connection of the script path's own small pool: a coalesced call needs one
        for a whole batch, so the generic pool's waiting and timeouts are not worth
        their cost here. A connection that saw an error is dropped, never reused
        (a reply may still be on its way); one that lost its server drops every idle
        one too, so the next round connects afresh (under Sentinel: to the master the
        sentinels name now). A new connection reads the identity of its server first."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._new_connection()
            try:
                yield conn
            except BaseException as e:
                await conn.disconnect()
                if isinstance(e, (rex.ConnectionError, rex.TimeoutError, OSError)) and not isinstance(e, DispatchError):
                    await self._drop_idle()
                raise
            self._idle.append(conn)

    async def _new_connection(self) -> Connection:
        conn = self.client.connection_pool.make_connection()
        try:
            await conn.connect()
            await self.replication.identify(conn)
        except BaseException:
            await conn.disconnect()
            raise
        return conn

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()

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
        if self.cluster:
            with translated():
                return await self._run_on_cluster(script, sha, calls)
        packed = pack_calls(sha, list(calls)) + self.replication.wait
        with translated():
            for attempt in (1, 2):
                try:
                    async with self._connection() as conn:
                        if name in SELLING:
                            await self.replication.selling_allowed()
                        await conn.send_packed_command(packed)
                        replies = [await conn.read_response() for _ in calls]
                        await self.replication.acked(conn)
                        return replies
                except rex.NoScriptError:
                    if attempt == 2:
                        raise
                    await self.client.script_load(script.script)
        raise AssertionError("unreachable")

    async def _run_on_cluster(self, script: Any, sha: bytes, calls: Sequence[Call]) -> list[Any]:
        """:meth:`run_many` on a cluster: the calls grouped by the master owning the slot
        of each call's first key, one pipelined write per master, at once. A call
        answered MOVED is sent again where the refreshed slot map says, one answered
        ASK is sent to the node named, after ASKING, one answered NOSCRIPT after the
        script is loaded there, one answered TRYAGAIN (a slot half migrated) a moment
        later: every script is safe to run twice."""
        client = self.client
        assert isinstance(client, RedisCluster)
        replies: list[Any] = [None] * len(calls)
        todo: Sequence[int] = range(len(calls))
        asking: dict[int, ClusterNode] = {}
        for attempt in range(_REDIRECTS):
            by_node: dict[ClusterNode, list[int]] = {}
            for i in todo:
                node = asking.get(i) or client.get_node_from_key(calls[i][0][0])
                by_node.setdefault(node, []).append(i)
            answers = await asyncio.gather(*(self._send_to_node(node, sha, calls, idx, asking)
                                             for node, idx in by_node.items()))
            asking, again, unloaded = {}, [], set()
            for (node, idx), got in zip(by_node.items(), answers):
                for i, reply in zip(idx, got):
                    if isinstance(reply, rex.MovedError):  # (a subclass of AskError)
                        await client.nodes_manager.move_slot(reply)
                    elif isinstance(reply, rex.AskError):
                        target = client.get_node(reply.host, reply.port)
                        if target is None:  # a node the map does not know yet
                            await client.nodes_manager.initialize()
                        else:
                            asking[i] = target
                    elif isinstance(reply, rex.NoScriptError):
                        unloaded.add(node)
                    elif isinstance(reply, rex.TryAgainError):
                        pass
                    elif isinstance(reply, rex.ResponseError):
                        raise reply
                    else:
                        replies[i] = reply
                        continue
                    again.append(i)
            for node in unloaded:
                await node.execute_command("SCRIPT LOAD", script.script)
            if not again:
                return replies
            todo = again
            if attempt:
                await asyncio.sleep(0.05 * attempt)
        raise rex.ClusterError(f"{len(todo)} script calls were still redirected after {_REDIRECTS} tries")

    async def _send_to_node(self, node: ClusterNode, sha: bytes, calls: Sequence[Call], idx: list[int],
                            asking: dict[int, ClusterNode]) -> list[Any]:
        """Calls *idx* sent to one node in one write, on a connection of that node's own
        pool; each reply, or the error reply it got (a redirect is the caller's to follow)."""
        slots = self._node_slots.get(node.name)
        if slots is None:
            slots = self._node_slots[node.name] = asyncio.Semaphore(self._pool_size)
        if any(i in asking for i in idx):
            packed = b"".join((_ASKING if i in asking else b"") + pack_calls(sha, [calls[i]]) for i in idx)
        else:
            packed = pack_calls(sha, [calls[i] for i in idx])
        async with slots:
            conn = node.acquire_connection()
            try:
                await node.disconnect_if_needed(conn)
                await conn.send_packed_command(packed)
                out: list[Any] = []
                for i in idx:
                    if i in asking:
                        await conn.read_response()  # OK
                    try:
                        out.append(await conn.read_response())
                    except rex.ResponseError as e:  # read whole: the connection stays in step
                        out.append(e)
                return out
            except BaseException:
                await conn.disconnect()  # a reply may still be on its way
                raise
            finally:
                node.release(conn)

    # ---- small helpers of the parts ---------------------------------------------------
    def script(self, name: str) -> Any:
        """redis-py's script object of *name* (called on a given client, it loads itself on NOSCRIPT)."""
        return self._scripts[name]

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

    def scan(self, match: str, near: str) -> AsyncIterator[bytes]:
        """The keys matching *match*, all in the slot of key *near* (on a cluster, only
        the master holding that slot is asked)."""
        if isinstance(self.client, RedisCluster):
            return self.client.scan_iter(match=match, count=1000, target_nodes=self.client.get_node_from_key(near))
        return self.client.scan_iter(match=match, count=1000)

    async def ready(self) -> None:
        """Redis answers (every master of a cluster, every slot served) and every script is
        in its script cache (loaded again if flushed)."""
        scripts_ = list(self._scripts.values())
        with translated():
            if self.cluster:
                await self._check_server()
            await self._each_master("PING")
            for present in await self._each_master("SCRIPT EXISTS", *(s.sha for s in scripts_)):
                for script, ok in zip(scripts_, present):
                    if not ok:
                        await self._each_master("SCRIPT LOAD", script.script)

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


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool (each new connection asks the sentinels where the master
    is), waiting for a free connection as the pool of one Redis does."""


def _sentinel_master(where: SentinelUrl, pool_size: int, timeout_s: float, timeouts: dict[str, float]) -> aioredis.Redis:
    """A client of the master that the sentinels of *where* name, following it across failovers."""
    sentinels = Sentinel(list(where.sentinels), sentinel_kwargs=dict(ssl=where.tls, **timeouts),
                         ssl=where.tls, username=where.username, password=where.password, **timeouts)
    return sentinels.master_for(where.service, connection_pool_class=_SentinelPool, max_connections=pool_size,
                                timeout=timeout_s)
