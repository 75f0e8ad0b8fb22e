"""The sealed responder: what a proxy whose vault is sealed answers, until `xks-proxy unseal`.

The supervisor runs it as a child process on the listening socket the workers will use (the
same TLS, connection cap and header/idle deadlines as a worker), from its start until the
unseal, and again after `xks-proxy seal`. It holds no key and no credential secret
(`control.sealed_copy`), so it cannot verify SigV4 and does not try: every answer here is one
an unauthenticated caller may see, and none touches a key.

- `GET /ping` -> 503 `sealed`: a load balancer keeps the proxy out of rotation.
- `POST /<prefix>/kms/xks/v1/health` -> 200, GetHealthStatus with its one ekmFleetDetails entry
  UNAVAILABLE: KMS's connect fails with XKS_PROXY_NOT_REACHABLE and its health check reports the
  store unhealthy (xks_proxy/conformance/outcomes.py `connect`).
- every other API path of a configured store -> 503 DependencyTimeoutException: KMS retries it,
  and a caller's Encrypt/Decrypt fails with DependencyTimeoutException, the error that says
  "try again" (outcomes.py `crypto`), not one that says the key or the request is wrong.
- anything else -> 404 InvalidUriPathException, or 405 for a non-POST, as the server answers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any, Callable

import orjson
from aiohttp import web

from xks_proxy.access.connections import GuardedSite, Guards, redact_aiohttp_logs
from xks_proxy.access.metrics import NoMetrics
from xks_proxy.access.mtls import TlsError, TlsManager
from xks_proxy.access.tls_transport import TlsSite
from xks_proxy.config import Config, ConfigError
from xks_proxy.errors import DependencyTimeoutException, InvalidUriPathException, MethodNotAllowed, XksError
from xks_proxy.protocol import API_PATH
from xks_proxy.server import LIVENESS_PATH, error_response

log = logging.getLogger("xks_proxy.seal")
SEALED_MESSAGE = "the key store is sealed; retry"


def health_body(config: Config) -> dict[str, object]:
    """GetHealthStatus while sealed: one EKM entry, UNAVAILABLE."""
    server = config.server
    return {
        "xksProxyFleetSize": 1,
        "xksProxyVendor": server.vendor,
        "xksProxyModel": server.model,
        "ekmVendor": "xks-proxy",
        "ekmFleetDetails": [{"id": "seal", "model": f"{config.seal} seal: sealed", "healthStatus": "UNAVAILABLE"}],
    }


def app(config: Config, wrap: Callable[[Any], Any] = lambda handler: handler) -> web.Application:
    """What a sealed proxy answers; `wrap` puts the listener's connection guard around the handler."""
    prefixes = {store.prefix for store in config.stores}
    health = orjson.dumps(health_body(config))

    async def handle(request: web.Request) -> web.StreamResponse:
        """Unauthenticated by necessity: the credentials that would verify SigV4 are sealed too."""
        path = request.rel_url.raw_path
        if path == LIVENESS_PATH and request.method in ("GET", "HEAD"):
            return web.Response(status=503, text="sealed\n")
        match = API_PATH.match(path)
        exc: XksError
        if match is None or (match["prefix"] or "") not in prefixes:
            exc = InvalidUriPathException("no XKS API at this path")
        elif request.method != "POST":
            exc = MethodNotAllowed(f"{request.method} is not supported here; XKS API calls use POST")
        elif match["health"]:
            return web.Response(body=health, content_type="application/json")
        else:
            exc = DependencyTimeoutException(SEALED_MESSAGE)
        return error_response(exc)

    application = web.Application(client_max_size=config.limits.max_body_bytes)
    application.router.add_route("*", "/{tail:.*}", wrap(handle))
    return application


async def serve_sealed(config: Config, sock: socket.socket, plain_http: bool, ready: Callable[[], object]) -> None:
    """Answer sealed on `sock` until SIGTERM/SIGINT (entered with them blocked, as a worker is)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # nothing to reload: the unseal re-reads config.toml
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        tls = None if plain_http else TlsManager(config, NoMetrics())
    except TlsError as exc:
        raise ConfigError(str(exc)) from None
    guards = Guards(config.server)
    application = app(config, guards.guarding)
    runner = web.AppRunner(
        application, access_log=None, shutdown_timeout=2, logger=redact_aiohttp_logs(),
        keepalive_timeout=config.server.idle_timeout_seconds, lingering_time=2.0,
    )  # fmt: skip
    await runner.setup()
    try:
        host, port = config.server.host, sock.getsockname()[1]
        site = TlsSite(runner, tls, guards, host, port, sock) if tls else GuardedSite(runner, guards, host, port, sock)
        await site.start()
        ready()
        await stop.wait()
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
