"""Real daemons on a real Redis Cluster: ``dispatch serve --workers 2`` with a
``redis+cluster://`` URL, ``dispatch loadtest`` against it (a short run, its own
verification), and two daemons sharing one cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatch.engine import Engine

from .conftest import codes_text, make_config
from .httpkit import ADMIN
from .test_server_process import Daemon

pytestmark = pytest.mark.cluster

A = {"token": ADMIN}


def daemon_on(cluster_url: str, tmp: Path, master_key: str, *args: str) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    return Daemon(tmp, {"DISPATCH_REDIS_URL": cluster_url, "DISPATCH_MASTER_KEY": master_key,
                        "DISPATCH_DATA_DIR": str(tmp / "d"), "DISPATCH_SWEEP_INTERVAL_S": "0.5"}, *args)


async def both_workers(daemon: Daemon) -> None:
    await daemon.ready()
    deadline = time.monotonic() + 30
    while daemon.logs().count("(worker ") < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_loadtest_passes_against_two_workers_on_a_cluster(flushed_cluster_url: str, tmp_path: Path) -> None:
    key = make_config(tmp_path).master_key or ""
    daemon = daemon_on(flushed_cluster_url, tmp_path / "serve", key, "--workers", "2")
    try:
        await both_workers(daemon)
        assert (await daemon.request("GET", "/readyz")).status == 200
        report = tmp_path / "report.json"
        run = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "dispatch", "loadtest", "--preset", "steady", "--url",
                             f"http://127.0.0.1:{daemon.port}", "--admin-token", ADMIN, "--duration", "3",
                             "--rate-scale", "0.3", "--quiet", "--json", str(report)],
            capture_output=True, text=True, timeout=200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "verification PASSED" in run.stdout
        verdict = json.loads(report.read_text())
        assert verdict["verification"]["passed"]
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.kill()
    lines = [x for x in map(json.loads, daemon.out.read_text().splitlines()) if "route" in x]  # the access log's
    assert {x["worker"] for x in lines if x["route"] == "/v1/orders"} == {0, 1}
    assert not any(x["status"] >= 500 for x in lines), [x for x in lines if x["status"] >= 500][:5]


@pytest.mark.timeout(240)
async def test_two_daemons_on_one_cluster_sell_each_code_once(flushed_cluster_url: str, tmp_path: Path) -> None:
    config = make_config(tmp_path, redis_url=flushed_cluster_url)
    async with Engine(config, sweep=False) as engine:
        await engine.create_sku("g100", "Game card 100", 10000, "CNY", 9500, buckets=3)
        await engine.create_supplier("sup", "Supplier")
        await engine.import_codes(codes_text("TWO", 300), sku="g100", supplier="sup", unit_cost=9000)
        api_key = (await engine.create_distributor("acme", "Acme")).api_key
        await engine.topup("acme", 10**9, "seed")
    daemons = [daemon_on(flushed_cluster_url, tmp_path / f"serve{n}", config.master_key or "") for n in range(2)]
    try:
        for d in daemons:
            await d.ready()

        async def buy(i: int) -> tuple[int, list[str]]:
            d = daemons[i % 2]
            r = await d.request("POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": f"o{i}"},
                                token=api_key)
            if i % 7 == 0:  # the same order again, through the other daemon
                again = await daemons[(i + 1) % 2].request(
                    "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": f"o{i}"}, token=api_key)
                assert again.status in (200, 409) and (again.status == 409) == (r.status == 409), (r, again)
                if r.status == 201:
                    assert again.json()["codes"] == r.json()["codes"]
            return r.status, [c["code"] for c in r.json().get("codes", [])]

        results = await asyncio.gather(*(buy(i) for i in range(320)))
        statuses = [s for s, _ in results]
        assert statuses.count(201) == 300 and statuses.count(409) == 20  # 409: out_of_stock
        codes = [c for _, cs in results for c in cs]
        assert len(codes) == len(set(codes)) == 300
        for d in daemons:
            stock = (await d.request("GET", "/admin/skus/g100/stock", **A)).json()
            assert (stock["sold"], stock["available"]) == (300, 0)
            assert d.stop() == 0, d.logs()
    finally:
        for d in daemons:
            d.kill()
    async with Engine(config, sweep=False) as engine:
        assert await engine.audit() == []
        for d in daemons:
            assert not any(c in d.logs() for c in codes[:50])  # codes are never logged
