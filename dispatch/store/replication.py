"""Replication: a round kept by replicas before anyone hears of it, and a change of
master noticed and reconciled before anything is sold again.

Replication in Redis is asynchronous: a master can answer a purchase, die, and have a
replica promoted without it. Two covers, on one master (plain or under Sentinel) and on
each master of a Redis Cluster alike:

- **Acknowledged means replicated.** With ``min_replicas_acked`` = n > 0 every round of
  script calls sent to a master is followed, in the same write on the same connection,
  by ``WAIT n timeout`` (with ``replica_ack = "fsynced"``, ``WAITAOF 0 n timeout``:
  Redis >= 7.2 and Valkey, whose replicas then need ``appendonly yes`` and acknowledge
  their fsync only about once a second); the round's replies are handed to their
  callers only once every master it wrote to answers n. Both wait for the connection's
  last replicated write, which since Redis 7 a command that replicates nothing leaves
  where it was (a round that only replays orders made on other connections); so a
  ``SET`` of the master's marker key (``keys.acked``) goes first and brings it to the
  master's offset (``PUBLISH`` would do on one Redis, but a cluster sends it over its
  bus, not to the replicas). A round it leaves short fails as the retryable
  StoreUnavailableError: its scripts may have run, and a retry finds what they did
  (every script is safe to run twice; a purchase is found by its external_ref).
- **Reconciliation.** Every new connection of the script path, and the sweep, read the
  ``run_id`` and ``master_replid`` of the master they reach (on a cluster: each master,
  by its address). When they change (a failover, a restart), or a cluster has a master
  it did not have (a promoted replica), selling scripts on that master wait
  (``selling_allowed``) while the pools of the SKU shards whose slots it serves are
  checked against what orders hold: a code in a pool that a paid order holds, or that
  its shard's delivery record holds reserved or sold, is taken out and its counter
  lowered (``sku_reconcile``). What was fixed is logged (counts, never codes) and
  counted.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex
from redis.asyncio.connection import Connection

from ..errors import ConfigError, StoreUnavailableError
from ..records import PAID
from . import keys
from .replies import translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Replication", "SELLING"]

log = logging.getLogger("dispatch.store")

#: Scripts that take codes out of a pool: they wait while the pools are reconciled.
SELLING = frozenset({"deliver", "take", "sku_invalidate"})
_INFO = b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n"
_FIELD = {name: re.compile(rb"^%s:(\w+)" % name.encode(), re.M)
          for name in ("run_id", "master_replid", "role", "connected_slaves")}
_RETRY_S = 1.0
#: Candidates per sku_reconcile call.
_CHUNK = 1000


def _command(*parts: Any) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Replication:
    """What the store does about replicas: the acknowledgement after each round, and
    the identity of each master, watched. A master is named by its address on a
    cluster (redis-py's node name), ``""`` for the one Redis."""

    def __init__(self, store: Store, replicas: int = 0, timeout_ms: int = 1000, wait_s: float = 5.0,
                 fsynced: bool = False) -> None:
        self._store = store
        self.replicas = replicas
        #: Wait for the replicas' AOF fsync (WAITAOF), not only their receipt (WAIT).
        self.fsynced = fsynced
        self.timeout_ms = timeout_ms
        self._wait_s = wait_s
        self._wait = b""
        self._aof = False
        #: The bytes sent after a round's calls, per master (see wait()).
        self._waits: dict[str, bytes] = {}
        #: (run_id, master_replid) of each master last seen.
        self.masters: dict[str, tuple[bytes, bytes]] = {}
        #: Masters whose pools wait for reconciliation (selling there waits), and those
        #: not yet being reconciled.
        self._blocked: set[str] = set()
        self._todo: set[str] = set()
        self._unblocked = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        #: Changes of master seen, rounds left short of their replicas, and codes taken
        #: out of each SKU's pools by reconciliation, since start.
        self.changes = 0
        self.short_rounds = 0
        self.reconciled: dict[str, int] = {}

    def use_server(self, version: tuple[int, int]) -> None:
        """WAITAOF when replica_ack is "fsynced" (every master must have it: Redis >= 7.2;
        Valkey reports 7.2), else WAIT."""
        if not self.replicas:
            return
        if self.fsynced and version < (7, 2):
            raise ConfigError(f"replica_ack = \"fsynced\" waits with WAITAOF, which needs Redis >= 7.2 or Valkey "
                              f"on every master; the oldest here is {version[0]}.{version[1]}: use \"received\"")
        self._aof = self.fsynced
        wait = (_command("WAITAOF", 0, self.replicas, self.timeout_ms) if self._aof
                else _command("WAIT", self.replicas, self.timeout_ms))
        if wait != self._wait:
            self._wait = wait
            self._waits.clear()

    def wait(self, master: str = "") -> bytes:
        """What to send after a round's calls on a connection to *master* (b"" when
        nothing is waited for): the SET of its marker key, then the wait; :meth:`acked`
        reads their answers."""
        if not self._wait:
            return b""
        got = self._waits.get(master)
        if got is None:
            got = self._waits[master] = _command("SET", self._store.marker(master), "") + self._wait
        return got

    async def acked(self, conn: Connection, master: str = "", wrote: bool = True) -> None:
        """Read the answers to :meth:`wait` sent after a round on *conn*;
        StoreUnavailableError if fewer replicas than asked have the round. *wrote*: some
        call of the round ran (a round whose calls were all redirected, to a master that
        has since become a replica, is not judged: nothing of it is handed out)."""
        if not self._wait:
            return
        marked, got = await _reply(conn), await _reply(conn)
        if not wrote:
            return
        refused = next((r for r in (marked, got) if isinstance(r, rex.ResponseError)), None)
        if refused is not None:
            self._waits.pop(master, None)  # the marker's slot moved, or the master became a replica
            raise StoreUnavailableError(f"the replicas could not be waited for ({refused}); the round may have "
                                        "been applied: retry (an order with the same external_ref is found, "
                                        "not made again)")
        n = int(got[1]) if self._aof else int(got)
        if n < self.replicas:
            self.short_rounds += 1
            raise StoreUnavailableError(
                f"{n} of {self.replicas} replicas acknowledged the writes within {self.timeout_ms} ms; "
                "they may have been applied: retry (an order with the same external_ref is found, not made again)")

    # ---- the masters' identity ---------------------------------------------------------
    async def identify(self, conn: Connection, master: str = "") -> None:
        """Read the identity of the server a new connection reached."""
        await conn.send_packed_command(_INFO)
        server, repl = await conn.read_response(), await conn.read_response()
        self._observe(master, server, repl)

    async def check(self, first: bool = False) -> dict[str, int]:
        """Read every master's identity on plain connections (the sweep calls this, so an
        engine that sells nothing still notices), and wait for a reconciliation it
        starts; *first* (at start): what is seen is the starting point, not a change.
        The replicas connected to each master."""
        with translated():
            servers = await self._store.each_master("INFO", "server")
            repls = await self._store.each_master("INFO", "replication")
        for master, server in servers.items():
            if master in repls:
                self._observe(master, server, repls[master], first)
        if self._task is not None:
            await asyncio.shield(self._task)
        return {master: int(_field(repl, "connected_slaves") or 0) for master, repl in repls.items()}

    def _observe(self, master: str, server: Any, repl: Any, first: bool = False) -> None:
        if _field(repl, "role") != b"master":
            return  # a replica reached through an old slot map: its calls are redirected
        seen = (_field(server, "run_id"), _field(repl, "master_replid"))
        last = self.masters.get(master)
        if seen == last:
            return
        self.masters[master] = seen
        if last is None and (first or not self._store.cluster):
            return
        where = f"the Redis master {master}" if master else "the Redis master"
        if last is None:
            log.warning("%s (run_id %s, replication id %s) is new: selling from its SKU shards waits while "
                        "their pools are reconciled", where, seen[0].decode(), seen[1].decode())
        else:
            log.warning("%s changed (run_id %s -> %s, replication id %s -> %s): selling from its SKU shards waits "
                        "while their pools are reconciled", where, last[0].decode(), seen[0].decode(),
                        last[1].decode(), seen[1].decode())
        self.changes += 1
        self._blocked.add(master)
        self._todo.add(master)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._reconcile_until_done(),
                                                                name="dispatch-reconcile")

    async def selling_allowed(self, master: str = "") -> None:
        """Return at once unless *master*'s pools are being reconciled after a change of
        master; then wait for it, StoreUnavailableError after the store's timeout."""
        if master not in self._blocked:
            return
        try:
            async with asyncio.timeout(self._wait_s), self._unblocked:
                await self._unblocked.wait_for(lambda: master not in self._blocked)
        except TimeoutError:
            raise StoreUnavailableError("the Redis master changed and its pools are still being "
                                        "reconciled; retry") from None

    async def _unblock(self, masters: Collection[str]) -> None:
        async with self._unblocked:
            self._blocked.difference_update(masters)
            self._unblocked.notify_all()

    async def _reconcile_until_done(self) -> None:
        try:
            while self._todo:
                masters, self._todo = self._todo, set()
                try:
                    fixed = await self.reconcile(masters)
                except Exception as e:  # selling there stays stopped until it is done
                    log.warning("reconciling the pools failed (%r); trying again in %s s", e, _RETRY_S)
                    self._todo |= masters
                    await asyncio.sleep(_RETRY_S)
                    continue
                for sku, n in fixed.items():
                    self.reconciled[sku] = self.reconciled.get(sku, 0) + n
                if fixed:
                    log.warning("reconciled after the change of master: %s", ", ".join(
                        f"SKU {sku}: {n} codes held by orders taken out of its pools"
                        for sku, n in sorted(fixed.items())))
                else:
                    log.warning("reconciled after the change of master: every pool was consistent")
                await self._unblock(masters - self._todo)
        finally:
            self._task = None
            await self._unblock(list(self._blocked))

    async def reconcile(self, masters: Collection[str] | None = None) -> dict[str, int]:
        """Take out of the pools of every SKU shard (on a cluster: every one whose slot
        one of *masters* serves; None: all) the codes that orders hold; codes taken out
        per SKU (only SKUs where there were some). Reads every account's orders, on plain
        connections."""
        store = self._store
        shards = [shard for spread in await store.catalog.shards_of(await store.catalog.sku_ids())
                  for shard in spread if masters is None or store.node_of(keys.sku_tag(shard)) in masters]
        if not shards:
            return {}
        paid: dict[str, set[bytes]] = {}
        for dist in await store.accounts.ids():
            after = ""
            while rows := await store.orders.order_records(dist, after, "~", 1000):
                for r, codes in rows:
                    after = r.id
                    if r.status in PAID and codes:
                        paid.setdefault(r.sku, set()).update(codes)
        fixed: dict[str, int] = {}
        changed = []
        for shard in shards:
            sku = shard.partition(keys.BUCKET)[0]
            held = dict.fromkeys(paid.get(sku, ()), "")
            for oid, (rec, codes) in (await store.inventory.deliveries(shard)).items():
                if rec["st"] in ("reserved", "sold"):
                    held.update(dict.fromkeys(codes or (), oid))
            stray = [(seq, c, held[c]) for seq, pool in (await store.inventory.pools(shard)).items()
                     for c in pool if c in held]
            n = 0
            for i in range(0, len(stray), _CHUNK):
                n += await self._unpool(shard, stray[i:i + _CHUNK])
            if n:
                fixed[sku] = fixed.get(sku, 0) + n
                changed.append(shard)
        await store.tell_levels(changed)
        return fixed

    async def _unpool(self, shard: str, stray: list[tuple[int, bytes, str]]) -> int:
        k = keys.SkuKeys(shard)
        args: list[Any] = [k.pool_prefix, len(stray)]
        for seq, code, oid in stray:
            args += [seq, code, oid]
        # On a plain connection: selling rounds may hold the script path's connections while they wait.
        with translated():
            return int(await self._store.script("sku_reconcile")(keys=k.all, args=args, client=self._store.client))

    def stats(self) -> tuple[int, int, dict[str, int]]:
        """(changes of master seen, rounds left short of their replicas, codes taken out of
        each SKU's pools by reconciliation), since start."""
        return self.changes, self.short_rounds, dict(self.reconciled)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


async def _reply(conn: Connection) -> Any:
    """The next reply on *conn*, an error reply returned, not raised (the connection stays in step)."""
    try:
        return await conn.read_response()
    except rex.ResponseError as e:
        return e


def _field(info: Any, name: str) -> bytes:
    """A field of an INFO reply: raw bytes from a connection, or the dict redis-py parsed."""
    if isinstance(info, dict):
        return str(info.get(name, "")).encode()
    m = _FIELD[name].search(info)
    return m[1] if m else b""
