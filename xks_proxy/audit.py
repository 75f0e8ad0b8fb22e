"""The audit log: one JSON object per line, to a file with size-based rotation.

Every XKS request writes one record (the server builds it: who asked, for which key, what
happened, how long it took; never data or secrets). Other parts of the proxy (the admin API)
record their actions with `audit({...})`.

Records go to the logger "xks_proxy.audit", which does not propagate to the server log. The
file is written by a QueueListener thread: the event loop only puts a record on a queue, so a
slow disk never stalls a request. The file and its rotated copies are 0600.

With several worker processes, rotating one file from many processes would lose records, so
workers forward each record as one datagram to the supervisor's sidecar, the only writer of
the file (`AuditLog(config, forward_to=socket)` in a worker, `file_handler` in the sidecar).
A CLI process (key lifecycle, credentials, stores) appends its records with `append_only`: no
rotation (the server's job), and O_APPEND on both sides keeps whole lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import socket
import time
from typing import Any

import orjson

from xks_proxy.config import AuditConfig, ConfigError

logger = logging.getLogger("xks_proxy.audit")
logger.propagate = False
logger.setLevel(logging.INFO)

#: Caller-supplied strings are cut to this length so a huge field cannot bloat the log.
MAX_FIELD = 2048

_sinks = 0  # open AuditLogs; records are built only when there is somewhere to put them
_appender: logging.Handler | None = None


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
    if _sinks:
        logger.info("%s", line)


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates the log and every rotated file owner-only, whatever the umask."""

    def _open(self):  # type: ignore[no-untyped-def]
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def file_handler(config: AuditConfig) -> logging.Handler:
    """The audit file with size-based rotation (for the one process that writes it)."""
    assert config.path is not None
    try:
        config.path.parent.mkdir(parents=True, exist_ok=True)
        handler = _PrivateRotatingFileHandler(config.path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot write {config.path}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


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


class _Forward(logging.Handler):
    """Sends each record as one datagram to the sidecar (blocking, but in the listener thread)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.send(record.getMessage().encode())
        except Exception:
            self.handleError(record)


class AuditLog:
    """The configured audit sink; `close()` flushes it (the runner calls it at shutdown)."""

    def __init__(self, config: AuditConfig, forward_to: socket.socket | None = None) -> None:
        self._listener: logging.handlers.QueueListener | None = None
        self._handler: logging.Handler | None = None
        if config.path is None:
            return
        target = _Forward(forward_to) if forward_to is not None else file_handler(config)
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(records, target)
        self._handler = logging.handlers.QueueHandler(records)
        self._listener.start()
        logger.addHandler(self._handler)
        global _sinks
        _sinks += 1

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    def close(self) -> None:
        global _sinks
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler = None
            _sinks -= 1
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
