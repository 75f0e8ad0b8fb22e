"""Writing log lines without a syscall per request: batches, a size-rotated file, a logging handler.

Under load a proxy writes one access line and one audit record per request. Done the usual
way (a LogRecord, a format, a write and a flush each) that was a third of a worker's CPU. Here
the event loop only appends to a list and one thread writes each list in a single call.

`serve` writes stderr as JSON objects, one a line (`--log-format json`, its default, for log
shippers), or as text for a person (`--log-format text`, the demo's default); either way every
line starts with the same UTC time to the millisecond. The per-request access record is the
audit record's own JSON, handed to the batch as it is (`access_line`): no LogRecord per request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import orjson

from keymanager.base import iso_ms


class LineBatch:
    """Lines gathered by the event loop and written by one thread, a batch at a time.

    Writing (and rotating) per record cost a syscall, a seek and a LogRecord per request, on a
    thread contending for the GIL: a third of a worker's CPU under load. Here the event loop only
    appends to a list; every `interval` seconds the thread takes the list and hands it to
    `write` joined, one call per batch. Records reach the file within `interval`; `close()`
    writes what is left.
    """

    def __init__(self, write: Callable[[list[str]], None], interval: float = 0.05) -> None:
        self._write = write
        self._lines: list[str] = []
        self._interval = interval
        self._start()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked worker inherits the pending lines (the parent writes those) but not the thread."""
        self._lines = []
        self._start()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xks-log-batch", daemon=True)
        self._thread.start()

    def add(self, line: str) -> None:
        self._lines.append(line)  # one bytecode-level append: safe against the thread's swap

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            try:
                self._write(lines)
            except Exception:  # a full disk must not kill the thread; say so once per batch
                logging.getLogger("xks_proxy").exception("could not write %d log record(s)", len(lines))

    def _run(self) -> None:
        # Process signals are the main thread's business. (Whichever thread takes one, the
        # supervisor and the event loops learn of it through their wakeup fd; see supervisor.py.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


class RotatingFile:
    """An append-only 0600 file rotated by size (path.1 ... path.N), for the one process writing it."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    def write_lines(self, lines: list[str]) -> None:
        """Append whole lines, rotating first whenever the next line would pass max_bytes."""
        chunk: list[bytes] = []
        pending = 0
        for line in lines:
            data = (line + "\n").encode()
            if self._size + pending + len(data) > self.max_bytes and (self._size or pending):
                self._append(b"".join(chunk))
                chunk, pending = [], 0
                self._rotate()
            chunk.append(data)
            pending += len(data)
        self._append(b"".join(chunk))

    def _append(self, data: bytes) -> None:
        if data:
            os.write(self._fd, data)
            self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)



class BatchHandler(logging.Handler):
    """A logging handler for stderr that writes in batches; warnings and errors go out at once.

    Keeps logging's levels, names and formats (and tests' capture), drops the per-record
    syscall. A crash can lose at most one interval of INFO lines, never a warning or error.
    """

    def __init__(self, stream_fd: int | None = None, interval: float = 0.05) -> None:
        super().__init__()
        fd = sys.stderr.fileno() if stream_fd is None else stream_fd
        self._write = lambda lines: os.write(fd, ("\n".join(lines) + "\n").encode("utf-8", "replace"))
        self._batch = LineBatch(self._write, interval)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._batch.flush()
            self._write([line])
        else:
            self._batch.add(line)

    def add_line(self, line: str) -> None:
        """A line already formatted (the access record): batched like an INFO record."""
        self._batch.add(line)

    def close(self) -> None:
        self._batch.close()
        super().close()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message (and exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": iso_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": os.getpid(),  # which worker: records do not carry it (logging.logProcesses is off)
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message`, the time as in the JSON lines (UTC, milliseconds)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return iso_ms(record.created)


_access: Callable[[str], None] | None = None  # set by setup_stderr when the access record is wanted on stderr
access_log = logging.getLogger("xks_proxy.access")


def setup_stderr(level: str, form: str) -> None:
    """The serving process's stderr: batched, JSON or text, at `level`."""
    global _access
    # Records never show thread, process or caller: don't compute them per record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # the stdlib's documented switch for findCaller
    handler = BatchHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    if not access_log.isEnabledFor(logging.INFO):
        _access = None
    elif form == "json":
        _access = handler.add_line
    else:
        _access = lambda line: handler.add_line(f"{iso_ms(time.time())} INFO xks_proxy.access {line}")  # noqa: E731


class _NotProxyWide(logging.Filter):
    """Drops the records marked `extra=PROXY_WIDE` (keymanager/base.py): another worker writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "proxy_wide", False)


def one_worker_says_proxy_wide() -> None:
    """In every worker but the first: a reload or vault change is logged once per proxy, not once per worker."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NotProxyWide())


def access_line(line: str) -> None:
    """The request's record (a JSON object) on stderr: straight to the batch when serving, else through logging."""
    if _access is not None:
        _access(line)
    elif access_log.isEnabledFor(logging.INFO):
        access_log.info("%s", line)
