"""Prometheus metrics, served on their own listener (off by default: `[metrics] enabled`).

The server calls the small methods of `NoMetrics`; with metrics off it gets exactly that
(every call a no-op), with metrics on a `Metrics` backed by a private CollectorRegistry (not
the process-global one, so several servers in one process, as in tests, do not collide).
Label values are bounded: store prefixes and rule names come from the configuration,
operations and outcomes from closed sets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keymanager.base import EkmHealth, HealthState, KeyManager

log = logging.getLogger("xks_proxy.metrics")

# KMS gives a call 250 ms; resolution matters below that.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HEALTH_VALUE = {HealthState.ACTIVE: 2, HealthState.DEGRADED: 1, HealthState.UNAVAILABLE: 0}


class NoMetrics:
    """The interface the server and TLS layer report through; does nothing."""

    def request(self, store: str | None, operation: str, outcome: str, seconds: float) -> None: ...

    def keymanager(self, operation: str, seconds: float) -> None: ...

    def throttled(self, store: str | None, reason: str) -> None: ...

    def denied(self, store: str, rule: str) -> None: ...

    def health(self, details: Iterable[EkmHealth]) -> None: ...

    def tls_refused(self, reason: str) -> None: ...

    def reload(self, what: str, ok: bool) -> None: ...


class Metrics(NoMetrics):
    def __init__(self, in_flight: Callable[[], float], cert_expiry: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "xks_requests", "XKS API requests by store, operation and outcome (OK or the errorName)",
            ("store", "operation", "outcome"), registry=r,
        )
        self._latency = Histogram(
            "xks_request_duration_seconds", "Whole-request latency", ("operation",), buckets=_BUCKETS, registry=r
        )
        self._km_latency = Histogram(
            "xks_keymanager_duration_seconds", "Latency of key manager calls", ("operation",), buckets=_BUCKETS, registry=r
        )
        self._throttled = Counter(
            "xks_throttled", "Requests answered 429 (reason: rate = store quota, in_flight = global cap)",
            ("store", "reason"), registry=r,
        )
        self._denied = Counter(
            "xks_denied", "Requests denied by secondary authorization, by the rule that denied", ("store", "rule"), registry=r
        )
        self._health = Gauge(
            "xks_keymanager_health", "Key manager health: 2 ACTIVE, 1 DEGRADED, 0 UNAVAILABLE", ("ekm",), registry=r
        )
        self._tls_refused = Counter(
            "xks_tls_refused", "Connections refused at TLS (handshake failed, or client name not allowed)", ("reason",), registry=r
        )
        self._reloads = Counter("xks_reloads", "Reloads of config or TLS files by result", ("what", "result"), registry=r)
        Gauge("xks_requests_in_flight", "Requests being worked on now", registry=r).set_function(in_flight)
        r.register(_CertExpiry(cert_expiry))
        self._children: dict[tuple[str, ...], object] = {}

    def _child(self, metric, *labels: str):  # type: ignore[no-untyped-def]
        """labels() takes a lock and builds a key; the hot path keeps its own small cache."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, store: str | None, operation: str, outcome: str, seconds: float) -> None:
        self._child(self._requests, store if store is not None else "-", operation, outcome).inc()
        self._child(self._latency, operation).observe(seconds)

    def keymanager(self, operation: str, seconds: float) -> None:
        self._child(self._km_latency, operation).observe(seconds)

    def throttled(self, store: str | None, reason: str) -> None:
        self._child(self._throttled, store if store is not None else "-", reason).inc()

    def denied(self, store: str, rule: str) -> None:
        self._child(self._denied, store, rule).inc()

    def health(self, details: Iterable[EkmHealth]) -> None:
        for detail in details:
            self._health.labels(detail.id).set(_HEALTH_VALUE[detail.state])

    def tls_refused(self, reason: str) -> None:
        self._tls_refused.labels(reason).inc()

    def reload(self, what: str, ok: bool) -> None:
        self._reloads.labels(what, "ok" if ok else "refused").inc()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        return app

    async def _scrape(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def watch_health(self, key_manager: KeyManager, interval: float = 15.0) -> None:
        """Keep the health gauge current between KMS's health checks (every few minutes)."""
        while True:
            try:
                self.health(await key_manager.health())
            except Exception:
                log.exception("key manager health probe for metrics failed")
            await asyncio.sleep(interval)


class _CertExpiry:
    """xks_tls_certificate_expiry_days{certificate=...}, computed at scrape time from what is loaded."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self._source = source

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> list[GaugeMetricFamily]:
        family = self._family()
        now = time.time()
        for name, not_after in self._source().items():
            family.add_metric([name], (not_after - now) / 86400.0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "xks_tls_certificate_expiry_days", "Days until a loaded certificate expires", labels=["certificate"]
        )
