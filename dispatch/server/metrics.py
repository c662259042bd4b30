"""Prometheus metrics of one daemon process (each worker keeps its own).

Requests by route template, method and status (counts and latency), orders by
outcome, codes delivered, connections, timeouts; on every scrape the stock of each
SKU and the webhook backlog are read afresh and the coalescers' counters are reported (items / batches is
the mean batch size per saga step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from ..engine import Engine
from ..errors import DispatchError

__all__ = ["Metrics", "CONTENT_TYPE"]

log = logging.getLogger("dispatch.server")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STATES = ("available", "reserved", "sold", "voided", "invalidated", "parked", "expired")

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


class _Requests:
    """Requests by (route, method, status): counts and latency histograms kept as plain
    numbers (no lock: one event loop updates them) and turned into metric families only
    when scraped; prometheus_client's own Counter and Histogram cost 6 µs a request."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, int], list[float]] = {}  # key -> [sum, per-bucket counts..., +Inf]
        self.orders: dict[str, int] = {}
        self.codes = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        row = self.seen.get((route, method, status))
        if row is None:
            row = self.seen[route, method, status] = [0.0] * (len(_BUCKETS) + 2)
        row[0] += seconds
        row[1 + bisect_left(_BUCKETS, seconds)] += 1

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
        self.request = self._requests.observe

    def order(self, outcome: str, codes: int = 0) -> None:
        orders = self._requests.orders
        orders[outcome] = orders.get(outcome, 0) + 1
        self._requests.codes += codes

    def delivered(self, codes: int) -> None:
        self._requests.codes += codes

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
