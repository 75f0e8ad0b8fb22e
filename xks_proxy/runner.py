"""Running the server process: key manager, app, HTTPS listener, metrics, audit and reload.

`start()` brings everything up on the running event loop and returns a handle (tests use it
directly, so they exercise the same code path as production); `serve()` runs it until SIGINT
or SIGTERM, and reloads configuration and TLS files on SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from aiohttp import web

from keymanager import create_key_manager
from xks_proxy.audit import AuditLog
from xks_proxy.config import Config, ConfigError
from xks_proxy.metrics import Metrics, NoMetrics
from xks_proxy.mtls import TlsError, TlsManager, TlsSite
from xks_proxy.reload import Reloader
from xks_proxy.server import XksServer

log = logging.getLogger("xks_proxy")


@dataclass
class Running:
    """A started proxy: its ports and what `close()` must stop."""

    server: XksServer
    port: int
    tls: TlsManager | None
    reloader: Reloader
    metrics_port: int | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _audit: AuditLog | None = None

    async def close(self) -> None:
        await self.reloader.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._audit is not None:
            self._audit.close()


async def start(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    plain_http: bool = False,
    reload_interval: float = 0.5,
) -> Running:
    """Bind and serve in the background. Raises ConfigError for a certificate that cannot serve."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    tls: TlsManager | None = None
    server: XksServer | None = None
    metrics: NoMetrics = NoMetrics()
    if config.metrics.enabled:
        metrics = Metrics(
            in_flight=lambda: server.throttle.in_flight if server else 0,
            cert_expiry=lambda: tls.expiry() if tls else {},
        )
    if plain_http and config.tls.client_ca is not None:
        log.warning("tls.client_ca is set but serving plain HTTP: client certificates are the balancer's job now")
    if not plain_http:
        try:
            tls = TlsManager(config, metrics)
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    audit_log = AuditLog(config.audit)
    server = XksServer(config, create_key_manager(config), metrics)
    running = Running(server=server, port=port, tls=tls, reloader=Reloader(config, server.apply_config, tls, metrics, reload_interval))
    running._audit = audit_log
    try:
        runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=10)
        await runner.setup()
        running._runners.append(runner)
        if tls is not None:
            site: web.BaseSite = TlsSite(runner, host, port, tls)
            await site.start()
            running.port = site.port  # type: ignore[attr-defined]
        else:
            site = web.TCPSite(runner, host, port)
            await site.start()
            running.port = runner.addresses[0][1]
        if isinstance(metrics, Metrics):
            running.metrics_port = await _start_metrics(running, metrics, config)
            running._tasks.append(asyncio.create_task(metrics.watch_health(server.key_manager)))
        running.reloader.start()
    except BaseException:
        await running.close()
        raise
    return running


async def _start_metrics(running: Running, metrics: Metrics, config: Config) -> int:
    runner = web.AppRunner(metrics.app(), access_log=None)
    await runner.setup()
    running._runners.append(runner)
    await web.TCPSite(runner, config.metrics.host, config.metrics.port).start()
    port = int(runner.addresses[0][1])
    log.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
    return port


def serve(config: Config, host: str | None = None, port: int | None = None, plain_http: bool = False) -> int:
    """Serve until SIGINT/SIGTERM. HTTPS unless `plain_http` (behind a TLS-terminating balancer)."""
    return asyncio.run(_serve(config, host, port, plain_http))


async def _serve(config: Config, host: str | None, port: int | None, plain_http: bool) -> int:
    running = await start(config, host, port, plain_http)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reloader.trigger)
    scheme = "http" if plain_http else "https"
    stores = ", ".join(s.uri_path for s in config.stores)
    log.info("serving %s://%s:%d for stores %s", scheme, host or config.server.host, running.port, stores)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await running.close()
    return 0
