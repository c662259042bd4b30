"""Replicated Redis: Sentinel URLs, rounds acknowledged by replicas before anyone hears
of them, and a change of master reconciled before anything is sold again. Every server
is real (tests/replicated.py)."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
import redis

from dispatch import errors
from dispatch.engine import Engine
from dispatch.records import decode_codes
from dispatch.server.metrics import Metrics
from dispatch.server.responses import lookup
from dispatch.store import keys

from .conftest import RedisProcess, codes_text, make_config
from .replicated import Replicated, SentinelGroup, replicated, sentinel_group, wait_for  # noqa: F401


async def open_shop(engine: Engine, stock: int = 20, sku: str = "g") -> None:
    await engine.create_supplier("sup", "Supplier")
    await engine.create_sku(sku, "Game card", 1000, "CNY", 900)
    await engine.import_codes(codes_text("G", stock), sku=sku, supplier="sup", unit_cost=500)
    await engine.create_distributor("acme", "Acme")
    await engine.topup("acme", 1_000_000, "seed")


def plain(order) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.code for c in order.codes]


async def test_a_sentinel_url_reaches_the_master(sentinel_group: SentinelGroup, tmp_path: os.PathLike[str]) -> None:
    async with Engine(make_config(tmp_path, redis_url=sentinel_group.url, min_replicas_acked=1), sweep=False) as e:
        await open_shop(e)
        order = await e.purchase("acme", "g", 2, "r1")
        assert len(order.codes) == 2
    with Replicated.client(sentinel_group.servers.master) as m:
        assert m.hexists(keys.AcctKeys("acme").orders, order.order_id)


async def test_a_round_waits_for_its_replica(replicated: Replicated, tmp_path: os.PathLike[str]) -> None:
    cfg = make_config(tmp_path, redis_url=replicated.master.tcp_url, min_replicas_acked=1)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e)
        with Replicated.client(replicated.replicas[0]) as replica:
            for i in range(5):
                order = await e.purchase("acme", "g", 1, f"r{i}")
                # acknowledged means the replica has it already: no waiting here
                assert replica.hexists(keys.AcctKeys("acme").orders, order.order_id)
        with Replicated.client(replicated.master) as master:  # replica_ack "received": WAIT
            assert {c for c in ("wait", "waitaof") if f"cmdstat_{c}" in master.info("commandstats")} == {"wait"}


async def test_fsynced_acknowledgements_wait_with_waitaof(replicated: Replicated, tmp_path: os.PathLike[str]) -> None:
    """replica_ack = "fsynced": WAITAOF where every master has it (Redis >= 7.2, Valkey),
    whose replicas acknowledge their fsync about once a second (hence the long timeout);
    refused at start on an older server, naming what to use instead."""
    with Replicated.client(replicated.master) as master:
        version = tuple(int(x) for x in master.info("server")["redis_version"].split(".")[:2])
    cfg = make_config(tmp_path, redis_url=replicated.master.tcp_url, min_replicas_acked=1, replica_ack="fsynced",
                      replica_ack_timeout_ms=10_000)
    if version < (7, 2):
        with pytest.raises(errors.ConfigError, match='replica_ack = "fsynced" waits with WAITAOF, which needs'):
            async with Engine(cfg, sweep=False):
                pass
        return
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e)
        order = await e.purchase("acme", "g", 1, "fsynced")
        with Replicated.client(replicated.replicas[0]) as replica:
            assert replica.hexists(keys.AcctKeys("acme").orders, order.order_id)
    with Replicated.client(replicated.master) as master:
        assert "cmdstat_waitaof" in master.info("commandstats")


async def test_a_round_short_of_its_replica_is_unavailable_and_its_retry_finds_the_same_order(
        replicated: Replicated, tmp_path: os.PathLike[str]) -> None:
    cfg = make_config(tmp_path, redis_url=replicated.master.tcp_url, min_replicas_acked=1,
                      replica_ack_timeout_ms=1000)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e, stock=10)
        replica = replicated.replicas[0]
        replicated.freeze(replica)
        try:
            with pytest.raises(errors.StoreUnavailableError, match="0 of 1 replicas") as raised:
                await e.purchase("acme", "g", 3, "late")
            assert raised.value.retryable and lookup(raised.value) == (503, "store_unavailable")
            with pytest.raises(errors.StoreUnavailableError):  # a retry while the replica is away
                await e.purchase("acme", "g", 3, "late")
        finally:
            replicated.thaw(replica)
        replicated.wait_in_sync()
        order = await e.purchase("acme", "g", 3, "late")
        again = await e.purchase("acme", "g", 3, "late")
        assert order.replayed and again.replayed  # the first try made it, while the replica was frozen
        assert again.order_id == order.order_id and plain(again) == plain(order) and len(plain(order)) == 3
        assert (await e.get_order_by_ref("acme", "late")).order_id == order.order_id
        assert (await e.stock("g")).available == 7
        assert await e.audit() == []
        assert e.store.replication.short_rounds >= 2


async def test_without_replicas_acked_a_frozen_replica_stops_nothing(replicated: Replicated,
                                                                     tmp_path: os.PathLike[str]) -> None:
    async with Engine(make_config(tmp_path, redis_url=replicated.master.tcp_url), sweep=False) as e:
        await open_shop(e)
        replicated.freeze(replicated.replicas[0])
        try:
            assert len((await e.purchase("acme", "g", 2, "r")).codes) == 2
        finally:
            replicated.thaw(replicated.replicas[0])
        assert e.store.replication.wait() == b""


async def test_a_change_of_master_is_reconciled_before_anything_is_sold(
        redis_factory, tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    """A code delivered, and the same ciphertext back in its pool (and counted available)
    as a promoted stale replica would hold it; then the server restarts (a new run id).
    The next sale must not hand that code out again."""
    server: RedisProcess = redis_factory(appendfsync="always")
    async with Engine(make_config(tmp_path, redis_url=server.tcp_url), sweep=False) as e:
        await open_shop(e, stock=10)
        sold = await e.purchase("acme", "g", 2, "sold")
        held = await e.purchase("acme", "g", 1, "held", mode="reserve", reserve_ttl_s=600)
        k, a = keys.SkuKeys("g"), keys.AcctKeys("acme")
        with redis.Redis(host="127.0.0.1", port=server.port) as r:
            pool = next(iter(r.scan_iter(match=k.pool_prefix + "*")))
            stale = r.hget(a.codes, sold.order_id), r.hget(a.codes, held.order_id)
            ciphertexts = [decode_codes(stale[0])[0], decode_codes(stale[1])[0]]
            for c in ciphertexts:  # at the head: the next sale would pop them first
                r.lpush(pool, c)
                r.hincrby(k.stats, "available", 1)
        assert any("two places" in p for p in await e.audit())
        server.kill()
        server.start()

        caplog.set_level(logging.WARNING, logger="dispatch.store")
        rest = None
        for _ in range(50):  # the first round may meet a connection the restart closed
            try:
                rest = await e.purchase("acme", "g", 7, "rest")
                break
            except errors.StoreUnavailableError:
                await asyncio.sleep(0.1)
        assert rest is not None and len(rest.codes) == 7
        assert not set(plain(rest)) & set(plain(sold))
        assert (await e.stock("g")).available == 0
        with pytest.raises(errors.OutOfStockError):
            await e.purchase("acme", "g", 1, "more")
        assert await e.audit() == []
        assert e.replication_stats() == (1, 0, {"g": 2})
        assert "SKU g: 2 codes held by orders taken out of its pools" in caplog.text
        assert not any(code in caplog.text for code in plain(sold))
        text = (await Metrics(e).render()).decode()
        assert 'dispatch_reconciled_codes_total{sku="g"} 2.0' in text
        assert "dispatch_redis_master_changes_total 1.0" in text


async def test_the_sweep_notices_a_change_of_master(redis_factory, tmp_path: os.PathLike[str]) -> None:
    server: RedisProcess = redis_factory(appendfsync="always")
    async with Engine(make_config(tmp_path, redis_url=server.tcp_url), sweep=False) as e:
        await open_shop(e)
        server.kill()
        server.start()
        await wait_for_async(e.sweep)
        assert e.replication_stats()[0] == 1


async def wait_for_async(step, tries: int = 100):  # type: ignore[no-untyped-def]
    for _ in range(tries):
        try:
            return await step()
        except errors.StoreUnavailableError:
            await asyncio.sleep(0.1)
    raise AssertionError("the store stayed unavailable")
