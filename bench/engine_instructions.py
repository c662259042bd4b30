"""Instructions the engine's own process executes per order, counted by callgrind: what
redis_instructions.py is for Redis, for the Python side. The same code counts the same
within a few percent run after run (how the orders fall into script calls varies a
little; the lower of two runs is steadier still), whatever else the host does, where
its CPU time moves by a fifth: so it is what tells whether a change to the Python path
made its work per order smaller.

Each row runs in a child process under ``valgrind --tool=callgrind`` with
instrumentation off; the child starts its embedded Redis (not under valgrind), seeds
it, warms up with as many orders as it then measures, and switches instrumentation on
around the measured orders only (``callgrind_control -i on/off`` on itself). Rows:

  deliver, 1 SKU      Engine.purchase by 256 concurrent callers over 8 distributors,
                      one single-code order each at a time (compare.py's hot SKU)
  deliver, Zipf       the same over 100 SKUs drawn Zipf 1.1 (compare.py's)
  reserve + confirm   the same callers on one SKU, each order a reservation and its confirm
  HTTP layer          the daemon's protocol, router, auth and metrics alone, in memory: 64
                      connections each sent wrk's order request in turn, a stub engine
                      answering (per request; the steadiest of the rows)
  HTTP (daemon)       ``dispatch serve`` (one worker) under callgrind, driven by wrk
                      as bench/http/compare_http.py drives it: per 201 answered
                      (skipped without wrk)

Under valgrind the process runs some fifty times slower while Redis does not, so its
script calls carry more orders than in a timed run, and the counts are lower than a
timed run's CPU would suggest: compare them with each other. For the same reason the
catalogue's and the API keys' caches are kept for the whole count (STEADY_TTL_S). Instructions are not time:
a count leaves out the kernel's work (the sockets), which compare.py's CPU columns
include.

    apt-get install valgrind
    .venv/bin/python bench/engine_instructions.py      # about two minutes
"""

from __future__ import annotations

import asyncio
import gc
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "http"))

ORDERS = 4_000
CALLERS = 256
DISTS = 8
HTTP_SECONDS = 10
ZIPF_SKUS = 100
#: The catalogue's and the API keys' caches last the whole count: under valgrind a run
#: takes minutes, and a reload every second or few would be counted many times over.
STEADY_TTL_S = 3600.0


def _instrument(on: bool, pid: int) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)


async def _in_process(workload: str) -> int:
    """The child's work: seed, warm up, then ORDERS counted orders; returns them."""
    import compare
    import msgspec
    import numpy as np
    import redis

    from dispatch.engine import Engine, tune_gc
    from dispatch.store.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(os.path.join(d, "redis")) as server:
        redis.Redis.from_url(server.url).flushall()
        config = msgspec.structs.replace(compare.config(server.url, d, True), catalog_ttl_s=STEADY_TTL_S)
        skus = ZIPF_SKUS if workload == "zipf" else 1
        mode = "reserve" if workload == "reserve" else "deliver"
        picks = (np.random.default_rng(7).choice(skus, size=2 * ORDERS, p=compare.zipf_weights(skus, 1.1))
                 if skus > 1 else np.zeros(2 * ORDERS, int))
        async with Engine(config, sweep=False) as engine:
            await compare.seed(engine, skus, 2 * ORDERS + 100 if skus == 1 else int(2 * ORDERS * 0.3) + 50)
            tune_gc()

            async def orders(first: int) -> None:
                todo = iter(range(first, first + ORDERS))

                async def caller(c: int) -> None:
                    for i in todo:
                        order = await engine.purchase(f"d{c % DISTS}", f"s{picks[i]}", 1, f"r{i}", mode=mode)
                        if mode == "reserve":
                            await engine.confirm(f"d{c % DISTS}", order.order_id)

                await asyncio.gather(*(caller(c) for c in range(CALLERS)))

            await orders(0)  # warm: caches, the accounts' hashes past their small encoding
            gc.collect()  # else a full collection falls in the measured orders or not, by chance
            _instrument(True, os.getpid())
            await orders(ORDERS)
            _instrument(False, os.getpid())
            assert not await engine.audit()
    return ORDERS


async def _http_layer() -> int:
    """The child's work for the HTTP layer alone: the daemon's App (protocol, router, auth,
    metrics) on 64 in-memory connections, each sent wrk's order request in turn, answered
    by a stub engine (one turn of the loop, as a coalesced call takes, then a fixed order):
    no sockets, no Redis. Returns the requests counted."""
    from datetime import datetime, timezone

    from dispatch.config import Config
    from dispatch.models import Access, Code, Order
    from dispatch.server.app import App
    from dispatch.server.protocol import HttpProtocol

    at = datetime(2026, 1, 1, tzinfo=timezone.utc)

    class StubEngine:
        async def access(self, api_key: str) -> Access:
            return Access(distributor="d0")

        async def purchase(self, distributor: str, sku: str, qty: int, ref: str, **terms: object) -> Order:
            await asyncio.sleep(0)
            return Order(order_id="01JABCDEFGHJKMNPQRSTVWXYZ0", external_ref=ref, sku=sku, qty=qty, unit_price=100,
                         total=100, currency="CNY", status="delivered", codes=[Code("ABCD-EFGH-IJKL-MNOP")],
                         created_at=at, updated_at=at)

    answered: list[Any] = [0, None]  # answers a round still waits for, and the future told when none

    class Sink:  # the transport: takes the answer and tells the round
        def write(self, data: bytes) -> None:
            answered[0] -= 1
            if not answered[0]:
                answered[1].set_result(None)

        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...
        def close(self) -> None: ...

    def request(i: int) -> bytes:  # as bench/http/orders.lua sends it
        body = b'{"sku":"bench-1","qty":1,"external_ref":"wrk-6a1b2c3d-0-%d"}' % i
        return (b"POST /v1/orders HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer dk_qvEM05RPlfP87sT-oCa4GFJH2NZLZeynacqBstSIULk\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body))

    with tempfile.TemporaryDirectory() as d:
        app = App(Config(admin_token="a" * 32, data_dir=d, access_log=False), StubEngine())  # type: ignore[arg-type]
        sinks = [Sink() for _ in range(64)]
        conns = [HttpProtocol(app.limits, app.state, app.router) for _ in sinks]
        for conn, sink in zip(conns, sinks):
            conn.connection_made(sink)  # type: ignore[arg-type]

        async def rounds(requests: list[bytes]) -> None:  # a request on each connection, all answered, again
            loop = asyncio.get_running_loop()
            for r in range(0, len(requests), len(conns)):
                answered[:] = [len(conns), loop.create_future()]
                for conn, req in zip(conns, requests[r:r + len(conns)]):
                    conn.data_received(req)
                await answered[1]

        n = ORDERS - ORDERS % len(conns)
        await rounds([request(i) for i in range(1_280)])
        measured = [request(i) for i in range(1_280, 1_280 + n)]
        gc.collect()
        _instrument(True, os.getpid())
        await rounds(measured)
        _instrument(False, os.getpid())
    return n


def _counted(out_dir: str) -> int:
    subtotal = 0
    for f in glob.glob(os.path.join(out_dir, "cg.*")):
        with open(f) as fh:
            subtotal += sum(int(line.split()[1]) for line in fh if line.startswith("totals:"))
    return subtotal


def _valgrind(out_dir: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/cg.%p"]


def in_process_row(workload: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        got = subprocess.run([*_valgrind(out), sys.executable, __file__, "--child", workload], check=True,
                             capture_output=True, text=True)
        orders = json.loads(got.stdout.strip().splitlines()[-1])["orders"]
        return _counted(out) / orders


def http_row() -> float | None:
    """Instructions of the daemon per order answered 201, or None without wrk."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    import compare_http as ch

    from dispatch.store.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(os.path.join(tmp, "redis")) as server:
        api_key = asyncio.run(ch.seed(server.url, tmp, 200_000))
        port = ch.free_port()
        env = ch.server_env(server.url, tmp, port, catalog_ttl_s=str(STEADY_TTL_S), auth_cache_ttl_s="60")
        out = os.path.join(tmp, "cg")
        os.mkdir(out)
        log = os.path.join(tmp, "serve.log")
        proc = ch.start([*_valgrind(out), *ch.serve_cmd(port)], env, log)
        try:
            ch.wait_ready(proc, port, "/readyz", log, timeout=120)
            ch.wrk(wrk, port, api_key, 3, 64, 2)
            _instrument(True, proc.pid)
            text, _ = ch.wrk(wrk, port, api_key, HTTP_SECONDS, 64, 2)
            _instrument(False, proc.pid)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        finally:
            ch.stop(proc)
        delivered = ch.parse(text)[1].get(201, 0)
        if not delivered:
            raise RuntimeError(f"no order was answered 201:\n{text}")
        return _counted(out) / delivered


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        if sys.argv[2] == "http-layer":
            import uvloop
            print(json.dumps({"orders": uvloop.run(_http_layer())}))
        else:
            print(json.dumps({"orders": asyncio.run(_in_process(sys.argv[2]))}))
        return
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install valgrind")
    rows = {"deliver, 1 SKU": in_process_row("deliver"), "deliver, Zipf": in_process_row("zipf"),
            "reserve + confirm": in_process_row("reserve"), "HTTP layer": in_process_row("http-layer"),
            "HTTP (daemon)": http_row()}
    print("per order: instructions of the engine's process (callgrind; the kernel's work is not counted)")
    for label, n in rows.items():
        print(f"{label:18} {n:>10,.0f}" if n is not None else f"{label:18} {'(no wrk)':>10}")


if __name__ == "__main__":
    main()
