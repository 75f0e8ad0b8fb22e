"""The control socket: `<home>/control.sock`, 0600, for the proxy's owner (and root) only.

`xks-proxy unseal|seal` hand their one request line to the running proxy here, never over the
network and never through argv or the environment. The supervisor drives it from its one
select() loop (`fds`, `timeout`, `service`): every socket is non-blocking, a request is at most
`control.MAX_REQUEST` bytes and must arrive within `READ_TIMEOUT` seconds, so a stalled or
hostile client holds up no signal, no restart and no other client. Each connection is checked
with SO_PEERCRED at accept: another uid is answered one refusal line and closed unread.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from xks_proxy.process.control import MAX_REQUEST, encode
from xks_proxy.process.sockets import ListenError

log = logging.getLogger("xks_proxy.seal")
CONTROL_SOCKET = "control.sock"
READ_TIMEOUT = 2.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED: what the kernel says, not the client)."""
    _pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(uid)


class ControlChannel:
    """The listening control socket and the requests in progress on it; `answer` turns a line into a reply."""

    def __init__(self, home: Path, answer: Callable[[bytes], dict[str, Any]]) -> None:
        self.path = home / CONTROL_SOCKET
        self._answer = answer
        self._clients: dict[int, _Client] = {}
        self._listener = _bind(self.path)
        self._owner = os.getpid()

    def fds(self) -> list[int]:
        return [self._listener.fileno(), *self._clients]

    def timeout(self) -> float | None:
        """Seconds until the next client's deadline, for the select() that waits on `fds`."""
        if not self._clients:
            return None
        return max(0.0, min(c.deadline for c in self._clients.values()) - time.monotonic())

    def service(self, readable: Collection[int]) -> None:
        """Accept, read, answer what is complete, and close what is over its deadline."""
        if self._listener.fileno() in readable:
            self._accept()
        for fd in [fd for fd in self._clients if fd in readable]:
            self._read(fd)
        now = time.monotonic()
        for fd in [fd for fd, c in self._clients.items() if c.deadline <= now]:
            self._finish(fd, {"error": f"no complete request line within {READ_TIMEOUT:g} s"})

    def close(self) -> None:
        """Close every socket; the supervisor (only) removes the socket file."""
        for fd in list(self._clients):
            self._clients.pop(fd).sock.close()
        self._listener.close()
        if os.getpid() == self._owner:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, ...: try again at the next wake-up
                log.warning("control socket: cannot accept: %s", exc)
                return
            uid = peer_uid(sock)
            if uid not in (os.getuid(), 0):
                log.warning("control socket: refused a connection from uid %d (it serves uid %d and root only)", uid, os.getuid())
                _reply(sock, {"error": f"refused: this proxy's control socket serves uid {os.getuid()} and root only"})
                continue
            sock.setblocking(False)
            self._clients[sock.fileno()] = _Client(sock, time.monotonic() + READ_TIMEOUT)

    def _read(self, fd: int) -> None:
        client = self._clients[fd]
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1 - len(client.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        client.data += chunk
        line, newline, _ = bytes(client.data).partition(b"\n")
        if newline or (not chunk and line):
            self._finish(fd, self._reply_to(line))
        elif len(client.data) > MAX_REQUEST:
            self._finish(fd, {"error": f"the request is over {MAX_REQUEST} bytes"})
        elif not chunk:
            self._finish(fd, None)

    def _reply_to(self, line: bytes) -> dict[str, Any]:
        try:
            return self._answer(line)
        except Exception:  # the traceback names no share: requests are never formatted into messages
            log.exception("control socket: the request failed")
            return {"error": "internal error; see the proxy log"}

    def _finish(self, fd: int, reply: dict[str, Any] | None) -> None:
        client = self._clients.pop(fd)
        client.data[:] = b"\0" * len(client.data)  # the request held a share or passphrase
        if reply is None:
            client.sock.close()
        else:
            _reply(client.sock, reply)


def _reply(sock: socket.socket, reply: dict[str, Any]) -> None:
    """Send the (small) reply line and close; a client gone meanwhile is no error of ours."""
    try:
        sock.settimeout(READ_TIMEOUT)
        sock.sendall(encode(reply))
    except OSError:
        pass
    finally:
        sock.close()


def _bind(path: Path) -> socket.socket:
    """A 0600 listening socket at `path`; a stale one of a dead proxy is replaced, a live one refuses."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise ListenError(f"cannot use {path}: {exc.strerror}") from None
            path.unlink(missing_ok=True)  # no proxy answers: left by one that was killed
        else:
            raise ListenError(f"{path}: another xks-proxy serves this home already")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no instant in which another uid could connect
    try:
        sock.bind(str(path))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.setblocking(False)
    return sock
