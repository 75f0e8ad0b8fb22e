"""The HTTPS transport of the XKS listener: each accepted TCP connection gets TLS with the context current now.

Why the listener accepts plain TCP and starts TLS itself (`TlsSite`): asyncio fixes one
SSLContext per listening socket, and a context can never forget a CA it has loaded. Starting
TLS per connection with whichever context `mtls.TlsManager` holds now lets a new server
certificate, key or client CA bundle take effect for new connections at once, while
connections in flight keep the context they were accepted with.

A connection goes: under the connection cap (connections.py), TLS handshake, the client name
check after the handshake (mutual TLS), then aiohttp's HTTP protocol behind a `Guard`. Every
refused handshake sends OpenSSL's alert, which names the reason (`_AlertingSslProtocol`), and
the refusal is reported to the manager, which logs and counts it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from asyncio import sslproto
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from xks_proxy.access.connections import GuardedSite, Guards, Slot, peer_of

if TYPE_CHECKING:
    from xks_proxy.access.mtls import TlsManager

HANDSHAKE_TIMEOUT = 10.0

#: Names of the client certificate the handshake's name check just refused, for `handshake_refused`'s
#: line. Per thread: set and taken within one `do_handshake` call on the event loop's thread.
_refusal = threading.local()


def refused_in_handshake(names: tuple[str, ...]) -> None:
    """Called by the name check inside the handshake (mtls) as it refuses: the names go with the refusal."""
    _refusal.names = names


def _note_refusal(exc: BaseException) -> None:
    """Carry the names refused in this handshake (if it was the name check) on its exception."""
    names, _refusal.names = getattr(_refusal, "names", None), None
    if names is not None:
        try:
            exc.client_names = names  # type: ignore[attr-defined]
        except AttributeError:
            pass


class _AlertingSslProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, except that a refused handshake sends its alert before closing.

    OpenSSL writes the alert that names the reason (certificate required, unknown CA, bad
    certificate, ...) into the outgoing BIO; asyncio then closes the socket without sending it,
    and the client sees a bare close. Sent here first; the close follows as before.
    """

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            _note_refusal(handshake_exc)
            alert = self._outgoing.read()
            if alert and self._transport is not None and not self._transport.is_closing():
                self._transport.write(alert)
        super()._on_handshake_complete(handshake_exc)


#: The read buffer the TLS connections of a thread share (see `_LeanSslProtocol`): per thread,
#: since each event loop runs in one thread and every read completes within one of its callbacks.
_read_buffers = threading.local()


def _read_buffer(size: int) -> tuple[bytearray, memoryview]:
    """This thread's shared read buffer of `size` bytes, made on first use."""
    pair: tuple[bytearray, memoryview] | None = getattr(_read_buffers, "pair", None)
    if pair is None or len(pair[0]) != size:
        buffer = bytearray(size)
        pair = _read_buffers.pair = (buffer, memoryview(buffer))
    return pair


class _LeanSslProtocol(_AlertingSslProtocol):
    """asyncio's TLS protocol reading into one 16 KiB buffer per thread instead of 256 KiB per connection.

    asyncio gives each connection its own `max_size` bytes to read the socket into (256 KiB,
    zero-filled): 1,000 idle connections would cost 256 MB, and even 16 KiB each was a third
    of what an idle TLS connection cost (issue 16). The bytes stay there only for an instant:
    the socket transport calls `get_buffer`, `recv_into` and `buffer_updated` in one callback,
    and `buffer_updated` copies them into this connection's incoming BIO before anything else
    runs, so every connection of the event loop's thread can read into the same buffer.
    16 KiB reads: a TLS record is at most 16 KiB plus a few bytes, XKS requests are a few KiB,
    and what a read brings stays in the incoming BIO, whose memory OpenSSL keeps at its largest.
    """

    max_size = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ssl_buffer, self._ssl_buffer_view = _read_buffer(self.max_size)  # asyncio's own is freed here

    def get_buffer(self, n: int) -> memoryview:
        return self._ssl_buffer_view

    def _do_handshake(self) -> None:
        """No handshake step before the client's first bytes: a server can only wait for its ClientHello.

        asyncio takes one at once when the connection is made, and OpenSSL's answer (want read)
        costs it its read buffer and handshake state, about 40 KB a connection, kept until a
        byte arrives: what a stranger's connections that never send one would hold. The
        handshake deadline counts from the connection all the same.
        """
        if self._server_side and not self._incoming.pending:
            return
        super()._do_handshake()


async def _start_tls(
    loop: asyncio.AbstractEventLoop, raw: asyncio.Transport, protocol: asyncio.BaseProtocol, context: ssl.SSLContext
) -> asyncio.Transport:
    """`loop.start_tls(server_side=True)` (CPython's own steps) with `_LeanSslProtocol`."""
    waiter = loop.create_future()
    tls = _LeanSslProtocol(
        loop, protocol, context, waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT, call_connection_made=False
    )
    raw.pause_reading()
    raw.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, raw)
    resume = loop.call_soon(raw.resume_reading)
    try:
        await waiter
    except BaseException:
        raw.close()
        made.cancel()
        resume.cancel()
        raise
    return tls._app_transport  # type: ignore[no-any-return]


class _TlsConnection(asyncio.Protocol):
    """One accepted TCP connection: under the cap, TLS with the context current now, the name check, then HTTP."""

    def __init__(self, tls: TlsManager, guards: Guards, http: Callable[[], asyncio.Protocol], loop: asyncio.AbstractEventLoop) -> None:
        self._tls = tls
        self._guards = guards
        self._http = http
        self._loop = loop
        self._pending: list[bytes] = []
        self._closed = False
        self._slot: Slot | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._slot = self._guards.accept(peer_of(transport))
        if self._slot is None:  # over the cap: closed before a handshake costs anything
            transport.abort()
            return
        transport.pause_reading()  # the ClientHello waits in the kernel until start_tls takes over
        self._task = self._loop.create_task(self._start(transport, self._slot))

    async def _start(self, raw: asyncio.Transport, slot: Slot) -> None:
        handed_over = False
        try:
            handed_over = await self._handshake(raw, slot)
        finally:
            if not handed_over:
                slot.release()

    async def _handshake(self, raw: asyncio.Transport, slot: Slot) -> bool:
        """True once the connection belongs to its guard (which then releases the slot)."""
        peer = peer_of(raw)
        loaded = self._tls.current
        try:
            tls = await _start_tls(self._loop, raw, self, loaded.context)
        except asyncio.CancelledError:
            raw.abort()
            raise
        except Exception as exc:  # the connection is closed
            self._tls.handshake_refused(peer, exc)
            return False
        if self._closed or tls is None or tls.is_closing():
            return False
        if loaded.mutual and not self._tls.name_allowed(tls.get_extra_info("peercert"), peer):
            self._pending.clear()
            tls.abort()
            return False
        guard = self._guards.guard(self._http(), slot)
        tls.set_protocol(guard)
        guard.connection_made(tls)
        for chunk in self._pending:
            guard.data_received(chunk)
        self._pending.clear()
        return True

    def data_received(self, data: bytes) -> None:
        """Decrypted bytes that arrive before the name check: held, never parsed unless it passes."""
        self._pending.append(data)

    def eof_received(self) -> bool:
        self._closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._pending.clear()


class TlsSite(GuardedSite):
    """An aiohttp site that serves HTTPS through `_TlsConnection` (see the module docstring)."""

    scheme = "https"

    def __init__(
        self, runner: web.BaseRunner, tls: TlsManager, guards: Guards, host: str = "127.0.0.1", port: int = 0,
        sock: socket.socket | None = None,
    ) -> None:  # fmt: skip
        super().__init__(runner, guards, host, port, sock)
        self._tls = tls

    def connection(self, http: Callable[[], asyncio.Protocol], loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        return _TlsConnection(self._tls, self.guards, http, loop)
