"""Prometheus metrics of one daemon process (each worker keeps its own).

Requests by route template, method and status (counts and latency), orders by
outcome, codes delivered, connections, timeouts; on every scrape the stock of each
SKU and the webhook backlog are read afresh and the coalescers' counters are reported (items / batches is
the mean batch size per saga step), with the changes of Redis master seen, rounds short
of their replicas and the codes reconciliation took out of pools.

:meth:`Metrics.live` reads the same counters as figures of the last minute (orders
and codes a second, order latency percentiles, refusals by reason) for the console.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import get_args

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from ..engine import Engine
from ..errors import DispatchError
from ..models import OrderStatus
from .messages import Live

__all__ = ["Metrics", "CONTENT_TYPE"]

log = logging.getLogger("dispatch.server")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STATES = ("available", "reserved", "sold", "voided", "invalidated", "parked", "expired")
#: Order outcomes that are not refusals.
_SERVED = frozenset((*get_args(OrderStatus), "replayed"))
WINDOW_S = 60
_LATENCIES = 4096  # order latencies kept for the percentiles (the most recent)

disable_created_metrics()  # the *_created series only double what a scraper sees


class _Coalescers:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily("dispatch_coalescer_batches", "Script calls sent, per saga step",
                                      labels=["step"])
        items = CounterMetricFamily("dispatch_coalescer_items", "Items in those script calls, per saga step",
                                    labels=["step"])
        for step, (n_batches, n_items) in self._engine.coalescer_stats().items():
            batches.add_metric([step], n_batches)
            items.add_metric([step], n_items)
        yield batches
        yield items


class _Replication:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        changes, short, reconciled = self._engine.replication_stats()
        yield CounterMetricFamily("dispatch_redis_master_changes", "Changes of Redis master (run id or "
                                  "replication id) seen; each is followed by a reconciliation", value=changes)
        yield CounterMetricFamily("dispatch_rounds_unacknowledged", "Rounds answered store_unavailable: "
                                  "fewer than min_replicas_acked replicas had them in time", value=short)
        fixed = CounterMetricFamily("dispatch_reconciled_codes", "Codes held by orders found in a pool "
                                    "after a change of master, and taken out of it", labels=["sku"])
        for sku, n in sorted(reconciled.items()):
            fixed.add_metric([sku], n)
        yield fixed


class _Requests:
    """Requests by (route, method, status): counts and latency histograms kept as plain
    numbers (no lock: one event loop updates them) and turned into metric families only
    when scraped; prometheus_client's own Counter and Histogram cost 6 µs a request."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, int], list[float]] = {}  # key -> [sum, per-bucket counts..., +Inf]
        self.orders: dict[str, int] = {}
        self.codes = 0
        self.recent = _Recent()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        row = self.seen.get((route, method, status))
        if row is None:
            row = self.seen[route, method, status] = [0.0] * (len(_BUCKETS) + 2)
        row[0] += seconds
        row[1 + bisect_left(_BUCKETS, seconds)] += 1
        if route == "/v1/orders" and method == "POST":
            self.recent.latencies.append((time.monotonic(), seconds))

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily("dispatch_http_requests", "HTTP requests answered",
                                    labels=["route", "method", "status"])
        latency = HistogramMetricFamily("dispatch_http_request_duration_seconds",
                                        "Time from a request's first byte to its answer",
                                        labels=["route", "method", "status"])
        for (route, method, status), row in sorted(self.seen.items()):
            labels = [route, method, str(status)]
            cumulative, buckets = 0.0, []
            for le, n in zip((*map(str, _BUCKETS), "+Inf"), row[1:]):
                cumulative += n
                buckets.append((le, cumulative))
            total.add_metric(labels, cumulative)
            latency.add_metric(labels, buckets, row[0])
        orders = CounterMetricFamily("dispatch_orders", "POST /v1/orders by outcome (status, replayed, or error code)",
                                     labels=["outcome"])
        for outcome, n in sorted(self.orders.items()):
            orders.add_metric([outcome], n)
        yield total
        yield latency
        yield orders
        yield CounterMetricFamily("dispatch_codes_delivered", "Codes handed to buyers", value=self.codes)


class _Recent:
    """The last WINDOW_S seconds: orders and codes counted per second (a ring of
    slots, each reset when its second comes round again) and the latencies of the
    most recent orders."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.slots = [[-1, 0, 0] for _ in range(WINDOW_S)]  # [second, orders, codes]
        self.latencies: deque[tuple[float, float]] = deque(maxlen=_LATENCIES)

    def count(self, orders: int, codes: int) -> None:
        second = int(time.monotonic())
        slot = self.slots[second % WINDOW_S]
        if slot[0] != second:
            slot[:] = [second, 0, 0]
        slot[1] += orders
        slot[2] += codes

    def rates(self) -> tuple[float, float, float | None, float | None]:
        """(orders/s, codes/s) over the last full seconds, and the p50 and p99 order latency
        in ms over the window (None without orders)."""
        now = time.monotonic()
        current = int(now)
        span = max(1, min(WINDOW_S - 1, int(now - self.started)))
        orders = codes = 0
        for second, n, c in self.slots:
            if current - span <= second < current:
                orders, codes = orders + n, codes + c
        recent = sorted(s for t, s in self.latencies if now - t <= WINDOW_S)

        def pct(p: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(p * len(recent)))] * 1000, 3) if recent else None

        return round(orders / span, 3), round(codes / span, 3), pct(0.50), pct(0.99)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        r = self.registry = CollectorRegistry()
        self._requests = _Requests()
        r.register(self._requests)
        self._stock = Gauge("dispatch_stock_codes", "Codes per SKU and state (read at scrape time)",
                            ["sku", "state"], registry=r)
        self._expiring = Gauge("dispatch_stock_expiring_codes", "Codes on sale per SKU that reach their sell-by "
                               "within expiring_window_s (as of the last sweep)", ["sku"], registry=r)
        self._webhooks = Gauge("dispatch_webhook_deliveries", "Webhook deliveries waiting for a try (due) "
                               "or failed for good (failed), read at scrape time", ["state"], registry=r)
        self.connections = Gauge("dispatch_http_connections", "Open HTTP connections", registry=r)
        self._rejected = Counter("dispatch_http_connections_rejected", "Connections closed at once: "
                                 "over max_connections", registry=r)
        self._timeouts = Counter("dispatch_http_timeouts", "Connections closed by a timeout", ["phase"],
                                 registry=r)
        r.register(_Coalescers(engine))
        r.register(_Replication(engine))
        self.request = self._requests.observe

    def order(self, outcome: str, codes: int = 0) -> None:
        orders = self._requests.orders
        orders[outcome] = orders.get(outcome, 0) + 1
        self._requests.codes += codes
        self._requests.recent.count(1, codes)

    def delivered(self, codes: int) -> None:
        self._requests.codes += codes
        self._requests.recent.count(0, codes)

    def live(self) -> Live:
        """This process's figures of the last WINDOW_S seconds, and its refusals since it started."""
        r = self._requests
        orders_s, codes_s, p50, p99 = r.recent.rates()
        return Live(window_s=WINDOW_S, orders_per_s=orders_s, codes_per_s=codes_s, p50_ms=p50, p99_ms=p99,
                    orders=sum(r.orders.values()), codes=r.codes,
                    refusals={k: n for k, n in sorted(r.orders.items()) if k not in _SERVED})

    def rejected(self) -> None:
        self._rejected.inc()

    def timeout(self, phase: str) -> None:
        self._timeouts.labels(phase).inc()

    async def render(self) -> bytes:
        try:
            for s in await self._engine.stocks():
                for state in _STATES:
                    self._stock.labels(s.sku, state).set(getattr(s, state))
                self._expiring.labels(s.sku).set(s.expiring)
            due, failed = await self._engine.webhooks.backlog()
            self._webhooks.labels("due").set(due)
            self._webhooks.labels("failed").set(failed)
        except DispatchError as e:  # the rest is still worth scraping
            log.warning("metrics: stock and webhooks not refreshed: %s", e.message)
        return generate_latest(self.registry)
