"""Running the server: one process, or a supervisor with N pre-forked workers on one socket.

With `--workers N > 1` the supervisor binds the listening socket, forks N workers that each
build their own key manager after the fork (no SQLite connection or PKCS#11 session crosses a
fork), restarts a worker that dies, and passes SIGTERM/SIGINT on for a graceful stop. Every
worker watches the vault itself, so CLI changes reach all of them within the refresh interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from dataclasses import replace

from aiohttp import web

from keymanager import create_key_manager
from xks_proxy.config import Config
from xks_proxy.errors import XksError
from xks_proxy.server import XksServer, tls_context

log = logging.getLogger("xks_proxy")
#: A worker whose key manager cannot start (a refused HSM PIN, an unreadable vault): restarting
#: it would not help, and retrying a wrong PIN can lock the HSM account. The supervisor stops.
EXIT_CANNOT_START = 3


def serve(
    config: Config, host: str | None = None, port: int | None = None, plain_http: bool = False, workers: int = 1
) -> int:
    """Serve until SIGINT/SIGTERM. HTTPS unless `plain_http` (behind a TLS-terminating balancer)."""
    ssl_context: ssl.SSLContext | None = None if plain_http else tls_context(config)
    host = host or config.server.host
    port = config.server.port if port is None else port
    sock = _listen(host, port)
    config = replace(config, server=replace(config.server, port=sock.getsockname()[1]))  # the fleet names us by it
    scheme = "http" if plain_http else "https"
    stores = ", ".join(s.uri_path for s in config.stores)
    log.info("serving %s://%s:%d for stores %s with %d worker(s)", scheme, host, sock.getsockname()[1], stores, workers)
    if workers <= 1:
        _serve_worker(config, sock, ssl_context)
        return 0
    return _supervise(config, sock, ssl_context, workers)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve_worker(config: Config, sock: socket.socket, ssl_context: ssl.SSLContext | None, admin: bool = True) -> None:
    """One serving process. `admin`: also run the admin listener (one worker has it: its port is single)."""
    key_manager = create_key_manager(config)
    app = XksServer(config, key_manager).app()
    if admin and config.admin.enabled:
        from xks_proxy import admin as admin_api

        admin_api.attach(app, config, key_manager)
    app.on_startup.append(_stop_on_first_signal)
    web.run_app(app, sock=sock, ssl_context=ssl_context, access_log=None, print=None, shutdown_timeout=10)


async def _stop_on_first_signal(app: web.Application) -> None:
    """Stop gracefully on the first SIGTERM/SIGINT and ignore the next ones.

    A worker usually gets two (from the supervisor, and from whoever signalled the process
    group: systemd, `kill -- -PGID`); aiohttp's own handler would abort the graceful cleanup on
    the second, and the key manager would not give back its unused encryption counts.
    """
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise web.GracefulExit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def _supervise(config: Config, sock: socket.socket, ssl_context: ssl.SSLContext | None, workers: int) -> int:
    children: dict[int, int] = {}  # pid -> slot
    stopping = failed = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                _serve_worker(config, sock, ssl_context, admin=slot == 0)
                code = 0
            except XksError as exc:
                log.error("worker cannot start: %s", exc.message)
                code = EXIT_CANNOT_START
            except BaseException:
                log.exception("worker failed")
            finally:
                os._exit(code)
        children[pid] = slot

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START and not stopping:
            log.error("a worker cannot start; stopping (not retrying)")
            stop(signal.SIGTERM, None)
            failed = True
            continue
        if slot is not None and not stopping:
            log.error("worker %d exited (status %d); starting a new one", pid, status)
            time.sleep(0.5)  # no hot crash loop
            spawn(slot)
    return EXIT_CANNOT_START if failed else 0
