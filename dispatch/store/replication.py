"""Replication: a round kept by replicas before anyone hears of it, and a change of
master noticed and reconciled before anything is sold again.

Replication in Redis is asynchronous: a master can answer a purchase, die, and have a
replica promoted without it. Two covers, both on one master (plain or under Sentinel):

- **Acknowledged means replicated.** With ``min_replicas_acked`` = n > 0 every round of
  script calls is followed, in the same write on the same connection, by ``WAIT n
  timeout`` (``WAITAOF 0 n timeout`` on Redis >= 7.2 and Valkey, whose replicas then
  need ``appendonly yes``); the round's replies are handed to their callers only once
  it answers n. Both wait for the connection's last replicated write, which since
  Redis 7 a command that replicates nothing leaves where it was (a round that only
  replays orders made on other connections); so a ``PUBLISH`` (replicated, stored
  nowhere) goes first and brings it to the master's offset. A round it leaves short fails as the retryable StoreUnavailableError:
  its scripts may have run, and a retry finds what they did (every script is safe to
  run twice; a purchase is found by its external_ref).
- **Reconciliation.** Every new connection of the script path, and the sweep, read the
  master's ``run_id`` and ``master_replid``. When they change (a failover, a restart),
  selling scripts wait (``selling_allowed``) while every SKU's pools are checked against
  what orders hold: a code in a pool that a paid order holds, or that its SKU's
  delivery record holds reserved or sold, is taken out and its counter lowered
  (``sku_reconcile``). What was fixed is logged (counts, never codes) and counted.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import Connection

from ..errors import StoreUnavailableError
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
_RUN_ID = re.compile(rb"^run_id:(\w+)", re.M)
_REPLID = re.compile(rb"^master_replid:(\w+)", re.M)
#: Published to before each wait (nobody listens): see the module's docstring.
_CHANNEL = "d:acked"
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
    the master's identity, watched."""

    def __init__(self, store: Store, replicas: int = 0, timeout_ms: int = 1000, wait_s: float = 5.0) -> None:
        self._store = store
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._wait_s = wait_s
        #: The command sent after each round's calls (b"" when nothing is waited for).
        self.wait = b""
        self._aof = False
        #: (run_id, master_replid) of the master last seen.
        self.master: tuple[bytes, bytes] | None = None
        self._reconciled = asyncio.Event()
        self._reconciled.set()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        #: Changes of master seen, rounds left short of their replicas, and codes taken
        #: out of each SKU's pools by reconciliation, since start.
        self.changes = 0
        self.short_rounds = 0
        self.reconciled: dict[str, int] = {}

    def use_server(self, version: tuple[int, int]) -> None:
        """Choose WAITAOF where the master has it (Redis >= 7.2; Valkey reports 7.2), else WAIT."""
        if not self.replicas:
            return
        self._aof = version >= (7, 2)
        self.wait = _command("PUBLISH", _CHANNEL, "") + (
            _command("WAITAOF", 0, self.replicas, self.timeout_ms) if self._aof
            else _command("WAIT", self.replicas, self.timeout_ms))

    async def acked(self, conn: Connection) -> None:
        """Read the answer to :attr:`wait` sent after a round on *conn*;
        StoreUnavailableError if fewer replicas than asked have the round."""
        if not self.wait:
            return
        await conn.read_response()  # PUBLISH: 0 listeners
        got = await conn.read_response()
        n = int(got[1]) if self._aof else int(got)
        if n < self.replicas:
            self.short_rounds += 1
            raise StoreUnavailableError(
                f"{n} of {self.replicas} replicas acknowledged the writes within {self.timeout_ms} ms; "
                "they may have been applied: retry (an order with the same external_ref is found, not made again)")

    # ---- the master's identity ---------------------------------------------------------
    async def identify(self, conn: Connection) -> None:
        """Read the identity of the server a new connection reached."""
        await conn.send_packed_command(_INFO)
        server, repl = await conn.read_response(), await conn.read_response()
        self._observe(server, repl)

    async def check(self) -> None:
        """Read the master's identity on a plain connection (the sweep calls this, so an
        engine that sells nothing still notices), and wait for a reconciliation it starts.
        Not on a cluster yet."""
        if self._store.cluster:
            return
        with translated():
            server = await self._store.client.execute_command("INFO", "server")
            repl = await self._store.client.execute_command("INFO", "replication")
        self._observe(server, repl)
        if self._task is not None:
            await asyncio.shield(self._task)

    def _observe(self, server: Any, repl: Any) -> None:
        seen = (_field(server, "run_id", _RUN_ID), _field(repl, "master_replid", _REPLID))
        if self.master is None or seen == self.master:
            self.master = seen
            return
        log.warning("the Redis master changed (run_id %s -> %s, replication id %s -> %s): selling waits "
                    "while every SKU's pools are reconciled", self.master[0].decode(), seen[0].decode(),
                    self.master[1].decode(), seen[1].decode())
        self.master = seen
        self.changes += 1
        self._reconciled.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._reconcile_until_done(),
                                                                name="dispatch-reconcile")
        else:
            self._again = True  # a change while reconciling: once more when it ends

    async def selling_allowed(self) -> None:
        """Return at once unless the pools are being reconciled after a change of master;
        then wait for it, StoreUnavailableError after the store's timeout."""
        if self._reconciled.is_set():
            return
        try:
            async with asyncio.timeout(self._wait_s):
                await self._reconciled.wait()
        except TimeoutError:
            raise StoreUnavailableError("the Redis master changed and its pools are still being "
                                        "reconciled; retry") from None

    async def _reconcile_until_done(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    fixed = await self.reconcile()
                except Exception as e:  # selling stays stopped until it is done
                    log.warning("reconciling the pools failed (%r); trying again in %s s", e, _RETRY_S)
                    await asyncio.sleep(_RETRY_S)
                    self._again = True
                else:
                    for sku, n in fixed.items():
                        self.reconciled[sku] = self.reconciled.get(sku, 0) + n
                    if fixed:
                        log.warning("reconciled after the change of master: %s", ", ".join(
                            f"SKU {sku}: {n} codes held by orders taken out of its pools"
                            for sku, n in sorted(fixed.items())))
                    else:
                        log.warning("reconciled after the change of master: every pool was consistent")
                if not self._again:
                    break
        finally:
            self._task = None
            self._reconciled.set()

    async def reconcile(self) -> dict[str, int]:
        """Take out of every SKU's pools the codes that orders hold; codes taken out per
        SKU (only SKUs where there were some). Reads the whole store, on plain connections."""
        store = self._store
        paid: dict[str, set[bytes]] = {}
        for dist in await store.accounts.ids():
            after = ""
            while rows := await store.orders.order_records(dist, after, "~", 1000):
                for r, codes in rows:
                    after = r.id
                    if r.status in PAID and codes:
                        paid.setdefault(r.sku, set()).update(codes)
        fixed: dict[str, int] = {}
        for sku in await store.catalog.sku_ids():
            held = dict.fromkeys(paid.get(sku, ()), "")
            for oid, (rec, codes) in (await store.inventory.deliveries(sku)).items():
                if rec["st"] in ("reserved", "sold"):
                    held.update(dict.fromkeys(codes or (), oid))
            stray = [(seq, c, held[c]) for seq, pool in (await store.inventory.pools(sku)).items()
                     for c in pool if c in held]
            n = 0
            for i in range(0, len(stray), _CHUNK):
                n += await self._unpool(sku, stray[i:i + _CHUNK])
            if n:
                fixed[sku] = n
        return fixed

    async def _unpool(self, sku: str, stray: list[tuple[int, bytes, str]]) -> int:
        k = keys.SkuKeys(sku)
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


def _field(info: Any, name: str, pattern: re.Pattern[bytes]) -> bytes:
    """A field of an INFO reply: raw bytes from a connection, or the dict redis-py parsed."""
    if isinstance(info, dict):
        return str(info.get(name, "")).encode()
    m = pattern.search(info)
    return m[1] if m else b""
