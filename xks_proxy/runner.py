"""Running the server process: build the key manager and app, bind, serve until a signal."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from keymanager import create_key_manager
from xks_proxy.config import Config
from xks_proxy.server import XksServer, tls_context

log = logging.getLogger("xks_proxy")


def serve(config: Config, host: str | None = None, port: int | None = None, plain_http: bool = False) -> int:
    """Serve until SIGINT/SIGTERM. HTTPS unless `plain_http` (behind a TLS-terminating balancer)."""
    ssl_context: ssl.SSLContext | None = None if plain_http else tls_context(config)
    host = host or config.server.host
    port = config.server.port if port is None else port
    key_manager = create_key_manager(config)
    app = XksServer(config, key_manager).app()
    if config.admin.enabled:
        from xks_proxy import admin

        admin.attach(app, config, key_manager)
    scheme = "http" if plain_http else "https"
    stores = ", ".join(s.uri_path for s in config.stores)
    web.run_app(
        app,
        host=host,
        port=port,
        ssl_context=ssl_context,
        access_log=None,
        print=lambda _: log.info("serving %s://%s:%d for stores %s", scheme, host, port, stores),
        shutdown_timeout=10,
    )
    return 0
