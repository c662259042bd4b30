"""The cluster fixture forms a real Redis Cluster: three masters, every slot served."""

from __future__ import annotations

from redis.cluster import RedisCluster

import pytest

pytestmark = pytest.mark.cluster


def test_three_masters_share_every_slot(redis_cluster) -> None:
    owners = set()
    for k in range(3):
        with redis_cluster.client(k) as c:
            assert c.execute_command("CLUSTER INFO")["cluster_state"] == "ok"
            assert c.config_get("appendfsync") == {"appendfsync": "always"}
            owners |= {int(primary[1]) for _, _, primary, *_ in c.execute_command("CLUSTER SLOTS")}
    assert owners == {m.port for m in redis_cluster.masters}
    with RedisCluster(host="127.0.0.1", port=redis_cluster.masters[0].port) as rc:
        for k in range(50):
            rc.set(f"probe:{k}", k)
        assert sum(int(rc.get(f"probe:{k}")) for k in range(50)) == sum(range(50))
        assert len({rc.get_node_from_key(f"probe:{k}").port for k in range(50)}) == 3
    redis_cluster.flushall()
    for k in range(3):
        with redis_cluster.client(k) as c:
            assert c.dbsize() == 0
