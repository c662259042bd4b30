"""A failover under load on a real Redis Cluster: three masters with a replica each
(``cluster-node-timeout`` 1 s); many buyers purchase, delivered and reserved (then
confirmed or cancelled); the master holding the hot SKU's shard is killed with SIGKILL
mid-load; the cluster promotes its replica; the killed node is restarted (it rejoins as
the new master's replica, so ``min_replicas_acked = 1`` can be met again) and buying
goes on, through retryable store_unavailable answers while the masters change.

With ``min_replicas_acked = 1``: no code delivered twice, none lost, every balance equal
to its ledger, every acknowledged order readable with the codes its buyer got. With 0
the same run prints what it lost (a figure, not an assertion: it depends on timing).

The default run is short; ``DISPATCH_FAILOVER_FULL=1`` runs more buyers and orders.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random

import pytest

from dispatch import errors
from dispatch.engine import Engine
from dispatch.models import Order
from dispatch.store import keys

from .conftest import RedisClusterProcesses, make_config
from .replicated import replicated_cluster  # noqa: F401
from .test_cluster_migration import until_resolved
from .test_concurrency import DISTS, SKUS, STOCK, Ledger, check_invariants, setup_shop

FULL = os.environ.get("DISPATCH_FAILOVER_FULL") == "1"
BUYERS = 64 if FULL else 24
ORDERS = 30 if FULL else 10  # per buyer
HOT = "s1"

pytestmark = [pytest.mark.failover, pytest.mark.cluster]


async def run(cluster: RedisClusterProcesses, tmp_path: os.PathLike[str], acked: int) -> tuple[Engine, Ledger, float]:
    """The shop of test_concurrency on *cluster*, BUYERS buyers of ORDERS orders each, and
    the master of the hot SKU's shard killed once a third of the orders are answered.
    The engine (started), what buyers saw, seconds from the kill to the promotion."""
    cfg = make_config(tmp_path, redis_url=cluster.url, min_replicas_acked=acked, replica_ack_timeout_ms=500,
                      redis_timeout_s=2.0)
    engine = Engine(cfg, sweep=False)
    await engine.start()
    await setup_shop(engine)
    await asyncio.to_thread(cluster.wait_ok)  # the setup is on the replicas too
    port = engine.store.client.get_node_from_key(keys.sku_tag(HOT)).port
    victim = next(k for k, m in enumerate(cluster.masters) if m.port == port)
    seen = Ledger()
    done = 0

    async def buyer(b: int) -> None:
        nonlocal done
        rng = random.Random(b)
        for i in range(ORDERS):
            dist = rng.choice(list(DISTS))
            sku = HOT if rng.random() < 0.6 else rng.choice(list(SKUS))
            ref, mode = f"b{b}-{i}", "reserve" if rng.random() < 0.3 else "deliver"
            result, errs = await until_resolved(engine.purchase, dist, sku, rng.randint(1, 2), ref, mode=mode)
            for r in (*errs, result):
                seen.saw(dist, ref, r)
            if isinstance(result, Order) and result.status == "reserved":
                action = engine.confirm if rng.random() < 0.7 else engine.cancel
                ended, errs = await until_resolved(action, dist, result.order_id)
                for r in (*errs, ended):
                    seen.saw(dist, ref, r)
            done += 1

    async def kill_mid_load() -> float:
        while done < BUYERS * ORDERS // 3:
            await asyncio.sleep(0.01)
        return await asyncio.to_thread(cluster.fail_over, victim)

    promoted, *_ = await asyncio.gather(kill_mid_load(), *(buyer(b) for b in range(BUYERS)))
    for _ in range(2):  # sagas a failed round left half done (their buyers retried most)
        await engine.sweep(grace_s=0)
    return engine, seen, promoted


def told(seen: Ledger) -> dict[tuple[str, str], Order]:
    """The last order each ref was answered with, for refs that were answered one."""
    out = {}
    for key, results in seen.outcomes.items():
        orders = [r for r in results if isinstance(r, Order)]
        if orders:
            out[key] = orders[-1]
    return out


async def losses(engine: Engine, seen: Ledger) -> dict[str, int]:
    """What the store lost of what buyers were told: acknowledged orders no longer
    readable or with other codes, codes told to two buyers, codes the stock counters lost
    track of, and what the audit finds."""
    acked = told(seen)
    unreadable = 0
    for (dist, _), order in acked.items():
        try:
            now = await engine.get_order(dist, order.order_id)
        except errors.NotFoundError:
            unreadable += 1
            continue
        if order.status == "delivered" and now.codes != order.codes:
            unreadable += 1
    codes = collections.Counter(c.code for o in acked.values() if o.status == "delivered" for c in o.codes)
    off = 0
    for sku in SKUS:
        st = await engine.stock(sku)
        off += abs(STOCK[sku] - (st.available + st.reserved + st.sold + st.voided + st.invalidated))
    return {"acknowledged orders": len(acked), "unreadable or changed": unreadable,
            "codes told to two buyers": sum(n - 1 for n in codes.values() if n > 1),
            "codes the counters lost track of": off, "audit problems": len(await engine.audit())}


def retried(seen: Ledger) -> int:
    return seen.errors["store_unavailable"]


async def test_a_cluster_failover_under_load_loses_nothing_acknowledged(
        replicated_cluster: RedisClusterProcesses, tmp_path: os.PathLike[str]) -> None:
    engine, seen, promoted = await run(replicated_cluster, tmp_path, acked=1)
    try:
        assert len(seen.outcomes) == BUYERS * ORDERS  # buying went on after the failover
        assert retried(seen) > 0  # the kill was felt
        assert engine.replication_stats()[0] >= 1  # the promoted replica was noticed (and reconciled)
        # no ref left unresolved; every answer an order or a refusal the shop can give
        assert not any(isinstance(rs[-1], errors.StoreUnavailableError) for rs in seen.outcomes.values())
        # every acknowledged order readable, with the codes its buyer was told
        acked = told(seen)
        for (dist, ref), order in acked.items():
            now = await engine.get_order(dist, order.order_id)
            assert now.external_ref == ref
            if order.status == "delivered":
                assert now.codes == order.codes
        codes = [c.code for o in acked.values() if o.status == "delivered" for c in o.codes]
        assert len(codes) == len(set(codes))  # no code delivered twice
        # balances = ledgers, counters = pools and records, no code lost (conservation), audit clean
        await check_invariants(engine, seen)
        print(f"\nmin_replicas_acked=1 on a cluster: {len(acked)} orders, promoted {promoted:.1f} s after the kill, "
              f"{retried(seen)} store_unavailable answers retried, {await losses(engine, seen)}")
    finally:
        await engine.close()


async def test_a_cluster_failover_under_load_without_replicas_acked(
        replicated_cluster: RedisClusterProcesses, tmp_path: os.PathLike[str]) -> None:
    """The same run with min_replicas_acked = 0: what it loses is printed, not asserted."""
    engine, seen, promoted = await run(replicated_cluster, tmp_path, acked=0)
    try:
        print(f"\nmin_replicas_acked=0 on a cluster: {len(told(seen))} orders, promoted {promoted:.1f} s after "
              f"the kill, {retried(seen)} store_unavailable answers retried, lost: {await losses(engine, seen)}")
    finally:
        await engine.close()
