"""The open-loop driver: arrivals follow the scenario's schedule whether or not earlier
requests have returned. Latency is measured from each request's *intended* start (so a
slow server cannot hide behind a slow generator: no coordinated omission); service
time (from the actual write) and the generator's own lag are recorded too."""

from __future__ import annotations

import asyncio
import bisect
import gc
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec
from hdrh.histogram import HdrHistogram

from .client import Pool, Request
from .scenario import Scenario
from .target import LoadtestError, Seeded, Spawned, seed
from .verify import Check, Observed, decode_order, verify

__all__ = ["Stats", "Driver", "Result", "loadtest"]

_perf = time.perf_counter
_MAX_US = 120_000_000


class _Hist(HdrHistogram):
    """An :class:`HdrHistogram` whose ``record_value`` computes the same counts index
    inline (``int.bit_length`` instead of ``bin()`` and four method calls): about a
    third of the cost, and the generator records five values per answer."""

    def __init__(self, lowest: int, highest: int, digits: int) -> None:
        super().__init__(lowest, highest, digits)
        self._bucket_shift = self.unit_magnitude + self.sub_bucket_half_count_magnitude + 1

    def record_value(self, value: int, count: int = 1) -> bool:
        if value < 0:
            return False
        bucket = (value | self.sub_bucket_mask).bit_length() - self._bucket_shift
        idx = (((bucket + 1) << self.sub_bucket_half_count_magnitude)
               + (value >> (bucket + self.unit_magnitude)) - self.sub_bucket_half_count)
        if idx < 0 or idx >= self.counts_len:
            return False
        self.counts[idx] += count
        self.total_count += count
        if value < self.min_value:
            self.min_value = value
        if value > self.max_value:
            self.max_value = value
        return True


def _hist(digits: int = 3) -> HdrHistogram:
    return _Hist(1, _MAX_US, digits)


class Stats:
    """HDR histograms (microseconds) overall, by kind and per second; counts by outcome."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.latency = _hist()
        self.service = _hist()
        self.lag = _hist()
        self.by_kind: dict[str, HdrHistogram] = {}
        self.kinds: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.sec_sent: list[int] = []
        self.sec_ok: list[int] = []
        self.sec_err: list[int] = []
        self.sec_hist: list[HdrHistogram] = []

    def _second(self, t: float) -> int:
        i = int(t - self.start)
        while len(self.sec_ok) <= i:
            self.sec_sent.append(0)
            self.sec_ok.append(0)
            self.sec_err.append(0)
            self.sec_hist.append(_hist(2))
        return i

    def submitted(self, t: float) -> None:
        self.sent += 1
        i = int(t - self.start)
        if i >= len(self.sec_sent):
            self._second(t)
        self.sec_sent[i] += 1

    def done(self, kind: str, req: Request, now: float, status: int, error: str | None) -> None:
        lat = int((now - req.intended) * 1e6) or 1
        if lat > _MAX_US:
            lat = _MAX_US
        self.latency.record_value(lat)
        h = self.by_kind.get(kind)
        if h is None:
            h = self.by_kind[kind] = _hist()
        h.record_value(lat)
        self.kinds[kind] += 1
        i = int(now - self.start)
        if i >= len(self.sec_ok):
            self._second(now)
        self.sec_hist[i].record_value(lat)
        sent = req.sent
        if sent:
            v = int((now - sent) * 1e6) or 1
            self.service.record_value(v if v < _MAX_US else _MAX_US)
            v = int((sent - req.intended) * 1e6) or 1
            self.lag.record_value(v if v < _MAX_US else _MAX_US)
        if error is None:
            self.statuses[status] += 1
            if status < 300:
                self.ok += 1
                self.sec_ok[i] += 1
                return
        self.failed += 1
        self.sec_err[i] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1


def _error_code(body: bytes) -> str:
    try:
        return msgspec.json.decode(body)["error"]["code"]
    except Exception:
        return "unparsable_error"


class _Op:
    __slots__ = ("kind", "dist", "ref", "body")

    def __init__(self, kind: str, dist: int, ref: str, body: bytes) -> None:
        self.kind, self.dist, self.ref, self.body = kind, dist, ref, body


class Driver:
    """Runs one scenario's schedule against a seeded target."""

    def __init__(self, scenario: Scenario, pool: Pool, seeded: Seeded) -> None:
        self.s = scenario
        self.pool = pool
        self.seeded = seeded
        self.rng = random.Random(scenario.seed)
        self.observed = Observed()
        self.loop = asyncio.get_running_loop()
        host = pool.host_header
        self.order_head = [f"POST /v1/orders HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {k}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: ".encode() for k in seeded.keys]
        self.auth = [f"Authorization: Bearer {k}" for k in seeded.keys]
        self.n_heads = len(self.order_head)
        # per phase: (cumulative SKU weights, SKU ids)
        ids = {s.name: s for s in seeded.skus}
        self.phase_mix: list[tuple[list[float], list[bytes]]] = []
        for p in scenario.phase:
            chosen = [ids[n] for n in p.skus] if p.skus else seeded.skus
            cum, acc = [], 0.0
            for s in chosen:
                acc += s.weight
                cum.append(acc)
            self.phase_mix.append((cum, [s.sku.encode() for s in chosen]))
        qtys = sorted(scenario.qty_mix)
        acc, self.qty_cum = 0.0, []
        for q in qtys:
            acc += scenario.qty_mix[q]
            self.qty_cum.append(acc)
        self.qtys = qtys
        self.ends = []
        t = 0.0
        for p in scenario.phase:
            t += p.duration_s
            self.ends.append(t)
        self.seq = 0
        self.outstanding = 0
        self.finished = asyncio.Event()
        self.scheduling = True
        self.stats = Stats(_perf())

    # ---- schedule ------------------------------------------------------------------------
    async def run(self) -> Stats:
        self.stats = Stats(_perf())
        self.start = self.stats.start
        self.next_t = self.start
        self.phase = 0
        # Each answer allocates a handful of GC-tracked objects (request, op, the observed
        # answer) and the observed answers only grow: with the default thresholds the
        # collector runs every ~2,000 allocations and rescans them, about a tenth of the
        # generator's CPU. Collect less often while the load runs; restored after.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
        try:
            self._tick()
            await self.finished.wait()
        finally:
            gc.set_threshold(*thresholds)
        return self.stats

    def rate_now(self, now: float) -> float:
        """The scheduled rate at perf_counter() time *now*."""
        t = now - self.stats.start
        i = min(bisect.bisect_right(self.ends, t), len(self.ends) - 1)
        p = self.s.phase[i]
        return p.rate_at(t - (self.ends[i] - p.duration_s))

    def _tick(self) -> None:
        now = _perf()
        ends, phases = self.ends, self.s.phase
        poisson = self.s.arrivals == "poisson"
        expovariate = self.rng.expovariate
        arrival = self._arrival
        start = self.start
        next_t = self.next_t
        # the phase's rate_at(), inlined: rate + (end - rate) * clamp(t / duration)
        p = phases[self.phase]
        p_start, p_rate, p_dur = ends[self.phase] - p.duration_s, p.rate, p.duration_s
        p_span = (p.rate if p.rate_end is None else p.rate_end) - p_rate
        p_end = ends[self.phase]
        while next_t <= now:
            rel = next_t - start
            if rel >= p_end:
                while rel >= ends[self.phase]:
                    self.phase += 1
                    if self.phase == len(ends):
                        self.next_t = next_t
                        self.scheduling = False
                        self._maybe_finished()
                        return
                p = phases[self.phase]
                p_start, p_rate, p_dur = ends[self.phase] - p.duration_s, p.rate, p.duration_s
                p_span = (p.rate if p.rate_end is None else p.rate_end) - p_rate
                p_end = ends[self.phase]
            rate = p_rate + p_span * min(max((rel - p_start) / p_dur, 0.0), 1.0) if p_span else p_rate
            if rate <= 0.0:
                next_t += 0.001
                continue
            arrival(next_t)
            next_t += expovariate(rate) if poisson else 1.0 / rate
        self.next_t = next_t
        delay = next_t - _perf()
        if delay > 0.0:
            self.loop.call_later(delay, self._tick)
        else:
            self.loop.call_soon(self._tick)

    def _arrival(self, t: float) -> None:
        rng = self.rng
        random_ = rng.random
        s = self.s
        d = rng.randrange(self.n_heads)
        cum, skus = self.phase_mix[self.phase]
        sku = skus[bisect.bisect_left(cum, random_() * cum[-1])]
        qty = self.qtys[bisect.bisect_left(self.qty_cum, random_() * self.qty_cum[-1])]
        self.seq = seq = self.seq + 1
        if s.reserve_share and random_() < s.reserve_share:
            body = (b'{"sku":"%s","qty":%d,"external_ref":"r%d","mode":"reserve","reserve_ttl_s":%d}'
                    % (sku, qty, seq, s.reserve_ttl_s))
        else:
            body = b'{"sku":"%s","qty":%d,"external_ref":"r%d"}' % (sku, qty, seq)
        data = b"%s%d\r\n\r\n%s" % (self.order_head[d], len(body), body)
        ref = "r%d" % seq
        self._submit(Request(data, t, self._done, _Op("order", d, ref, body)))
        if s.retry_share and random_() < s.retry_share:
            delay = random_() * s.retry_delay_s
            self.outstanding += 1
            self.loop.call_later(delay, self._replay, data, d, ref, body, t + delay)

    def _replay(self, data: bytes, d: int, ref: str, body: bytes, intended: float) -> None:
        self.outstanding -= 1
        self._submit(Request(data, intended, self._done, _Op("replay", d, ref, body)))

    def _submit(self, req: Request) -> None:
        self.outstanding += 1
        self.stats.submitted(req.intended)
        self.pool.submit(req)

    def _follow_up(self, op: _Op, order_id: str, action: str) -> None:
        data = (f"POST /v1/orders/{order_id}/{action} HTTP/1.1\r\nHost: {self.pool.host_header}\r\n"
                f"{self.auth[op.dist]}\r\nContent-Length: 0\r\n\r\n").encode()
        self._submit(Request(data, _perf(), self._done, _Op(action, op.dist, op.ref, b"")))

    # ---- answers -------------------------------------------------------------------------
    def _done(self, req: Request, status: int, body: bytes, error: str | None) -> None:
        now = _perf()
        op: _Op = req.ctx
        self.stats.done(op.kind, req, now, status, error)
        if error is not None:
            self.stats.error(error)
        elif 200 <= status < 300:
            try:
                order = decode_order(body)
            except msgspec.DecodeError:
                self.stats.error("unparsable_answer")
            else:
                self.observed.add(op.dist, op.ref, op.kind, status, order)
                if op.kind == "order" and order.status == "reserved":
                    action = "confirm" if self.rng.random() < self.s.confirm_share else "cancel"
                    self._follow_up(op, order.order_id, action)
        else:
            self.stats.error(_error_code(body))
        self.outstanding -= 1
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if not self.scheduling and self.outstanding == 0:
            self.finished.set()


@dataclass
class Result:
    scenario: Scenario
    stats: Stats
    checks: list[Check]
    totals: dict[str, Any]
    seconds: float
    cpu_s: float
    target: str
    spawned: bool
    run_id: str
    seed_s: float
    per_second_rate: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


AfterLoad = Callable[[Seeded, Spawned | None], Awaitable[None]]


async def loadtest(scenario: Scenario, *, url: str | None = None, admin_token: str | None = None,
                   spawn: bool = False, progress: Any = None, after_load: AfterLoad | None = None,
                   keep: bool = False) -> Result:
    """Seed, drive, verify. *progress*: a callable ``(driver) -> context manager`` for a live view;
    *after_load*: awaited between the load and the verification (tests use it to corrupt state)."""
    daemon: Spawned | None = None
    if spawn:
        daemon = Spawned(keep=keep)
        url, admin_token = daemon.url, daemon.admin_token
    if url is None or admin_token is None:
        raise LoadtestError("a target is needed: --url and --admin-token, or --spawn")
    try:
        if daemon is not None:
            await daemon.ready()
        pool = Pool(url, max_connections=scenario.connections, timeout_s=scenario.timeout_s)
        admin_pool = Pool(url, max_connections=8, timeout_s=600.0)
        try:
            t0 = time.monotonic()
            seeded = await seed(admin_pool, admin_token, scenario)
            seed_s = time.monotonic() - t0
            driver = Driver(scenario, pool, seeded)
            cpu0 = _cpu()
            t0 = time.monotonic()
            if progress is not None:
                with progress(driver):
                    stats = await driver.run()
            else:
                stats = await driver.run()
            seconds, cpu = time.monotonic() - t0, _cpu() - cpu0
            await pool.close()
            if after_load is not None:
                await after_load(seeded, daemon)
            checks, totals = await verify(admin_pool, admin_token, seeded, driver.observed)
        finally:
            await pool.close()
            await admin_pool.close()
    finally:
        if daemon is not None:
            daemon.stop()
    rates = [driver.rate_now(stats.start + i + 0.5) for i in range(len(stats.sec_ok))]
    return Result(scenario, stats, checks, totals, seconds, cpu, url, spawn, seeded.run_id, seed_s, rates)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
