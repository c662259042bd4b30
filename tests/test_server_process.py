"""``dispatch serve`` as a real process: graceful SIGTERM with requests in flight,
``--workers 2`` on the embedded store, and what its logs never contain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dispatch.engine import Engine
from dispatch.errors import NotFoundError

from .conftest import _free_port, codes_text, make_config
from .httpkit import ADMIN, Conn, Response


class Daemon:
    """``python -m dispatch serve`` on a free port, its output in files."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str) -> None:
        self.port = _free_port()
        self.out, self.err = tmp / "serve.out", tmp / "serve.err"
        full_env = {**os.environ, "DISPATCH_ADMIN_TOKEN": ADMIN, **env}
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "dispatch", "serve", "--port", str(self.port), *args],
                                         env=full_env, stdout=out, stderr=err, cwd=tmp)

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                if (await self.request("GET", "/healthz")).status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"the daemon did not come up:\n{self.logs()}")

    async def request(self, method: str, path: str, **kw: Any) -> Response:
        return await Conn.once(self.port, method, path, **kw)

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> str:
        return self.err.read_text() + self.out.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def test_sigterm_finishes_requests_in_flight(flushed_redis_url: str, tmp_path: Path) -> None:
    config = make_config(tmp_path, redis_url=flushed_redis_url)
    async with Engine(config, sweep=False) as engine:
        await engine.create_sku("g100", "Game card 100", 10000, "CNY", 9500)
        await engine.create_supplier("sup", "Supplier")
        await engine.import_codes(codes_text("SIG", 7000), sku="g100", supplier="sup", unit_cost=9000)  # > 16 x 200 x 2
        key = (await engine.create_distributor("acme", "Acme")).api_key
        await engine.topup("acme", 10**9, "seed")

    daemon = Daemon(tmp_path, {"DISPATCH_REDIS_URL": flushed_redis_url, "DISPATCH_MASTER_KEY": config.master_key or "",
                               "DISPATCH_DATA_DIR": str(tmp_path / "d")})
    try:
        await daemon.ready()
        answered: list[tuple[str, Response]] = []
        unanswered: list[str] = []
        started = asyncio.Event()

        async def client(i: int) -> None:
            try:
                conn = await Conn.open(daemon.port)
            except OSError:
                return
            for j in range(200):
                ref = f"c{i}-{j}"
                try:
                    r = await conn.request("POST", "/v1/orders", json={"sku": "g100", "qty": 2, "external_ref": ref},
                                           token=key)
                except (OSError, AssertionError, asyncio.TimeoutError):
                    unanswered.append(ref)
                    return
                answered.append((ref, r))
                if len(answered) >= 100:
                    started.set()
                if r.headers.get("connection") == "close":
                    return

        clients = [asyncio.create_task(client(i)) for i in range(16)]
        await asyncio.wait_for(started.wait(), 30)
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert daemon.proc.wait(30) == 0, daemon.logs()
    finally:
        daemon.kill()

    assert {r.status for _, r in answered} == {201}, {r.status for _, r in answered}
    assert len(answered) < 16 * 200, "the load ended before the shutdown"
    async with Engine(config, sweep=False) as engine:
        for ref, r in answered:
            order = await engine.get_order_by_ref("acme", ref)
            assert order.order_id == r.json()["order_id"] and order.status == "delivered"
            assert [c.code for c in order.codes] == [c["code"] for c in r.json()["codes"]]
        completed_unanswered = 0
        for ref in unanswered:  # never half done: complete, or not there at all
            try:
                order = await engine.get_order_by_ref("acme", ref)
            except NotFoundError:
                continue
            assert order.status == "delivered", (ref, order.status)
            completed_unanswered += 1
        assert await engine.audit() == []
        assert (await engine.stock("g100")).sold == 2 * (len(answered) + completed_unanswered)
    # requests in flight at the signal were answered, with the connection closed after them
    assert sum(r.headers.get("connection") == "close" for _, r in answered) >= 1
    logs = daemon.logs()
    assert "shutting down" in logs and "stopped" in logs


async def test_two_workers_on_the_embedded_store(tmp_path: Path) -> None:
    data = tmp_path / "d"
    daemon = Daemon(tmp_path, {"DISPATCH_DATA_DIR": str(data)}, "--workers", "2")
    codes: list[str] = []
    try:
        await daemon.ready()
        deadline = time.monotonic() + 30  # both workers listening, not only the first one up
        while daemon.logs().count("(worker ") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        a = {"token": ADMIN}
        assert (await daemon.request("POST", "/admin/skus", json={"sku": "g100", "name": "G", "face_value": 100,
                                                                  "currency": "CNY", "price": 90}, **a)).status == 201
        assert (await daemon.request("POST", "/admin/suppliers", json={"supplier": "sup", "name": "S"}, **a)).status == 201
        r = await daemon.request("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=80", body=codes_text("WRK", 100),
                                 headers={"Content-Type": "text/plain"}, **a)
        assert r.status == 201 and r.json()["accepted"] == 100
        r = await daemon.request("POST", "/admin/distributors", json={"distributor": "acme", "name": "Acme"}, **a)
        key = r.json()["api_key"]
        assert (await daemon.request("POST", "/admin/distributors/acme/topup", json={"amount": 10**6,
                                                                                     "reference": "w"}, **a)).status == 200
        for i in range(40):  # a connection each: the kernel spreads them over both workers
            r = await daemon.request("POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": f"o{i}"},
                                     token=key)
            assert r.status == 201, r
            codes += [c["code"] for c in r.json()["codes"]]
        assert len(set(codes)) == 40
        assert (await daemon.request("GET", "/admin/skus/g100/stock", **a)).json()["sold"] == 40
        assert (await daemon.request("GET", "/readyz")).status == 200
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.kill()

    lines = [json.loads(x) for x in daemon.out.read_text().splitlines()]  # every line is JSON
    access = [x for x in lines if x["logger"] == "dispatch.access"]
    assert {x["worker"] for x in access if x["route"] == "/v1/orders"} == {0, 1}
    assert all(set(x) == {"ts", "level", "logger", "pid", "method", "route", "status", "ms", "distributor", "admin",
                          "worker"} for x in access)
    assert all(set(x) >= {"ts", "level", "logger", "pid", "msg"} for x in lines if x not in access)
    assert any("with 2 workers" in x.get("msg", "") for x in lines)
    assert daemon.err.read_text() == ""
    everything = daemon.logs()
    assert "with 2 workers" in everything
    for secret in [key, ADMIN, *codes]:
        assert secret not in everything
    assert not (data / "redis.sock").exists()  # the supervisor stopped the embedded Redis


def test_serve_fails_cleanly_when_the_port_is_taken(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dispatch", "serve", "--port", str(port)], cwd=tmp_path,
                              env={**os.environ, "DISPATCH_DATA_DIR": str(tmp_path / "d")}, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DISPATCH_"):
            monkeypatch.delenv(name)


async def test_a_retry_after_a_crash_finds_its_order_and_stock_stays_true(flushed_redis_url: str,
                                                                          tmp_path: Path) -> None:
    """kill -9 of the daemon mid-load, with thin stock: after a restart every buyer re-sends
    the orders it had no answer for; each completes as its own order (or is refused for its
    own reason), and no buyer is told out_of_stock while a code is on sale."""
    stock = 300
    config = make_config(tmp_path, redis_url=flushed_redis_url)
    async with Engine(config, sweep=False) as engine:
        await engine.create_sku("g100", "Game card 100", 10000, "CNY", 9500)
        await engine.create_supplier("sup", "Supplier")
        await engine.import_codes(codes_text("KILL", stock), sku="g100", supplier="sup", unit_cost=9000)
        key = (await engine.create_distributor("acme", "Acme")).api_key
        await engine.topup("acme", 10**9, "seed")
    env = {"DISPATCH_REDIS_URL": flushed_redis_url, "DISPATCH_MASTER_KEY": config.master_key or "",
           "DISPATCH_DATA_DIR": str(tmp_path / "d")}
    refs = [f"k{i}" for i in range(stock + 100)]  # more orders than codes
    answers: dict[str, Response] = {}

    async def buy(port: int, todo: list[str]) -> None:
        try:
            conn = await Conn.open(port)
            while todo:
                ref = todo[0]
                answers[ref] = await conn.request("POST", "/v1/orders", token=key,
                                                  json={"sku": "g100", "qty": 1, "external_ref": ref})
                todo.pop(0)
        except (OSError, AssertionError, asyncio.TimeoutError):
            return  # the daemon died under it: the ref stays to do

    queues = [refs[i::8] for i in range(8)]
    daemon = Daemon(tmp_path, env)
    try:
        await daemon.ready()
        clients = [asyncio.create_task(buy(daemon.port, q)) for q in queues]
        while len(answers) < stock // 3:
            await asyncio.sleep(0.002)
        daemon.proc.kill()  # SIGKILL mid-load
        daemon.proc.wait()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        daemon.kill()
    cut = sum(len(q) for q in queues)
    assert 0 < cut < len(refs), "the crash did not land mid-load"

    (tmp_path / "again").mkdir()
    daemon = Daemon(tmp_path / "again", env)
    try:
        await daemon.ready()
        await asyncio.wait_for(asyncio.gather(*(buy(daemon.port, q) for q in queues)), 120)
    finally:
        daemon.kill()

    assert set(answers) == set(refs)
    delivered = {ref: r for ref, r in answers.items() if r.status in (200, 201)}
    sold_out = [ref for ref, r in answers.items() if r.status == 409]
    assert {r.status for r in answers.values()} <= {200, 201, 409}
    assert all(answers[ref].json()["error"]["code"] == "out_of_stock" for ref in sold_out)
    assert len(delivered) == stock and len(sold_out) == len(refs) - stock  # nothing sold out early
    async with Engine(config, sweep=False) as engine:
        for ref, r in delivered.items():
            order = await engine.get_order_by_ref("acme", ref)
            assert order.order_id == r.json()["order_id"]
        assert (await engine.stock("g100")).sold == stock
        assert await engine.audit() == []
