"""Prometheus metrics of one daemon process (each worker keeps its own).

Requests by route template, method and status (counts and latency), orders by
outcome, codes delivered, connections, timeouts; on every scrape the stock of each
SKU and the webhook backlog are read afresh and the coalescers' counters are reported (items / batches is
the mean batch size per saga step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, Metric

from ..engine import Engine
from ..errors import DispatchError

__all__ = ["Metrics", "CONTENT_TYPE"]

log = logging.getLogger("dispatch.server")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STATES = ("available", "reserved", "sold", "voided", "invalidated", "parked")

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


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        r = self.registry = CollectorRegistry()
        self._requests = Counter("dispatch_http_requests", "HTTP requests answered",
                                 ["route", "method", "status"], registry=r)
        self._latency = Histogram("dispatch_http_request_duration_seconds",
                                  "Time from a request's first byte to its answer",
                                  ["route", "method", "status"], buckets=_BUCKETS, registry=r)
        self._orders = Counter("dispatch_orders", "POST /v1/orders by outcome (status, replayed, or error code)",
                               ["outcome"], registry=r)
        self._codes = Counter("dispatch_codes_delivered", "Codes handed to buyers", registry=r)
        self._stock = Gauge("dispatch_stock_codes", "Codes per SKU and state (read at scrape time)",
                            ["sku", "state"], registry=r)
        self._webhooks = Gauge("dispatch_webhook_deliveries", "Webhook deliveries waiting for a try (due) "
                               "or failed for good (failed), read at scrape time", ["state"], registry=r)
        self.connections = Gauge("dispatch_http_connections", "Open HTTP connections", registry=r)
        self._rejected = Counter("dispatch_http_connections_rejected", "Connections closed at once: "
                                 "over max_connections", registry=r)
        self._timeouts = Counter("dispatch_http_timeouts", "Connections closed by a timeout", ["phase"],
                                 registry=r)
        r.register(_Coalescers(engine))
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            labels = (route, method, str(status))
            child = self._children[key] = (self._requests.labels(*labels), self._latency.labels(*labels))
        child[0].inc()
        child[1].observe(seconds)

    def order(self, outcome: str, codes: int = 0) -> None:
        self._orders.labels(outcome).inc()
        if codes:
            self._codes.inc(codes)

    def delivered(self, codes: int) -> None:
        self._codes.inc(codes)

    def rejected(self) -> None:
        self._rejected.inc()

    def timeout(self, phase: str) -> None:
        self._timeouts.labels(phase).inc()

    async def render(self) -> bytes:
        try:
            for s in await self._engine.stocks():
                for state in _STATES:
                    self._stock.labels(s.sku, state).set(getattr(s, state))
            due, failed = await self._engine.webhooks.backlog()
            self._webhooks.labels("due").set(due)
            self._webhooks.labels("failed").set(failed)
        except DispatchError as e:  # the rest is still worth scraping
            log.warning("metrics: stock and webhooks not refreshed: %s", e.message)
        return generate_latest(self.registry)
