"""Listening sockets, bound before the server says or makes anything.

A port in use or an address that is not this machine's is one `ListenError` line for the
operator (no traceback, no claim of success before it), whichever listener it is: the XKS port,
the metrics port or the admin port.
"""

from __future__ import annotations

import errno
import socket


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
