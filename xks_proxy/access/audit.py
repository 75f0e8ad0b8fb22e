"""The audit log: one JSON object per line, to a file with size-based rotation.

Every XKS request writes one record (the server builds it: who asked, for which key, what
happened, how long it took; never data or secrets). Other parts of the proxy (the admin API)
record their actions with `audit({...})`.

In the server, the event loop only appends each record to a list; a thread writes the list
every 50 ms in one call (`LineBatch`), so neither a slow disk nor a syscall per record stalls
requests. The file and its rotated copies are 0600.

With several worker processes, rotating one file from many processes would lose records, so
workers forward their batches as datagrams of whole lines to the supervisor's sidecar, the
only writer of the file (`AuditLog(config, forward_to=socket)` in a worker, `rotating_file`
in the sidecar).
A CLI process (key lifecycle, credentials, stores) appends its records with `append_only`: no
rotation (the server's job), and O_APPEND on both sides keeps whole lines.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import orjson

from xks_proxy.config import AuditConfig, ConfigError
from xks_proxy.process.logsink import LineBatch, RotatingFile

logger = logging.getLogger("xks_proxy.audit")
logger.propagate = False
logger.setLevel(logging.INFO)

#: Caller-supplied strings are cut to this length so a huge field cannot bloat the log.
MAX_FIELD = 2048

_sinks = 0  # open AuditLogs; records are built only when there is somewhere to put them
_appender: logging.Handler | None = None
_batch: "LineBatch | None" = None  # the server's batched sink, when one is open
_DATAGRAM = 60_000  # bytes of lines per datagram to the sidecar (it reads up to 128 KiB)


def enabled() -> bool:
    return _sinks > 0


def audit(event: dict[str, Any]) -> None:
    """Write one audit record. Adds `time` (UTC, ISO 8601, milliseconds) unless the event has one."""
    if not _sinks:
        return
    if "time" not in event:
        event = {"time": now_iso(), **event}
    write_line(orjson.dumps(event).decode())


def write_line(line: str) -> None:
    """Write an already-serialized record (the server's hot path serializes once for two logs)."""
    if _batch is not None:
        _batch.add(line)
    elif _sinks:
        logger.info("%s", line)


def forward_lines(sock: socket.socket, lines: list[str]) -> None:
    """Send lines to the sidecar in datagrams of whole lines, each well under its receive size."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) + 1 > _DATAGRAM:
            sock.send("\n".join(chunk).encode())
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk:
        sock.send("\n".join(chunk).encode())


_second: tuple[int, str] = (-1, "")  # (a second since the epoch, its text)
_milli: tuple[int, str] = (-1, "")  # (a millisecond since the epoch, the whole timestamp)


def now_iso() -> str:
    """UTC time with milliseconds. The formatted second is reused (strftime per request was 2% of a
    worker), and so is the whole text within a millisecond (several requests share one under load)."""
    global _second, _milli
    ms = int(time.time() * 1000)
    if _milli[0] == ms:
        return _milli[1]
    whole = ms // 1000
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    text = f"{_second[1]}.{ms % 1000:03d}Z"
    _milli = (ms, text)
    return text


def clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."


def rotating_file(config: AuditConfig) -> RotatingFile:
    """The audit file, for the one process that writes it. A file that cannot be written stops the start."""
    assert config.path is not None
    try:
        config.path.parent.mkdir(parents=True, exist_ok=True)
        return RotatingFile(config.path, config.max_bytes, config.backups)
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot write {config.path}: {exc.strerror}") from None


class _PrivateFileHandler(logging.FileHandler):
    def _open(self):  # type: ignore[no-untyped-def]
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def append_only(config: AuditConfig) -> None:
    """Audit this (short-lived, CLI) process's records to the audit file, appended synchronously."""
    global _appender, _sinks
    if config.path is None or _appender is not None:
        return
    try:
        config.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot write {config.path}: {exc.strerror}") from None
    _appender = _PrivateFileHandler(config.path, mode="a", encoding="utf-8", delay=True)  # created on first record
    _appender.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_appender)
    _sinks += 1


class _IntoBatch(logging.Handler):
    """Records other layers write on the audit logger (keymanager's key lifecycle: an auto-rotation) join the batch."""

    def __init__(self, batch: LineBatch) -> None:
        super().__init__()
        self._batch = batch

    def emit(self, record: logging.LogRecord) -> None:
        self._batch.add(record.getMessage())


class AuditLog:
    """The server's audit sink: batched to the file (one process) or to the sidecar (workers)."""

    def __init__(self, config: AuditConfig, forward_to: socket.socket | None = None) -> None:
        global _batch, _sinks
        self._file: RotatingFile | None = None
        self._batch: LineBatch | None = None
        if config.path is None:
            return
        if forward_to is not None:
            self._batch = LineBatch(lambda lines: forward_lines(forward_to, lines))
        else:
            self._file = rotating_file(config)
            self._batch = LineBatch(self._file.write_lines)
        _batch = self._batch
        self._handler = _IntoBatch(self._batch)
        logger.addHandler(self._handler)
        _sinks += 1

    @property
    def enabled(self) -> bool:
        return self._batch is not None

    def close(self) -> None:
        global _batch, _sinks
        if self._batch is not None:
            if _batch is self._batch:
                _batch = None
            logger.removeHandler(self._handler)
            self._batch.close()
            self._batch = None
            _sinks -= 1
        if self._file is not None:
            self._file.close()
            self._file = None
