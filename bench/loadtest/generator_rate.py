"""How fast is the load generator alone? The loadtest driver (schedule, pool, parsing,
order decoding, HDR recording, replays) pinned to one core, against a trivial local
HTTP responder pinned to the other (a raw asyncio Protocol: no parsing, one canned
201 order per request).

    .venv/bin/python bench/loadtest/generator_rate.py [--rate 60000] [--seconds 5] [--connections 64]

Reports answered requests/s, the generator's CPU use, and its schedule lag (how late
requests went out): the generator keeps up when lag stays small at the offered rate.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import time

import uvloop

from dispatch.loadtest.client import Pool
from dispatch.loadtest.run import Driver
from dispatch.loadtest.scenario import Phase, Scenario, SkuSpec
from dispatch.loadtest.target import Seeded, SeededSku

BODY = (b'{"order_id":"01JBENCH","external_ref":"r1","sku":"s","qty":1,"unit_price":100,"total":100,'
        b'"currency":"CNY","status":"delivered","codes":[{"code":"BENCH-CODE-0001"}],'
        b'"created_at":"2026-11-21T00:00:00Z","updated_at":"2026-11-21T00:00:00Z"}')
ANSWER = (b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY


class Responder(asyncio.Protocol):
    """Answers every request with ANSWER, without parsing: the requests (the driver's
    POSTs, JSON bodies) hold no blank line but the one ending their head, so each
    b"\\r\\n\\r\\n" is one request; the last 3 bytes carry over in case one is split
    between reads. Cheap enough that the generator, not the responder, is the limit."""

    def connection_made(self, t):  # type: ignore[no-untyped-def]
        self.t, self.tail = t, b""

    def data_received(self, data):  # type: ignore[no-untyped-def]
        if self.tail:
            data = self.tail + data
        n = data.count(b"\r\n\r\n")
        self.tail = data[-3:]
        if n:
            self.t.write(ANSWER * n)


def serve(sock: socket.socket, core: int) -> None:
    os.sched_setaffinity(0, {core})

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Responder, sock=sock)
        await server.serve_forever()

    uvloop.run(main())


async def drive(port: int, rate: float, seconds: float, connections: int) -> None:
    s = Scenario(name="generator", phase=[Phase(duration_s=seconds, rate=rate)], sku=[SkuSpec(sku="s", stock=1)],
                 distributors=4, retry_share=0.0, arrivals="uniform", connections=connections, timeout_s=10)
    seeded = Seeded("bench", [SeededSku("s", "s", 0, 1, 100, 1.0)], ["d"] * 4, ["k" * 43] * 4, 0)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=connections, timeout_s=10)
    d = Driver(s, pool, seeded)
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    st = await d.run()
    el, ru1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    await pool.close()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    done = st.ok + st.failed
    print(f"offered {rate:,.0f}/s for {seconds:.0f} s over {connections} connections: {done:,} answered "
          f"({st.failed} failed) in {el:.2f} s = {done / el:,.0f} requests/s; generator CPU {cpu / el:.0%} of one core")
    lag = st.lag
    print(f"schedule lag ms: p50 {lag.get_value_at_percentile(50) / 1000:.2f}  p99 {lag.get_value_at_percentile(99) / 1000:.2f}  "
          f"max {lag.get_max_value() / 1000:.2f};  latency from intended start p50 "
          f"{st.latency.get_value_at_percentile(50) / 1000:.2f} p99 {st.latency.get_value_at_percentile(99) / 1000:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=60_000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--connections", type=int, default=64)
    a = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    proc = multiprocessing.Process(target=serve, args=(sock, cores[-1]), daemon=True)
    proc.start()
    os.sched_setaffinity(0, {cores[0]})
    time.sleep(0.5)
    try:
        uvloop.run(drive(port, a.rate, a.seconds, a.connections))
    finally:
        proc.terminate()
        proc.join()


if __name__ == "__main__":
    main()
