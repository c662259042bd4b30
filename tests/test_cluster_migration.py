"""Slots migrated between masters while hundreds of purchases run (a real Redis Cluster).

The slot of a hot SKU's shard and the slot of an account are moved to other masters,
key by key (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE), and back,
under load. Meanwhile a client may only see retryable errors (store_unavailable), and
a retry with the same external_ref resolves its order; afterwards every invariant
holds: the audit is clean, no code is delivered twice or lost, balances equal ledgers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest
import redis

from dispatch import errors
from dispatch.engine import Engine
from dispatch.models import Order
from dispatch.store import keys

from .conftest import RedisClusterProcesses, codes_text, make_config
from .test_concurrency import DISTS, SKUS, Ledger, check_invariants, setup_shop

pytestmark = pytest.mark.cluster

RETRYABLE = (errors.StoreUnavailableError,)


def _node(cluster: RedisClusterProcesses, port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port)


def migrate(cluster: RedisClusterProcesses, slot: int, src_port: int, dst_port: int,
            half_moved: Callable[[], None] = lambda: None) -> int:
    """Move *slot* from one master to another as redis-cli --cluster reshard does, a few
    keys at a time with pauses (so that load runs while the slot is half moved), calling
    *half_moved* after the first few: the keys moved."""
    src, dst = _node(cluster, src_port), _node(cluster, dst_port)
    moved = 0
    try:
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while batch := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 3):
            src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *batch)
            if not moved:
                half_moved()
            moved += len(batch)
            time.sleep(0.03)
        for node in (dst, src):  # the target first: it must own the slot before the source lets go
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        for m in cluster.masters:
            if m.port not in (src_port, dst_port):
                with _node(cluster, m.port) as other:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    finally:
        src.close()
        dst.close()
    return moved


async def until_resolved(call, *args, **kw):  # type: ignore[no-untyped-def]
    """*call* again with the same arguments while it answers a retryable error: the
    answer, and the retryable errors seen on the way."""
    seen = []
    while True:
        try:
            return await call(*args, **kw), seen
        except RETRYABLE as e:
            seen.append(e)
            await asyncio.sleep(0.02)
        except errors.DispatchError as e:
            return e, seen


@pytest.mark.timeout(300)
async def test_slots_migrated_under_load_keep_every_invariant(flushed_cluster_url: str, redis_cluster,
                                                              tmp_path) -> None:
    engine = Engine(make_config(tmp_path, redis_url=flushed_cluster_url, sweep_interval_s=0.2), sweep=True)
    async with engine:
        await setup_shop(engine)
        client = engine.store.client
        hot, dist = "s1", "d1"
        moves = []  # (slot, from port, to port)
        for tag in (keys.sku_tag(hot), keys.acct_tag(dist)):
            owner = client.get_node_from_key(tag)
            target = next(n for n in client.get_primaries() if n.port != owner.port)
            moves.append((client.keyslot(tag), owner.port, target.port))
        assert moves[0][0] != moves[1][0]

        seen = Ledger()
        stop = asyncio.Event()
        retried = 0
        done_while_moving = 0
        moving = False

        async def shopper(n: int, rng: random.Random) -> None:
            nonlocal retried, done_while_moving
            i = 0
            while not stop.is_set():
                d = dist if rng.random() < 0.5 else rng.choice(list(DISTS))
                sku = hot if rng.random() < 0.6 else rng.choice(list(SKUS))
                ref, mode = f"m{n}-{i}", "reserve" if rng.random() < 0.25 else "deliver"
                result, errs = await until_resolved(engine.purchase, d, sku, rng.randint(1, 2), ref, mode=mode)
                retried += len(errs)
                for e in errs:
                    seen.saw(d, ref, e)
                seen.saw(d, ref, result)
                if isinstance(result, Order) and result.status == "reserved":
                    confirmed, errs = await until_resolved(engine.confirm, d, result.order_id)
                    retried += len(errs)
                    seen.saw(d, ref, confirmed)
                if moving and isinstance(result, Order):
                    done_while_moving += 1
                i += 1

        def some_orders_made() -> None:
            """Holds a slot half moved until orders were made meanwhile (however busy the
            host is), or a minute passed (then the assertion below fails)."""
            start, deadline = done_while_moving, time.monotonic() + 60
            while done_while_moving < start + 5 and time.monotonic() < deadline:
                time.sleep(0.01)

        shoppers = [asyncio.create_task(shopper(n, random.Random(n))) for n in range(200)]
        try:
            await asyncio.sleep(0.5)
            moving = True
            for slot, src, dst in moves:  # there, then back
                assert await asyncio.to_thread(migrate, redis_cluster, slot, src, dst, some_orders_made) > 0
            assert client.get_node_from_key(keys.sku_tag(hot)).port in (moves[0][1], moves[0][2])
            for slot, src, dst in moves:
                assert await asyncio.to_thread(migrate, redis_cluster, slot, dst, src, some_orders_made) > 0
            moving = False
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*shoppers)
            redis_cluster.wait_ok()

        assert done_while_moving > 0, "no order was made while the slots moved"
        kinds = {type(r) for rs in seen.outcomes.values() for r in rs if isinstance(r, errors.DispatchError)}
        assert kinds <= {errors.StoreUnavailableError, errors.OutOfStockError, errors.InsufficientBalanceError}, kinds
        # every ref resolved: its last answer is an order or a refusal, never a retryable error
        assert not any(isinstance(rs[-1], RETRYABLE) for rs in seen.outcomes.values())
        for _ in range(2):
            await engine.sweep(grace_s=0)
        await check_invariants(engine, seen)
        print(f"{len(seen.outcomes)} orders, {done_while_moving} made while slots moved, "
              f"{retried} retryable errors retried")


async def test_a_script_refuses_while_the_slot_of_its_keys_is_moving(flushed_cluster_url: str, redis_cluster,
                                                                       tmp_path) -> None:
    """A script touches keys it does not declare (a batch's pool); in a slot half moved
    one may be on the other master already, where Redis fails the script after what it
    wrote. Here a SKU's second pool has moved ahead of the rest of its slot, and every
    key a one-step purchase checks is still home: an order that needs both pools is
    refused as retryable with nothing taken, and goes through once the slot has moved."""
    engine = Engine(make_config(tmp_path, redis_url=flushed_cluster_url), sweep=False)
    async with engine:
        client = engine.store.client
        sku = "moving"
        home = client.get_node_from_key(keys.sku_tag(sku))
        buyer = next(d for d in (f"b{i}" for i in range(1000)) if client.get_node_from_key(keys.acct_tag(d)) == home)
        await engine.create_supplier("sup", "Supplier")
        await engine.create_sku(sku, "Moving", 100, "CNY", 100)
        await engine.create_distributor(buyer, buyer)
        await engine.topup(buyer, 10_000, "seed")
        await engine.import_codes(codes_text("ONE", 4), sku=sku, supplier="sup", unit_cost=50, batch_id="b1")
        await engine.import_codes(codes_text("TWO", 2), sku=sku, supplier="sup", unit_cost=50, batch_id="b2")
        await engine.purchase(buyer, sku, 1, "sold")  # the SKU's sales counters exist,
        held = await engine.purchase(buyer, sku, 1, "held", mode="reserve")  # and its reserved codes
        pools = [keys.SkuKeys(sku).pool_prefix + s.decode() for s in await client.zrange(keys.SkuKeys(sku).queue, 0, -1)]
        assert len(pools) == 2
        slot = client.keyslot(keys.sku_tag(sku))
        target = next(m for m in redis_cluster.masters if m.port != home.port)
        with _node(redis_cluster, home.port) as src, _node(redis_cluster, target.port) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER MYID"))
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER MYID"))
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", pools[1])
            with pytest.raises(errors.StoreUnavailableError):
                await engine.purchase(buyer, sku, 3, "across")  # the first pool's 2 codes, then the second's
            asking = dst.pipeline(transaction=False)
            asking.execute_command("ASKING")
            asking.llen(pools[1])
            assert src.llen(pools[0]) == 2 and asking.execute()[1] == 2  # nothing taken
        assert await asyncio.to_thread(migrate, redis_cluster, slot, home.port, target.port) > 0
        order, _ = await until_resolved(engine.purchase, buyer, sku, 3, "across")
        assert isinstance(order, Order) and sorted(c.code[:3] for c in order.codes) == ["ONE", "ONE", "TWO"]
        await until_resolved(engine.confirm, buyer, held.order_id)
        stock = await engine.stock(sku)
        assert (stock.accepted, stock.available, stock.sold) == (6, 1, 5)
        assert await engine.audit() == []
        assert await asyncio.to_thread(migrate, redis_cluster, slot, target.port, home.port) > 0  # as it was
