"""Prometheus metrics, served on their own listener (off by default: `[metrics] enabled`).

The server calls the small methods of `NoMetrics`; with metrics off it gets exactly that
(every call a no-op), with metrics on a `Metrics`. Label values are bounded: store prefixes and
rule names come from the configuration, operations and outcomes from closed sets.

One process: the worker serves its own private registry. Several workers (`serve --workers
N`): the supervisor sets PROMETHEUS_MULTIPROC_DIR before forking, every worker records into
files there, and the sidecar serves their sum (`multiprocess_registry`). prometheus_client
decides between the two when it is first imported, so this module imports it only inside
functions, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from aiohttp import web

from keymanager.base import EkmHealth, HealthState, KeyManager
from xks_proxy.config import ConfigError, read_raw
from xks_proxy.settings.stores import created_at

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("xks_proxy.metrics")

# KMS gives a call 250 ms; resolution matters below that.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HEALTH_VALUE = {HealthState.ACTIVE: 2, HealthState.DEGRADED: 1, HealthState.UNAVAILABLE: 0}

#: Label -> notAfter (POSIX seconds) of each certificate in service.
CertExpiry = Callable[[], dict[str, float]]
#: A shared vault's health entry (keymanager/vault/manager.py names its model "PostgreSQL <version>").
_DATABASE_MODEL = "PostgreSQL"
_DAY = 86400.0


class NoMetrics:
    """The interface the server and TLS layer report through; does nothing."""

    def request(self, store: str | None, operation: str, outcome: str, seconds: float) -> None: ...

    def keymanager(self, operation: str, seconds: float) -> None: ...

    def throttled(self, store: str | None, reason: str) -> None: ...

    def denied(self, store: str, rule: str) -> None: ...

    def health(self, details: Iterable[EkmHealth]) -> None: ...

    def tls_refused(self, reason: str) -> None: ...

    def reload(self, what: str, ok: bool) -> None: ...

    async def watch_health(self, key_manager: KeyManager, interval: float = 5.0) -> None: ...


class Metrics(NoMetrics):
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "xks_requests", "XKS API requests by store, operation and outcome (OK or the errorName)",
            ("store", "operation", "outcome"), registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "xks_request_duration_seconds", "Whole-request latency", ("operation",), buckets=_BUCKETS, registry=r
        )
        self._km_latency = Histogram(
            "xks_keymanager_duration_seconds", "Latency of key manager calls", ("operation",), buckets=_BUCKETS, registry=r
        )
        self._throttled = Counter(
            "xks_throttled", "Requests answered 429 (reason: rate = store quota, in_flight = in-flight cap)",
            ("store", "reason"), registry=r,
        )  # fmt: skip
        self._denied = Counter(
            "xks_denied", "Requests denied by secondary authorization, by the rule that denied", ("store", "rule"), registry=r
        )
        self._health = Gauge(
            "xks_keymanager_health", "Key manager health: 2 ACTIVE, 1 DEGRADED, 0 UNAVAILABLE (worst of the workers)",
            ("ekm",), registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self._tls_refused = Counter(
            "xks_tls_refused", "Connections refused at TLS (handshake failed, or client name not allowed)", ("reason",), registry=r
        )
        self._reloads = Counter("xks_reloads", "Reloads of config or TLS files by result", ("what", "result"), registry=r)
        self._database_up = Gauge(
            "xks_vault_database_up", "A fleet's shared vault database: 1 its last round trip worked, 0 not (worst of the workers)",
            ("database",), registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self._gcm_ratio: Any = None  # made at its first value: a backend that does not count has no sample
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
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
            if detail.model.startswith(_DATABASE_MODEL):
                self._database_up.labels(detail.id).set(1 if detail.state is HealthState.ACTIVE else 0)

    def gcm_invocations(self, ratio: float | None) -> None:
        """xks_key_gcm_invocations_ratio, made at the first ratio: an unlabelled gauge would show 0
        from its creation, which for a backend that does not count (None) would read as "far from
        the limit" rather than "not known"."""
        if ratio is None:
            return
        if self._gcm_ratio is None:
            from prometheus_client import Gauge

            self._gcm_ratio = Gauge(
                "xks_key_gcm_invocations_ratio",
                "Highest fraction of the AES-GCM limit (2^32 encryptions) the vault reserved under a key's current version "
                "(highest of the workers)",
                registry=self.registry, multiprocess_mode="livemax",
            )  # fmt: skip
        self._gcm_ratio.set(ratio)

    def tls_refused(self, reason: str) -> None:
        self._tls_refused.labels(reason).inc()

    def reload(self, what: str, ok: bool) -> None:
        self._reloads.labels(what, "ok" if ok else "refused").inc()

    async def watch_health(self, key_manager: KeyManager, interval: float = 5.0) -> None:
        """Keep the health gauges current between KMS's health checks (every few minutes).

        Every 5 s: an alert waiting a minute sees a change at once, and the probe is cheap (one
        AES-GCM round trip; a shared database's state is the vault's last refresh, not a query).
        The AES-GCM invocation ratio rides along: it is read from the key manager's memory, and
        a backend that does not count (None) leaves the gauge without a sample.
        """
        while True:
            try:
                self.health(await key_manager.health())
                self.gcm_invocations(key_manager.gcm_invocations_ratio())
            except Exception:
                log.exception("key manager health probe for metrics failed")
            await asyncio.sleep(interval)


def with_cert_expiry(registry: "CollectorRegistry", cert_expiry: CertExpiry) -> "CollectorRegistry":
    registry.register(_CertExpiry(cert_expiry))  # type: ignore[arg-type]
    return registry


def with_credential_age(registry: "CollectorRegistry", home: Path) -> "CollectorRegistry":
    registry.register(_CredentialAge(home))  # type: ignore[arg-type]
    return registry


def multiprocess_registry(cert_expiry: CertExpiry, home: Path) -> "CollectorRegistry":
    """What the sidecar serves: the sum over all workers' files, plus certificate expiry and credential age."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return with_credential_age(with_cert_expiry(registry, cert_expiry), home)


def exposition_app(registry: "CollectorRegistry") -> web.Application:
    from prometheus_client import generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


class _ScrapeTimeGauge:
    """A gauge family computed at each scrape: its values move with the clock, not with requests."""

    name = ""
    documentation = ""
    labels: tuple[str, ...] = ()

    def describe(self) -> list[Any]:
        return [self._family()]

    def collect(self) -> list[Any]:
        family = self._family()
        for labels, sample in self._samples(time.time()):
            family.add_metric(list(labels), sample)
        return [family]

    def _samples(self, now: float) -> Iterable[tuple[tuple[str, ...], float]]:
        raise NotImplementedError

    def _family(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))


class _CertExpiry(_ScrapeTimeGauge):
    """xks_tls_certificate_expiry_days{certificate=...}, KMS's XksProxyCertificateDaysToExpire (it keeps falling)."""

    name = "xks_tls_certificate_expiry_days"
    documentation = "Days until a certificate in service expires"
    labels = ("certificate",)

    def __init__(self, source: CertExpiry) -> None:
        self._source = source

    def _samples(self, now: float) -> Iterable[tuple[tuple[str, ...], float]]:
        return [((name,), (not_after - now) / _DAY) for name, not_after in self._source().items()]


class _CredentialAge(_ScrapeTimeGauge):
    """xks_proxy_credential_age_days{store,access_key_id}, KMS's XksProxyCredentialAge.

    Read from config.toml at each scrape, so a credential added or removed since the start
    shows at once; only the prefixes, access key ids and creation times are read (no secret is
    opened). A credential with no recorded creation time has no sample.
    """

    name = "xks_proxy_credential_age_days"
    documentation = "Days since a store's SigV4 credential was made"
    labels = ("store", "access_key_id")

    def __init__(self, home: Path) -> None:
        self._home = home

    def _samples(self, now: float) -> Iterable[tuple[tuple[str, ...], float]]:
        try:
            stores = read_raw(self._home).get("stores", [])
            return [
                ((store["prefix"], cred["access_key_id"]), (now - when) / _DAY)
                for i, store in enumerate(stores)
                for j, cred in enumerate(store["credentials"])
                if (when := created_at(cred, f"stores[{i}].credentials[{j}]")) is not None
            ]
        except (ConfigError, KeyError, TypeError) as exc:  # the reloader reports a bad file
            log.debug("credential age: %s", exc)
            return []
