"""Running the server: one process, or a supervisor with N pre-forked workers on one socket.

`start()` brings one worker up on the running event loop (key manager, app, HTTPS listener
with mutual TLS, config and TLS reload, audit, metrics) and returns a handle; tests call it
directly, so they exercise the same code as production. `serve()` binds the socket and runs
one worker in-process, or supervises several.

With `--workers N > 1` the supervisor binds the listening socket, forks N workers that each
build their own key manager after the fork (no SQLite connection or PKCS#11 session crosses a
fork): worker 0 alone first, the others once it serves, so a wrong HSM PIN is tried once. It restarts a worker that dies (but stops when a worker cannot start at all, see
EXIT_CANNOT_START), passes SIGTERM/SIGINT on for a graceful stop and SIGHUP on for a reload. Every worker watches the vault, config.toml and the TLS files itself, so changes
reach all of them within a second. Each worker holds 1/N of the throttle limits. A sidecar
process (sidecar.py) writes the one audit file and serves the metrics of all workers. The
admin listener (admin.py), if enabled, runs in one process only (worker 0): its port is single.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Coroutine

from aiohttp import web

from keymanager import create_key_manager
from xks_proxy.access import audit
from xks_proxy.access.audit import AuditLog
from xks_proxy.config import Config, ConfigError
from xks_proxy.access.connections import GuardedSite, Guards, redact_aiohttp_logs
from xks_proxy.errors import XksError
from xks_proxy.access.metrics import Metrics, NoMetrics, exposition_app, with_cert_expiry
from xks_proxy.access.mtls import TlsError, TlsManager, TlsSite
from xks_proxy.process.reload import Reloader
from xks_proxy.server import XksServer

log = logging.getLogger("xks_proxy")
#: A worker whose key manager cannot start (a refused HSM PIN, an unreadable vault): restarting
#: it would not help, and retrying a wrong PIN can lock the HSM account. The supervisor stops.
EXIT_CANNOT_START = 3
#: How long a stop waits for a start-up still inside the key manager (an HSM login) before exiting.
STOP_GRACE_SECONDS = 15.0
_HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True)
class Shared:
    """What a worker gets from its supervisor: its share of the limits, where audit records go."""

    workers: int
    audit_socket: socket.socket | None
    admin: bool = False  # this worker runs the admin listener


@dataclass
class Running:
    """A started worker: its ports and what `close()` must stop."""

    server: XksServer
    port: int
    tls: TlsManager | None
    reloader: Reloader
    metrics_port: int | None = None
    guards: Guards | None = None  # open connections of the XKS listener
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
    sock: socket.socket | None = None,
    shared: Shared | None = None,
) -> Running:
    """Serve in the background on `sock` (or bind host:port). Raises ConfigError for a certificate that cannot serve."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    if sock is not None:  # a fleet names this proxy by the port it really serves on
        config = replace(config, server=replace(config.server, port=sock.getsockname()[1]))
    metrics = Metrics() if config.metrics.enabled else NoMetrics()
    tls: TlsManager | None = None
    if plain_http and config.tls.client_ca is not None:
        log.warning("tls.client_ca is set but serving plain HTTP: client certificates are the balancer's job now")
    if not plain_http:
        try:
            tls = TlsManager(config, metrics)
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    audit_log = AuditLog(config.audit, forward_to=shared.audit_socket if shared else None)
    key_manager = create_key_manager(config)
    server = XksServer(config, key_manager, metrics, workers=shared.workers if shared else 1)
    reloader = Reloader(config, server.apply_config, tls, metrics, reload_interval)
    if server.fleet is not None:
        server.fleet.apply = reloader.adopt  # the fleet's shared stores reach TLS client names too
    running = Running(server=server, port=port, tls=tls, reloader=reloader, _audit=audit_log)
    app = server.app()
    if config.admin.enabled and (shared is None or shared.admin):
        from xks_proxy.admin import api as admin_api

        admin_api.attach(app, config, key_manager)
    try:
        guards = Guards(config.server)
        app.middlewares.append(guards.middleware)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=10, logger=redact_aiohttp_logs(),
            keepalive_timeout=config.server.idle_timeout_seconds,  # the guard's idle deadline enforces the same
            lingering_time=2.0,  # after an answer sent before the body was read (413, 408): not aiohttp's 10 s
        )  # fmt: skip
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


async def _serve_metrics(running: Running, metrics: Metrics, config: Config) -> int:
    registry = with_cert_expiry(metrics.registry, lambda: running.tls.expiry() if running.tls else {})
    runner = web.AppRunner(exposition_app(registry), access_log=None)
    await runner.setup()
    running._runners.append(runner)
    await web.TCPSite(runner, config.metrics.host, config.metrics.port).start()
    port = int(runner.addresses[0][1])
    log.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
    return port


# --- processes -----------------------------------------------------------------------------------


def serve(
    config: Config, host: str | None = None, port: int | None = None, plain_http: bool = False, workers: int = 1,
    sock: socket.socket | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM, reloading on SIGHUP. HTTPS unless `plain_http` (behind a TLS-terminating balancer).

    On `sock` if given (bound by `listen` before anything was printed), else on host:port.
    Raises ListenError when host:port cannot be bound.
    """
    host = host or config.server.host
    port = config.server.port if port is None else port
    if not plain_http:
        try:
            TlsManager(config, NoMetrics())  # refuse to start on a certificate that cannot serve
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    if config.audit.path is not None:
        audit.rotating_file(config.audit).close()  # refuse to start on an audit file that cannot be written
    sock = listen(host, port) if sock is None else sock
    scheme = "http" if plain_http else "https"
    stores = ", ".join(s.uri_path for s in config.stores)
    announce = partial(
        log.info, "serving %s://%s:%d for stores %s with %d worker(s)", scheme, host, sock.getsockname()[1], stores, workers
    )
    # Stop and reload signals wait (blocked) until a handler that defers them is in place: a
    # process killed inside a PKCS#11 call (a login rewrites SoftHSM's token file) can lose every key.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    try:
        if workers <= 1:
            asyncio.run(_serve_worker(config, sock, plain_http, None, announce))
            return 0
        return _supervise(config, sock, plain_http, workers, announce)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)


def _wait_ready(ready: int) -> bool:
    """Whether the worker writing to this pipe came up: a byte once it serves, EOF if it died first."""
    try:
        return os.read(ready, 1) == b"+"
    finally:
        os.close(ready)


def _report_ready(ready: int) -> None:
    os.write(ready, b"+")
    os.close(ready)


class ListenError(Exception):
    """host:port cannot be listened on (in use, not an address of this machine, ...), as one line."""


#: What to tell the operator beside the system's words, for the usual reasons.
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "ports below 1024 need privileges",
}


def listen(host: str, port: int) -> socket.socket:
    """A listening socket the workers share. Bound before the server says or makes anything, so a
    port in use or a foreign address is one ListenError line, with no claim of success before it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = _LISTEN_HINTS.get(exc.errno or 0)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}" + (f" ({hint})" if hint else "")) from None
    sock.set_inheritable(True)
    return sock


async def _serve_worker(
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
    loop.add_signal_handler(signal.SIGINT, _stop_once, loop, stop)
    loop.add_signal_handler(signal.SIGTERM, _stop_once, loop, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: running.reloader.trigger() if running else None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    running = await _start_unless_stopped(start(config, plain_http=plain_http, sock=sock, shared=shared), stop)
    if running is None:
        return
    try:
        ready()
        await stop.wait()
    finally:
        await running.close()
        running.server.key_manager.release()


def _stop_once(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT stops; later ones are ignored. A worker gets two (the process
    group's and the supervisor's copy), and one landing while asyncio closes its loop prints a
    traceback (CPython closes the wakeup pipe before it removes the handlers)."""
    stop.set()
    for signum in (signal.SIGTERM, signal.SIGINT):
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


def _supervise(config: Config, sock: socket.socket, plain_http: bool, workers: int, announce: Callable[[], object]) -> int:
    """Sidecar first, then worker 0 alone (the one HSM login that verifies the PIN), the others
    only once it is up; then restart workers that die. Entered with the stop signals blocked."""
    audit_rx, audit_tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) if config.audit.path else (None, None)
    metrics_sock = listen(config.metrics.host, config.metrics.port) if config.metrics.enabled else None
    metrics_dir = None
    if metrics_sock is not None:
        metrics_dir = tempfile.mkdtemp(prefix="xks-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in the children
    shared = Shared(workers=workers, audit_socket=audit_tx)
    children: dict[int, int] = {}  # pid -> slot; slot -1 is the sidecar
    stopping = failed = False
    handled = _HANDLED

    def spawn(slot: int, ready: int | None = None) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # a stop waits until the new child is in `children`
        try:
            pid = os.fork()
            if pid == 0:
                child(slot, ready)
            children[pid] = slot
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        if stopping:  # a stop that another thread took (the mask is this thread's) ran before the line above
            stop(signal.SIGTERM, None)

    def child(slot: int, ready: int | None) -> None:
        """Never returns. A worker keeps the stop signals blocked until `_serve_worker` defers them."""
        code = 1
        try:
            if slot < 0:  # holds no key: the default actions are fine until its loop handles them
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
                from xks_proxy.process import sidecar

                sidecar.run(config, audit_rx, metrics_sock, tls=not plain_http, ready=ready)
            else:
                up = partial(_report_ready, ready) if ready is not None else lambda: None
                asyncio.run(_serve_worker(config, sock, plain_http, replace(shared, admin=slot == 0), up))
            code = 0
        except XksError as exc:
            log.error("worker cannot start: %s", exc.message)
            code = EXIT_CANNOT_START
        except ConfigError as exc:
            log.error("worker cannot start: configuration error: %s", exc)
            code = EXIT_CANNOT_START
        except BaseException:
            log.exception("%s failed", "sidecar" if slot < 0 else "worker")
        finally:
            os._exit(code)

    def signal_workers(signum: int) -> None:
        for pid, slot in list(children.items()):
            if slot >= 0:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        signal_workers(signal.SIGTERM)
        if not any(slot >= 0 for slot in children.values()):
            stop_sidecar()

    def stop_sidecar() -> None:
        """Once the workers are gone, the sidecar writes what is left of the audit records and stops."""
        for pid, slot in list(children.items()):
            if slot < 0:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, _frame: signal_workers(signal.SIGHUP))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    if audit_rx is not None or metrics_sock is not None:
        # The sidecar is up before the workers start: their start (HSM logins above all) then
        # does not overlap with it, and the metrics endpoint answers as soon as workers serve.
        ready_r, ready_w = os.pipe()
        spawn(-1, ready_w)
        os.close(ready_w)
        select.select([ready_r], [], [], 5.0)
        os.close(ready_r)
    # Worker 0 alone first: its start is the one PIN attempt (a refused PIN is never tried by
    # another process); the others log in only once it serves.
    first_up = False
    if not stopping:
        ready_r, ready_w = os.pipe()
        spawn(0, ready_w)
        os.close(ready_w)
        first_up = _wait_ready(ready_r)
    if first_up:
        announce()
        if metrics_sock is not None:
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, metrics_sock.getsockname()[1])
        for slot in range(1, workers):
            if not stopping:
                spawn(slot)
    elif not stopping:  # worker 0 said why in one line; nothing is retried, nothing else starts
        stopping = failed = True  # the sidecar is stopped below once worker 0 is reaped
    try:
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            slot = children.pop(pid, None)
            if metrics_dir is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid, metrics_dir)
            if slot is None:
                continue
            if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START and not stopping:
                log.error("a restarted worker cannot start; stopping all workers (not retrying)")
                stop(signal.SIGTERM, None)
                failed = True
            if stopping and not any(s >= 0 for s in children.values()):
                stop_sidecar()
            elif not stopping:
                log.error("%s %d exited (status %d); starting a new one", "sidecar" if slot < 0 else "worker", pid, status)
                time.sleep(0.5)  # no hot crash loop
                spawn(slot)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return EXIT_CANNOT_START if failed else 0
