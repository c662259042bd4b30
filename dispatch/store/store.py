"""The connection to Redis, and the store's parts, one per concept.

Only ``dispatch/store/`` talks to Redis. :class:`Store` holds the connection and runs
scripts (packed by the compiled core, pipelined, NOSCRIPT handled), on one Redis or
on a Redis Cluster (``store.cluster``: each round split by the master owning each
call's slot, MOVED and ASK followed); its parts
(``store.catalog``, ``store.accounts``, ``store.orders``, ``store.inventory``,
``store.aftersales``, ``store.webhooks``, ``store.admins``) speak the engine's language (a distributor,
a SKU, a list of order items), build keys and arguments, and turn replies into typed
results or errors (replies.py). Every rule that must be atomic is a Lua script.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis import exceptions as rex
from redis.crc import key_slot

from .._core import pack_calls
from ..config import Config, SentinelUrl, cluster_url, sentinel_url
from ..errors import ConfigError, DispatchError, StoreUnavailableError
from ..models import Event
from ..records import decode_events
from . import keys, scripts
from .accounts import AccountStore
from .admins import AdminStore
from .aftersales import AfterSalesStore
from .catalog import CatalogStore
from .embedded import EmbeddedRedis
from .inventory import InventoryStore
from .orders import OrderStore
from .replication import SELLING, Replication
from .replies import translated
from .tiers import TierStore
from .webhooks import WebhookStore

__all__ = ["Store"]

MIN_VERSION = (6, 2)
CLUSTER_SLOTS = 16384
#: Times a cluster round is re-sent for the calls redirected (MOVED, ASK, TRYAGAIN, NOSCRIPT),
#: and the longest pause between two: TRYAGAIN lasts while a slot's keys are migrated (a
#: script's keys that do not all exist on one side wait for the end), so the calls wait
#: about 3 s in all before they fail as store_unavailable.
_REDIRECTS = 16
_MAX_PAUSE_S = 0.25
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
#: Connections per node for plain commands on a cluster, as a multiple of redis_pool_size.
_PLAIN_POOL_FACTOR = 8
#: One script call: its keys, its arguments, then items whose fields follow the arguments.
Call = tuple[list[str], list[Any], Sequence[Sequence[Any]]]


class Store:
    """A connection to the Redis that holds everything (embedded or external)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, embedded: EmbeddedRedis | None = None,
                 pool_size: int = 64, replication: tuple[int, int, float, bool] = (0, 1000, 5.0, False)) -> None:
        self.client = client
        self.embedded = embedded
        #: True on a Redis Cluster: a purchase runs in one step only where one master holds both sides.
        self.cluster = isinstance(client, RedisCluster)
        #: Only distributors whose real name is verified may buy (Config.require_verification).
        self.require_verification = False
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._pool_size = pool_size if self.cluster else client.connection_pool.max_connections
        #: The script path's own connections: per node on a cluster ("" for the one Redis)
        self._idle: dict[str, list[Connection]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._rereading: asyncio.Task[None] | None = None
        self.catalog = CatalogStore(self)
        self.accounts = AccountStore(self)
        self.orders = OrderStore(self)
        self.inventory = InventoryStore(self)
        self.aftersales = AfterSalesStore(self)
        self.webhooks = WebhookStore(self)
        self.admins = AdminStore(self)
        self.tiers = TierStore(self)
        #: Replicas waited for after each round, the master's identity watched (replication.py).
        self.replication = Replication(self, *replication)

    @classmethod
    async def connect(cls, config: Config) -> Store:
        """Connect to ``config.redis_url``, or start the embedded redis-server when it is unset."""
        embedded = None
        url = config.redis_url
        if url is None:
            embedded = EmbeddedRedis(config.data_dir, binary=config.redis_server,
                                     appendfsync=config.appendfsync,
                                     jemalloc=config.redis_jemalloc)
            await asyncio.to_thread(embedded.start)
            url = embedded.url
        timeouts = dict(socket_timeout=config.redis_timeout_s, socket_connect_timeout=config.redis_timeout_s)
        seeds, sentinels = cluster_url(url), sentinel_url(url)
        if sentinels is not None:
            client: aioredis.Redis | RedisCluster = _sentinel_master(sentinels, config.redis_pool_size,
                                                                     config.redis_timeout_s, timeouts)
        elif seeds is not None:
            # Plain commands are routed by redis-py's cluster client. Its pool of a node
            # does not wait for a free connection (it fails), so it may open many more
            # than the script path, for bursts (a cold daemon's first requests). A MOVED
            # patches its slot map (reinitialize_steps=0): by default every fifth MOVED
            # would close every connection of every node, those in use too, and a slot
            # migrated under load answers many MOVEDs.
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in seeds.seeds], ssl=seeds.tls,
                username=seeds.username, password=seeds.password,
                max_connections=_PLAIN_POOL_FACTOR * config.redis_pool_size, reinitialize_steps=0, **timeouts)
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
                    (config.min_replicas_acked, config.replica_ack_timeout_ms, config.redis_timeout_s,
                     config.replica_ack == "fsynced"))
        store.require_verification = config.require_verification
        try:
            if store.cluster:
                await store._initialize_cluster()
            await store._check_server(first=True)
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

    async def each_master(self, *command: Any) -> dict[str, Any]:
        """A command that is not about a key (INFO, PING, SCRIPT...) run on the one Redis
        (named ""), or on every master of a cluster (by name): their replies."""
        if not isinstance(self.client, RedisCluster):
            return {"": await self.client.execute_command(*command)}
        out = {}
        for node in self.client.get_primaries():
            try:
                out[node.name] = await node.execute_command(*command)
            except (rex.ConnectionError, rex.TimeoutError, OSError):
                self._reread_slots()  # it may have been replaced by its replica
                raise
        return out

    async def _check_server(self, first: bool = False) -> None:
        """Every master is Redis >= 6.2, in the mode the URL says, with the replicas
        ``min_replicas_acked`` asks for; a cluster serves every slot. Each master's
        identity is read (*first*: at start), and a change of master reconciled."""
        with translated():
            versions = []
            for info in (await self.each_master("INFO", "server")).values():
                version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
                if version < MIN_VERSION:
                    raise ConfigError(f"Redis {info['redis_version']} is too old: card-dispatch needs >= 6.2")
                versions.append(version)
            if not self.cluster:
                if str((await self.client.info("cluster")).get("cluster_enabled")) == "1":
                    raise ConfigError("redis_url names one Redis (redis://), but it is a Redis Cluster node: "
                                      "use redis+cluster://host:port[,host:port...]")
            else:
                for state in (await self.each_master("CLUSTER INFO")).values():
                    assigned = int(state.get("cluster_slots_assigned", 0))
                    if state.get("cluster_state") != "ok" or assigned != CLUSTER_SLOTS:
                        raise StoreUnavailableError(
                            f"the Redis Cluster is not ok: cluster_state {state.get('cluster_state')}, "
                            f"{assigned} of {CLUSTER_SLOTS} slots assigned")
        self.replication.use_server(min(versions))
        want = self.replication.replicas
        for master, n in (await self.replication.check(first)).items():
            if n < want:
                raise StoreUnavailableError(
                    f"min_replicas_acked is {want}, but the Redis master{' ' + master if master else ''} has {n} "
                    f"replica{'s' if n != 1 else ''} connected: every purchase would fail as store_unavailable; "
                    "connect replicas to it, or lower min_replicas_acked")

    async def close(self) -> None:
        await self.replication.close()
        if self._rereading is not None:
            self._rereading.cancel()
            with contextlib.suppress(BaseException):
                await self._rereading
        with contextlib.suppress(Exception):
            await self._drop_idle()
            await self.client.aclose()
            if isinstance(self.client.connection_pool, SentinelConnectionPool):
                await self.client.connection_pool.sentinel_manager.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    @contextlib.asynccontextmanager
    async def _connection(self, node: ClusterNode | None = None) -> AsyncIterator[Connection]:
        """A connection of the script path's own small pool (of the one Redis, or of a
        cluster's *node*): a coalesced call needs one for a whole batch, so the generic
        pool's waiting and timeouts are not worth their cost here. On a cluster they are
        not the node's pool either, which redis-py closes whole when it refreshes its
        slot map, in flight or not. A connection that saw an error is dropped, never
        reused (a reply may still be on its way); one that lost its server drops every idle
        one too, so the next round connects afresh (under Sentinel: to the master the
        sentinels name now; on a cluster, after its slot map is read again). A new
        connection reads the identity of its server first."""
        name = "" if node is None else node.name
        slots = self._slots.get(name)
        if slots is None:
            slots = self._slots[name] = asyncio.Semaphore(self._pool_size)
        idle = self._idle.setdefault(name, [])
        async with slots:
            conn = None
            try:
                conn = idle.pop() if idle else await self._new_connection(node)
                yield conn
            except BaseException as e:
                if conn is not None:
                    await conn.disconnect()
                if isinstance(e, (rex.ConnectionError, rex.TimeoutError, OSError)) and not isinstance(e, DispatchError):
                    await self._drop_idle(name)
                    if node is not None:
                        self._reread_slots()
                raise
            idle.append(conn)

    async def _new_connection(self, node: ClusterNode | None) -> Connection:
        if node is None:
            conn = self.client.connection_pool.make_connection()
        else:
            conn = node.connection_class(**node.connection_kwargs)
        try:
            await conn.connect()
            await self.replication.identify(conn, "" if node is None else node.name)
        except BaseException:
            await conn.disconnect()
            raise
        return conn

    async def _drop_idle(self, name: str | None = None) -> None:
        """Disconnect the idle connections of node *name* ("": the one Redis), or of all."""
        for node in list(self._idle) if name is None else [name]:
            idle, self._idle[node] = self._idle.get(node, []), []
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
                return await self._run_on_cluster(name, script, sha, calls)
        packed = pack_calls(sha, list(calls)) + self.replication.wait()
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

    async def _run_on_cluster(self, name: str, script: Any, sha: bytes, calls: Sequence[Call]) -> list[Any]:
        """:meth:`run_many` on a cluster: the calls grouped by the master owning the slot
        of each call's first key, one pipelined write per master, at once. A call
        answered MOVED is sent again where the refreshed slot map says, one answered
        ASK is sent to the node named, after ASKING, one answered NOSCRIPT after the
        script is loaded there, one answered TRYAGAIN (its keys split by a slot being
        migrated) a moment later, with a growing pause: every script is safe to run twice.
        With min_replicas_acked each master's replicas are waited for (replication.py)
        before any reply is handed out."""
        client = self.client
        assert isinstance(client, RedisCluster)
        selling = name in SELLING
        replies: list[Any] = [None] * len(calls)
        todo: Sequence[int] = range(len(calls))
        asking: dict[int, ClusterNode] = {}
        for attempt in range(_REDIRECTS):
            by_node: dict[ClusterNode, list[int]] = {}
            for i in todo:
                node = asking.get(i) or client.get_node_from_key(calls[i][0][0])
                by_node.setdefault(node, []).append(i)
            answers = await asyncio.gather(*(self._send_to_node(node, sha, calls, idx, asking, selling)
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
                async with self._connection(node) as conn:
                    await conn.send_command("SCRIPT", "LOAD", script.script)
                    await conn.read_response()
            if not again:
                return replies
            todo = again
            if attempt:
                await asyncio.sleep(min(0.01 * 2 ** attempt, _MAX_PAUSE_S))
        raise rex.ClusterError(f"{len(todo)} script calls were still redirected after {_REDIRECTS} tries")

    def masters(self) -> list[str]:
        """The masters' names by the slot map now (one Redis: [""], as :meth:`node_of` names it)."""
        if not isinstance(self.client, RedisCluster):
            return [""]
        return [node.name for node in self.client.get_primaries()]

    def node_of(self, key: str) -> str:
        """The node that serves *key* (on a cluster, its master by the slot map now; else "")."""
        if not self.cluster:
            return ""
        assert isinstance(self.client, RedisCluster)
        return self.client.get_node_from_key(key).name

    async def _send_to_node(self, node: ClusterNode, sha: bytes, calls: Sequence[Call], idx: list[int],
                            asking: dict[int, ClusterNode], selling: bool) -> list[Any]:
        """Calls *idx* sent to one node in one write, on a connection of the script path's
        own to that node, then the wait for its replicas; each reply, or the error reply it
        got (a redirect is the caller's to follow). *selling* calls wait while the node's
        pools are reconciled."""
        if any(i in asking for i in idx):
            packed = b"".join((_ASKING if i in asking else b"") + pack_calls(sha, [calls[i]]) for i in idx)
        else:
            packed = pack_calls(sha, [calls[i] for i in idx])
        async with self._connection(node) as conn:
            if selling:
                await self.replication.selling_allowed(node.name)
            await conn.send_packed_command(packed + self.replication.wait(node.name))
            out: list[Any] = []
            for i in idx:
                if i in asking:
                    await conn.read_response()  # OK
                try:
                    out.append(await conn.read_response())
                except rex.ResponseError as e:  # read whole: the connection stays in step
                    out.append(e)
            await self.replication.acked(conn, node.name, wrote=not all(isinstance(r, rex.ResponseError) for r in out))
            return out

    def marker(self, master: str) -> str:
        """The replication marker key of *master* (replication.py): ``keys.acked(0)`` on
        the one Redis; on a cluster the first ``keys.acked(n)`` in a slot it serves."""
        if not isinstance(self.client, RedisCluster):
            return keys.acked(0)
        slots = self.client.nodes_manager.slots_cache
        for n in range(100 * CLUSTER_SLOTS):
            owners = slots.get(key_slot(keys.acked(n).encode()))
            if owners and owners[0].name == master:
                return keys.acked(n)
        raise rex.ClusterError(f"the Redis master {master} serves no slot")

    def _reread_slots(self) -> None:
        """Read the cluster's slot map again, in the background, once at a time: a master
        the script path cannot reach may have been replaced by its replica (redis-py
        reads it again only on its own commands' errors)."""
        if self._rereading is None or self._rereading.done():
            self._rereading = asyncio.get_running_loop().create_task(self._reread(), name="dispatch-slots")

    async def _reread(self) -> None:
        assert isinstance(self.client, RedisCluster)
        with contextlib.suppress(Exception):  # the next error asks again
            await self.client.nodes_manager.initialize()

    # ---- small helpers of the parts ---------------------------------------------------
    async def tell_levels(self, shards: Iterable[str]) -> None:
        """After SKU scripts ran on *shards*: what each that is a bucket (``SKU~B``) holds
        on sale now is told to its SKU's own shard, which keeps the stock level of the
        whole SKU (sku_level.lua). Buckets keep no level of their own."""
        buckets = list(dict.fromkeys(s for s in shards if keys.BUCKET in s))
        if not buckets:
            return
        with translated():
            async with self.client.pipeline(transaction=False) as p:
                for shard in buckets:
                    p.hmget(keys.SkuKeys(shard).stats, "available", "chg")
                counts = await p.execute()
        told: dict[str, list[tuple[str, int, int]]] = {}
        for shard, (avail, chg) in zip(buckets, counts):
            sku, _, b = shard.partition(keys.BUCKET)
            told.setdefault(sku, []).append((b, int(avail or 0), int(chg or 0)))
        calls = []
        for sku, items in told.items():
            k = keys.SkuKeys(sku)
            calls.append((k.all, [k.pool_prefix, len(items)], items))
        await self.run_many("sku_level", calls)

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
        """Entries *start*..*stop* (list indexes) of a ledger, each as its fields (kind,
        ref, amount, held delta, ms; or kind, ref, amount, held delta, balance, held, ms:
        see _account.lua), for records.running."""
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
        """Redis answers (every master of a cluster, every slot served), each master has the
        replicas min_replicas_acked asks for, and every script is in its script cache
        (loaded again if flushed)."""
        scripts_ = list(self._scripts.values())
        await self._check_server()
        with translated():
            for present in (await self.each_master("SCRIPT EXISTS", *(s.sha for s in scripts_))).values():
                for script, ok in zip(scripts_, present):
                    if not ok:
                        await self.each_master("SCRIPT LOAD", script.script)

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
