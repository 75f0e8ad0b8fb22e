"""The supervisor's signals as bytes on a pipe it selects on, and the ready pipe of a starting child.

Apart from supervisor.py because both are small and self-contained: `SignalPipe` says why a
supervisor must never wait for a signal in a blocking call.
"""

from __future__ import annotations

import os
import signal


def _noop(_signum: int, _frame: object) -> None:
    """A Python-level handler is what makes CPython's C handler write to the wakeup fd."""


class SignalPipe:
    """The supervisor's signals as bytes on a pipe, read where it waits.

    CPython runs a Python signal handler only between bytecodes of the main thread. A signal
    that lands after the last such check and before a blocking call (os.wait, os.read) is
    recorded, but nothing interrupts the call, and the handler waits for the call to return: with
    idle workers, never (the supervisor then hung on a stop, about once in 100 on a busy machine). With
    `set_wakeup_fd` the C-level handler also writes the signal's number to this pipe, and every
    wait of the supervisor is a select() that includes the pipe: a signal that came before the
    wait or during it is seen either way. The Python handlers do nothing; the supervisor acts on
    the bytes in its one thread, between waits, never half-way through a fork or a reap.
    """

    def __init__(self, signums: frozenset[signal.Signals]) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _noop)

    def read(self) -> list[int]:
        """The signals received since the last read, in order (each one byte)."""
        data = b""
        while chunk := self._read_some():
            data += chunk
        return list(data)

    def _read_some(self) -> bytes:
        try:
            return os.read(self.fd, 512)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        """The handlers stay no-ops: a second SIGTERM while the supervisor exits must not turn exit 0 into death by signal."""
        signal.set_wakeup_fd(self._old_fd)
        os.close(self.fd)
        os.close(self._write_fd)

    def close_in_child(self) -> None:
        """A forked child's signals are its own: written here they would stop the supervisor."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.fd)
        os.close(self._write_fd)


def report_ready(ready: int) -> None:
    """In a child: tell the supervisor waiting on this pipe that it serves (EOF would say it died)."""
    os.write(ready, b"+")
    os.close(ready)
