"""The store on a real Redis Cluster: routing by slot, redirects, scripts on every master."""

from __future__ import annotations

import redis
import pytest

from dispatch.config import Config
from dispatch.errors import ConfigError, StoreUnavailableError
from dispatch.store import Store
from dispatch.store import keys

pytestmark = pytest.mark.cluster


async def connect(url: str, tmp_path) -> Store:
    return await Store.connect(Config(redis_url=url, data_dir=str(tmp_path)))


async def test_a_cluster_url_gives_a_cluster_store(flushed_cluster_url: str, tmp_path) -> None:
    store = await connect(flushed_cluster_url, tmp_path)
    try:
        assert store.cluster
        await store.ready()
        # 60 puts on 60 SKU shards, one round: they land on every master, replies in order
        shards = [keys.SkuKeys(f"sku{i}").meta for i in range(60)]
        calls = [([k], ["create", "name", str(i)], ()) for i, k in enumerate(shards)]
        assert await store.run_many("put", calls) == [b"ok"] * 60
        assert await store.run_many("put", calls) == [b"exists"] * 60
        assert len({store.client.get_node_from_key(k).name for k in shards}) == 3
        for i, k in enumerate(shards):
            assert await store.client.hget(k, "name") == str(i).encode()
    finally:
        await store.close()


async def test_noscript_loads_the_script_on_that_master(flushed_cluster_url: str, redis_cluster, tmp_path) -> None:
    store = await connect(flushed_cluster_url, tmp_path)
    try:
        shards = [keys.SkuKeys(f"sku{i}").meta for i in range(30)]
        calls = [([k], ["create", "name", "x"], ()) for k in shards]
        await store.run_many("put", calls)
        for k in range(3):
            with redis_cluster.client(k) as c:
                c.script_flush()
        assert await store.run_many("put", calls) == [b"exists"] * 30
    finally:
        await store.close()


async def test_moved_and_ask_are_followed(flushed_cluster_url: str, redis_cluster, tmp_path) -> None:
    """A slot migrated under the store: ASK while its keys move, MOVED once it has."""
    store = await connect(flushed_cluster_url, tmp_path)
    key = keys.SkuKeys("wanderer").meta
    slot = store.client.keyslot(key)
    source = store.client.get_node_from_key(key)
    target = next(n for n in store.client.get_primaries() if n.name != source.name)
    src = redis.Redis(host=source.host, port=source.port)
    dst = redis.Redis(host=target.host, port=target.port)
    try:
        assert await store.run("put", [key], ["create", "name", "one"]) == b"ok"
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        # the key still on the source: served there; a new key of the slot: ASK, then the target
        assert await store.run("put", [key], ["update", "name", "two"]) == b"ok"
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", key)
        assert await store.run("put", [key], ["update", "name", "three"]) == b"ok"
        with dst.pipeline(transaction=False) as p:  # ASKING holds for the next command of its connection
            p.execute_command("ASKING")
            p.hget(key, "name")
            assert p.execute() == [True, b"three"]
        assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        for node in (src, dst):
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        # the client's slot map still says source: MOVED, followed
        assert store.client.get_node_from_key(key).name == source.name
        assert await store.run("put", [key], ["update", "name", "four"]) == b"ok"
        assert store.client.get_node_from_key(key).name == target.name
        assert dst.hget(key, "name") == b"four"
    finally:
        src.close()
        dst.close()
        await store.close()


async def test_urls_of_the_wrong_mode_are_refused(flushed_cluster_url: str, redis_cluster, flushed_redis_url: str,
                                                  tmp_path) -> None:
    one = flushed_redis_url.removeprefix("redis://").removesuffix("/0")
    with pytest.raises(ConfigError, match="not in cluster mode"):
        await connect(f"redis+cluster://{one}", tmp_path)
    with pytest.raises(ConfigError, match="is a Redis Cluster node"):
        await connect(f"redis://127.0.0.1:{redis_cluster.masters[0].port}/0", tmp_path)


async def test_unreachable_seeds_are_a_retryable_error(tmp_path) -> None:
    from tests.conftest import _free_cluster_port
    with pytest.raises(StoreUnavailableError) as e:
        await connect(f"redis+cluster://127.0.0.1:{_free_cluster_port()}", tmp_path)
    assert e.value.retryable


async def test_unassigned_slots_make_the_store_unready(flushed_cluster_url: str, redis_cluster, tmp_path) -> None:
    store = await connect(flushed_cluster_url, tmp_path)
    node = store.client.get_node_from_key("d:{g}:skus")
    slot = store.client.keyslot("d:{g}:skus")
    owner = redis.Redis(host=node.host, port=node.port)
    try:
        owner.execute_command("CLUSTER DELSLOTS", slot)
        with pytest.raises(StoreUnavailableError, match=r"16383 of 16384 slots assigned"):
            await store.ready()
    finally:
        owner.execute_command("CLUSTER ADDSLOTS", slot)
        owner.close()
        redis_cluster.wait_ok()
        await store.close()
    store = await connect(flushed_cluster_url, tmp_path)
    await store.ready()
    await store.close()
