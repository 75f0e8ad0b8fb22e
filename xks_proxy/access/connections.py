"""Open connections of the XKS listener: a per-worker cap, and deadlines for what a client owes.

aiohttp times nothing out while it waits for a request's headers, and its idle keep-alive
timeout is an hour by default. Anyone who can reach the port (no credential needed) could
then hold connections, and the memory behind them, for as long as they like. Here every
connection is in one of three states, each with a deadline:

- idle (a keep-alive connection between requests): closed after `idle_timeout_seconds`;
- headers (bytes of a request arrived, its handler has not started yet; a new connection is
  here from its start, since a client connects to send a request): closed when the headers are
  not complete `header_timeout_seconds` after the request's first byte;
- busy (the handler runs): no deadline here; the XKS handler reads the body under
  `body_timeout_seconds` itself (server.py), and then the key manager has its own timeouts.

`Guard` is a thin protocol between the transport (TLS or plain TCP) and aiohttp's request
handler; the `middleware` tells it when a handler starts and ends. A connection over
`max_connections` is closed at accept, before its TLS handshake costs anything.

A state change only records the state and its deadline (a float, `time.monotonic()`): no timer
per connection or per request. One sweep per worker (`SWEEP_SECONDS`, a single `call_later`
re-armed while connections are open) closes every connection whose deadline has passed. So a
deadline is kept to the sweep's period: a connection is closed between its deadline and
`SWEEP_SECONDS` after it (plus any event loop lag), never before. A sweep reads one float per
open connection (measured: about 20 us at 1,000 connections, 200 us at 10,000).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from xks_proxy.config import ServerConfig

log = logging.getLogger("xks_proxy.connections")

_IDLE, _HEADERS, _BUSY = "idle", "headers", "busy"
#: How often a worker's sweep closes the connections past their deadline: the deadlines' precision.
SWEEP_SECONDS = 0.25
_NEVER = math.inf  # the deadline of a busy connection
_now = time.monotonic  # the clock of every deadline and of the sweep (not the loop's: any loop will do)
#: At most one "connection cap reached" line per this many seconds: a flood must not flood the log.
_CAP_LOG_INTERVAL = 60.0


class Slot:
    """One accepted connection's place under the cap; released exactly once, whoever sees the end."""

    __slots__ = ("_guards", "_held")

    def __init__(self, guards: "Guards") -> None:
        self._guards = guards
        self._held = True
        guards.open += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._guards.open -= 1
            self._guards.shrunk()


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing elsewhere: the memory of closed connections goes back to the system.

    Without it glibc keeps the heap pages that 1,000 closed connections used (measured: 92 of
    92 MB kept); a stranger could then ratchet the process's memory up by waves of connections.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


_trim = _malloc_trim()
#: Trim once this many connections have closed since the last trim (a trim costs a few ms).
_TRIM_AFTER = 200


class Guards:
    """This worker's open connections: the cap, the deadlines, and the request hooks."""

    def __init__(self, settings: ServerConfig) -> None:
        self.settings = settings
        self.header_timeout = settings.header_timeout_seconds
        self.idle_timeout = settings.idle_timeout_seconds
        self.open = 0
        #: Every guarded connection, by its aiohttp handler (for the middleware); the sweep reads them all.
        self._by_handler: dict[asyncio.BaseProtocol, Guard] = {}
        self._sweeping: asyncio.TimerHandle | None = None
        self._cap_logged = -_CAP_LOG_INTERVAL
        self._closed_since_trim = 0

    def accept(self, peer: str) -> Slot | None:
        """A slot for a new connection, or None at the cap (the caller closes it)."""
        if self.open < self.settings.max_connections:
            return Slot(self)
        now = time.monotonic()
        if now - self._cap_logged >= _CAP_LOG_INTERVAL:
            self._cap_logged = now
            log.warning(
                "connection cap reached (%d open in this worker, server.max_connections): closing new connections, "
                "e.g. from %s", self.open, peer,
            )  # fmt: skip
        return None

    def shrunk(self) -> None:
        """A connection closed: after a wave of them (or when none is left), give their memory back."""
        self._closed_since_trim += 1
        if self._closed_since_trim >= _TRIM_AFTER or (self.open == 0 and self._closed_since_trim > 1):
            self._closed_since_trim = 0
            asyncio.get_running_loop().call_later(1.0, _trim)  # once the closed connections are collected

    def guard(self, http: asyncio.Protocol, slot: Slot) -> "Guard":
        guard = Guard(self, http, slot)
        self._by_handler[http] = guard
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        return guard

    def forget(self, http: asyncio.BaseProtocol) -> None:
        self._by_handler.pop(http, None)

    def _sweep(self) -> None:
        """Close the connections past their deadline; again in SWEEP_SECONDS while any is open."""
        now = _now()
        expired = [guard for guard in self._by_handler.values() if guard._deadline <= now]
        for guard in expired:  # aborting calls connection_lost later: the dict is not changed while read
            guard._expire()
        self._sweeping = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep) if self._by_handler else None

    def guarding(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """`handler` as the listener's request handler: no header deadline while it runs; idle again after it."""

        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            guard = self._by_handler.get(request.protocol)
            if guard is None:  # a connection that did not come through a guarded site
                return await handler(request)
            guard.busy()
            try:
                return await handler(request)
            finally:
                guard.done()

        return guarded


class Guard(asyncio.Protocol):
    """Forwards everything to aiohttp's handler; records the state and deadline the sweep closes it by."""

    __slots__ = ("_guards", "_http", "_slot", "_transport", "_state", "_deadline", "_next_since")

    def __init__(self, guards: Guards, http: asyncio.Protocol, slot: Slot) -> None:
        self._guards = guards
        self._http = http
        self._slot = slot
        self._transport: asyncio.Transport | None = None
        self._state = _HEADERS
        #: When the sweep closes this connection (`_now()` clock); _NEVER while busy or closing.
        self._deadline = _NEVER
        #: When the first byte of a next request arrived while the handler was busy (pipelining).
        self._next_since: float | None = None

    # --- transport side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._http.connection_made(transport)
        self._deadline = _now() + self._guards.header_timeout  # a client connects to send a request

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _IDLE:
            self._state = _HEADERS
            self._deadline = _now() + self._guards.header_timeout
        elif state is _BUSY and self._next_since is None:
            self._next_since = _now()
        self._http.data_received(data)

    def eof_received(self) -> bool | None:
        return self._http.eof_received()

    def pause_writing(self) -> None:
        self._http.pause_writing()

    def resume_writing(self) -> None:
        self._http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = _NEVER
        self._slot.release()
        self._guards.forget(self._http)
        self._http.connection_lost(exc)

    # --- request side (the middleware) ---

    def busy(self) -> None:
        self._state = _BUSY
        self._deadline = _NEVER
        self._next_since = None

    def done(self) -> None:
        if self._next_since is not None:  # the next request started meanwhile: its clock runs from its first byte
            self._state = _HEADERS
            self._deadline = self._next_since + self._guards.header_timeout
        else:
            self._state = _IDLE
            self._deadline = _now() + self._guards.idle_timeout

    # --- deadlines ---

    def _expire(self) -> None:
        """The sweep found the deadline passed in the idle or headers state: close (abort: nothing is owed)."""
        self._deadline = _NEVER  # once: the sweeps until connection_lost pass it by
        if self._state is not _BUSY and self._transport is not None:
            log.debug("closing a connection: %s", "idle too long" if self._state is _IDLE else "headers not complete in time")
            self._transport.abort()


def peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class PlainConnection(asyncio.Protocol):
    """An accepted plain-HTTP connection (`serve --http`): under the cap, then guarded."""

    def __init__(self, guards: Guards, http: Callable[[], asyncio.Protocol]) -> None:
        self._guards = guards
        self._http = http

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        slot = self._guards.accept(peer_of(transport))
        if slot is None:
            transport.abort()
            return
        guard = self._guards.guard(self._http(), slot)
        transport.set_protocol(guard)
        guard.connection_made(transport)


class GuardedSite(web.BaseSite):
    """An aiohttp site whose connections go through `connection()` (plain HTTP here; TLS in tls_transport.TlsSite).

    Listens on `sock` when given (a socket the supervisor bound and shares with its workers),
    else binds `host`:`port` itself.
    """

    scheme = "http"

    def __init__(
        self, runner: web.BaseRunner, guards: Guards, host: str = "127.0.0.1", port: int = 0, sock: Any = None
    ) -> None:
        super().__init__(runner, backlog=2048)
        self._host = host
        self._port = port
        self._sock = sock
        self.guards = guards

    @property
    def name(self) -> str:
        return f"{self.scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    def connection(self, http: Callable[[], asyncio.Protocol], loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        return PlainConnection(self.guards, http)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        http = self._runner.server
        assert http is not None
        where: dict[str, Any] = {"sock": self._sock} if self._sock else {"host": self._host, "port": self._port, "reuse_address": True}
        self._server = await loop.create_server(lambda: self.connection(http, loop), backlog=self._backlog, **where)


# --- what aiohttp logs ------------------------------------------------------------------------------

#: aiohttp's request handler logs through this logger (AppRunner(logger=...)), not "aiohttp.server".
http_log = logging.getLogger("xks_proxy.http")
_AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "aiohttp.client", "aiohttp.websocket")


class NoRequestBytes(logging.Filter):
    """Reduce an exception in aiohttp's log records to its type name.

    aiohttp's parser errors quote the bytes they stopped at, and whatever followed them (a
    request body, plaintext included) in the exception's text, which its handler logs with a
    traceback. A malformed request is the client's fault, and anyone can send one: it is
    logged at INFO, as one line, without a byte of the request.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        record.msg = f"{record.getMessage()}: {type(exc).__name__}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_filter = NoRequestBytes()


def redact_aiohttp_logs() -> logging.Logger:
    """Filter every aiohttp logger (idempotent); returns the logger to give aiohttp's request handler."""
    for name in (http_log.name, *_AIOHTTP_LOGGERS):
        logging.getLogger(name).addFilter(_filter)
    return http_log
