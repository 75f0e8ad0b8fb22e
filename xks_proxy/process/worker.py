"""One worker: the server up on an event loop, and serving until a stop.

`start()` brings one worker up on the running event loop (key manager, app, HTTPS listener
with mutual TLS, config and TLS reload, audit, metrics) and returns a handle; tests call it
directly, so they exercise the same code as production. `serve_worker()` is a serving process's
life around it: it defers SIGTERM/SIGINT to an event (a stop during an HSM login waits for the
login), reloads on SIGHUP, and closes the key manager before the process exits. The supervisor
(supervisor.py) runs it in each forked worker, or in its own process with one worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Coroutine

from aiohttp import web

from keymanager import create_key_manager
from xks_proxy.access.audit import AuditLog
from xks_proxy.access.connections import GuardedSite, Guards, redact_aiohttp_logs
from xks_proxy.access.metrics import Metrics, NoMetrics, exposition_app, with_cert_expiry, with_credential_age
from xks_proxy.access.mtls import TlsError, TlsManager
from xks_proxy.access.throttle import BucketTable
from xks_proxy.access.tls_transport import TlsSite
from xks_proxy.config import Config, ConfigError
from xks_proxy.process import logsink
from xks_proxy.process.sockets import listen
from xks_proxy.process.reload import Reloader
from xks_proxy.server import XksServer

log = logging.getLogger("xks_proxy")
#: How long a stop waits for a start-up still inside the key manager (an HSM login) before exiting.
STOP_GRACE_SECONDS = 15.0
#: The signals a serving process handles: blocked from the start of `serve` until its loop defers them.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True)
class Shared:
    """What a worker gets from its supervisor: its share of the limits, where audit records go."""

    workers: int
    audit_socket: socket.socket | None
    first: bool = False  # worker 0: it runs the admin listener and alone logs proxy-wide events (a reload)
    buckets: BucketTable | None = None  # the stores' quotas, shared by all workers


@dataclass
class Running:
    """A started worker: its ports and what `close()` must stop."""

    server: XksServer
    port: int
    tls: TlsManager | None
    reloader: Reloader
    metrics_port: int | None = None
    guards: Guards | None = None  # open connections of the XKS listener
    _runners: list[web.BaseRunner] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # the server, then the admin listener
    _audit: AuditLog | None = None

    async def close(self) -> None:
        await self.reloader.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        for close in reversed(self._closers):  # the admin listener first, the key manager last
            await close()
        if self._audit is not None:
            self._audit.close()


async def start(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    plain_http: bool = False,
    reload_interval: float = 0.5,
    sock: socket.socket | None = None,
    shared: Shared | None = None,
) -> Running:
    """Serve in the background on `sock` (or bind host:port). Raises ConfigError for a certificate that cannot serve."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    file_config = config  # the reloader judges changes of config.toml against the file's own values
    serving_port = _keep_port(sock.getsockname()[1]) if sock is not None else _as_is
    config = serving_port(config)  # a fleet names this proxy by the port it really serves on
    metrics = Metrics() if config.metrics.enabled else NoMetrics()
    tls: TlsManager | None = None
    if plain_http and config.tls.client_ca is not None:
        log.warning("tls.client_ca is set but serving plain HTTP: client certificates are the balancer's job now")
    if not plain_http:
        try:
            tls = TlsManager(config, metrics)
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    if shared is not None and not shared.first:  # worker 0 tells a reload, once for the proxy
        logsink.one_worker_says_proxy_wide()
    audit_log = AuditLog(config.audit, forward_to=shared.audit_socket if shared else None)
    key_manager = create_key_manager(config)
    server = XksServer(config, key_manager, metrics, workers=shared.workers if shared else 1)
    if shared is not None and shared.buckets is not None:
        server.throttle.share(shared.buckets)
    reloader = Reloader(
        file_config, server.apply_config, tls, metrics, reload_interval, overrides=serving_port, catch_up=shared is not None
    )  # a forked worker may be restarted long after the supervisor read config.toml
    if server.fleet is not None:
        server.fleet.apply = reloader.adopt  # the fleet's shared stores reach TLS client names too
    running = Running(server=server, port=port, tls=tls, reloader=reloader, _audit=audit_log)
    if shared is not None:
        await reloader.check()  # an edit made since the supervisor read config.toml holds before the first request
    try:
        await server.start()
        running._closers.append(server.close)
        if config.admin.enabled and (shared is None or shared.first):
            from xks_proxy.admin.api import AdminListener

            admin = AdminListener(config, key_manager)
            await admin.start()
            running._closers.append(admin.close)
        guards = Guards(config.server)
        listener = server.low_level(
            guards.guarding, access_log=None, logger=redact_aiohttp_logs(),
            keepalive_timeout=config.server.idle_timeout_seconds,  # the guard's idle deadline enforces the same
            lingering_time=2.0,  # after an answer sent before the body was read (413, 408): not aiohttp's 10 s
        )  # fmt: skip
        runner = web.ServerRunner(listener, shutdown_timeout=10)
        await runner.setup()
        running._runners.append(runner)
        site = TlsSite(runner, tls, guards, host, port, sock) if tls else GuardedSite(runner, guards, host, port, sock)
        await site.start()
        running.port = sock.getsockname()[1] if sock else site.port
        running.guards = guards
        if isinstance(metrics, Metrics):
            running._tasks.append(asyncio.create_task(metrics.watch_health(server.key_manager)))
            if shared is None:  # one process serves its own metrics; workers' are served by the sidecar
                running.metrics_port = await _serve_metrics(running, metrics, config)
        reloader.start()
    except BaseException:
        await running.close()
        raise
    return running


def _keep_port(port: int) -> Callable[[Config], Config]:
    """Every configuration this worker serves names the port it really listens on (`serve --port P`)."""
    return lambda config: replace(config, server=replace(config.server, port=port))


def _as_is(config: Config) -> Config:
    return config


async def _serve_metrics(running: Running, metrics: Metrics, config: Config) -> int:
    registry = with_cert_expiry(metrics.registry, lambda: running.tls.expiry() if running.tls else {})
    registry = with_credential_age(registry, config.home)  # as the sidecar serves it for several workers
    runner = web.AppRunner(exposition_app(registry), access_log=None)
    await runner.setup()
    running._runners.append(runner)
    await web.SockSite(runner, listen(config.metrics.host, config.metrics.port)).start()
    port = int(runner.addresses[0][1])
    log.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
    return port


async def serve_worker(
    config: Config, sock: socket.socket, plain_http: bool, shared: Shared | None, ready: Callable[[], object]
) -> None:
    """Start, call `ready()`, serve until SIGTERM/SIGINT, close. Entered with those signals blocked.

    From here on a stop only sets an event: one that arrives while the key manager starts (an
    HSM login in progress) waits for the start to return, then closes the sessions and exits,
    so no PKCS#11 call is ever cut short by a signal (bounded by STOP_GRACE_SECONDS).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running: Running | None = None
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: running.reloader.trigger() if running else None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        running = await _start_unless_stopped(start(config, plain_http=plain_http, sock=sock, shared=shared), stop)
        if running is None:
            return
        try:
            ready()
            await stop.wait()
        finally:
            await running.close()
            running.server.key_manager.release()
    finally:
        _ignore_signals(loop)


def _ignore_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Once the key manager is closed and released, later signals are ignored.

    Not earlier: asyncio's remove_signal_handler sets SIG_DFL before SIG_IGN can follow, and a
    worker gets two SIGTERMs (the process group's and the supervisor's copy); the second, landing
    in that instant during an HSM login, would kill the process inside C_Login. Until here every
    one only sets the stop event again. Not later: asyncio.run closes the loop's wakeup pipe before
    it removes the handlers, and a signal in between prints a traceback.
    """
    for signum in HANDLED_SIGNALS:
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)


async def _start_unless_stopped(starting: Coroutine[Any, Any, Running], stop: asyncio.Event) -> Running | None:
    """The started worker, or None if a stop came first (the start is let finish, then closed)."""
    task = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():  # never cancelled: that would leave a PKCS#11 call running under an exiting process
        await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
        if not task.done():
            log.error("stopping: start-up still inside the key manager after %g s; exiting anyway", STOP_GRACE_SECONDS)
            os._exit(1)
    running = task.result()
    if not stop.is_set():
        return running
    await running.close()
    running.server.key_manager.release()
    return None
