"""pytest-benchmark groups on the embedded Redis (appendfsync always):

    .venv/bin/python -m pytest bench -q --benchmark-only

Each round of a purchase benchmark is ORDERS orders by 256 concurrent callers
(``extra_info`` gives orders/s and the CPU per order of this process and of Redis,
averaged over the rounds); bench/compare.py prints the same work beside the
straightforward implementation.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402

from dispatch.store.embedded import EmbeddedRedis  # noqa: E402

ORDERS = 10_000
ROUNDS = 5


@pytest.fixture(scope="module")
def loop():
    import uvloop
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as s:
        yield s


def _engine(loop, server, tmp_path, skus: int, per_sku: int):
    import redis
    redis.Redis.from_url(server.url).flushall()
    engine = compare.Engine(compare.config(server.url, str(tmp_path), True), sweep=False)
    loop.run_until_complete(engine.start())
    loop.run_until_complete(compare.seed(engine, skus, per_sku))
    return engine


@pytest.mark.benchmark(group="import")
def test_import_100k_codes(benchmark, loop, server, tmp_path):
    engine = _engine(loop, server, tmp_path, 1, 0)
    n = itertools.count()

    def one() -> None:
        i = next(n)
        body = compare.codes(f"B{i}X", 100_000)
        report = loop.run_until_complete(engine.import_codes(body, sku="s0", supplier="sup", unit_cost=1))
        assert report.accepted == 100_000

    benchmark.pedantic(one, rounds=3, iterations=1)
    benchmark.extra_info["codes_per_s"] = 100_000 / benchmark.stats.stats.mean
    loop.run_until_complete(engine.close())


@pytest.mark.parametrize("label, skus, zipf_s, mode", [
    ("purchase-1-sku", 1, None, "deliver"),
    ("purchase-100-skus-zipf", 100, 1.1, "deliver"),
    ("reserve-confirm", 1, None, "reserve"),
])
def test_orders(benchmark, loop, server, tmp_path, label, skus, zipf_s, mode):
    benchmark.group = label
    per_sku = (ORDERS * (ROUNDS + 1)) if skus == 1 else int(ORDERS * (ROUNDS + 1) * 0.3) + 50
    engine = _engine(loop, server, tmp_path, skus, per_sku)

    rows = []

    def one() -> None:
        row = compare.closed_loop(engine, ORDERS, skus, zipf_s, mode, server.url, server.pid)
        rows.append(loop.run_until_complete(row))

    benchmark.pedantic(one, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["orders_per_s"] = ORDERS / benchmark.stats.stats.mean
    benchmark.extra_info["python_us_per_order"] = sum(r.py_us for r in rows) / len(rows)
    benchmark.extra_info["redis_us_per_order"] = sum(r.redis_us for r in rows) / len(rows)
    assert loop.run_until_complete(engine.audit()) == []
    loop.run_until_complete(engine.close())
