"""The supervisor's helper process when serving with several workers.

Workers are separate processes, but two things must stay one: the audit file (rotating one
file by size from many processes loses records) and the metrics endpoint (a scrape must count
every worker). The sidecar is the only writer of the audit file, fed by the workers one
datagram per record, and it serves the sum of the metrics the workers record into
PROMETHEUS_MULTIPROC_DIR. It holds no key and no secret. It ignores SIGINT (a Ctrl-C reaches
the whole process group); the supervisor sends SIGTERM once the workers are gone, and it then
writes what is still queued on the socket and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from xks_proxy.access import audit
from xks_proxy.config import Config
from xks_proxy.access.metrics import exposition_app, multiprocess_registry
from xks_proxy.access.mtls import TlsFiles, expiry_of_files

log = logging.getLogger("xks_proxy.sidecar")
_MAX_RECORD = 1 << 17


def run(
    config: Config, audit_socket: socket.socket | None, metrics_socket: socket.socket | None, tls: bool, ready: int | None
) -> None:
    """Serve until SIGTERM; write a byte to the `ready` pipe once serving (the supervisor waits for it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_run(config, audit_socket, metrics_socket, tls, ready))


async def _run(
    config: Config, audit_socket: socket.socket | None, metrics_socket: socket.socket | None, tls: bool, ready: int | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    writer = audit.rotating_file(config.audit) if audit_socket is not None and config.audit.path else None

    def drain() -> None:
        assert audit_socket is not None and writer is not None
        while True:
            try:
                line = audit_socket.recv(_MAX_RECORD)
            except BlockingIOError:
                return
            writer.write_lines([line.decode("utf-8", "replace")])  # a datagram is whole lines

    if writer is not None and audit_socket is not None:
        audit_socket.setblocking(False)
        loop.add_reader(audit_socket.fileno(), drain)
    runner: web.AppRunner | None = None
    if metrics_socket is not None:
        files = TlsFiles.of(config) if tls else None
        registry = multiprocess_registry(lambda: expiry_of_files(files) if files else {}, config.home)
        runner = web.AppRunner(exposition_app(registry), access_log=None)
        await runner.setup()
        await web.SockSite(runner, metrics_socket).start()
    if ready is not None:
        os.write(ready, b"+")
        os.close(ready)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGTERM)  # one stop is enough; another landing while asyncio
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # closes the loop would print a traceback
    if writer is not None and audit_socket is not None:
        loop.remove_reader(audit_socket.fileno())
        drain()
        writer.close()
    if runner is not None:
        await runner.cleanup()
