"""Taking up changes without a restart: config.toml and the TLS files, polled and on SIGHUP.

A background task looks at config.toml (inode, mtime, size) and the certificate files every
`interval` seconds, and at once on SIGHUP. A changed config.toml is read and validated in a
worker thread; only a fully valid one is applied, in one synchronous step on the event loop
(so a request sees either the old stores, credentials, policies and quotas or the new ones,
never a mix, and requests in flight are not disturbed). An invalid one is refused with one log
line naming the field, and the previous configuration keeps serving. Settings that need a new
process (listen address, key manager, metrics listener, audit file) are reported, not applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from keymanager.base import PROXY_WIDE, StorageUnavailable
from xks_proxy import config as configmod
from xks_proxy.config import Config, ConfigError
from xks_proxy.access.metrics import NoMetrics
from xks_proxy.access.mtls import TlsError, TlsManager

log = logging.getLogger("xks_proxy.reload")


def _restart_only(config: Config) -> dict[str, Any]:
    return {
        "server.host/port": (config.server.host, config.server.port),
        "keymanager": (config.backend, config.raw.get("keymanager"), config.raw.get("pkcs11")),
        "vault": config.vault,
        "master_key": config.raw.get("master_key"),
        "metrics": config.metrics,
        "audit": config.audit,
    }


class Reloader:
    def __init__(
        self,
        config: Config,
        apply: Callable[[Config], None],
        tls: TlsManager | None,
        metrics: NoMetrics,
        interval: float = 0.5,
        overrides: Callable[[Config], Config] = lambda config: config,
        catch_up: bool = False,
    ) -> None:
        """`catch_up`: `config` may be older than config.toml (a worker forked from a supervisor that
        loaded it at start, restarted after an edit): read the file once at the first round, and
        apply it, silently, only if it differs."""
        self.config = overrides(config)
        #: What the process set over config.toml (the port it really serves on): applied to every
        #: reload too, so a reload does not undo it; changes are judged on the file's own values.
        self._overrides = overrides
        self._file_settings = _restart_only(config)
        self._apply = apply
        self._tls = tls
        self._metrics = metrics
        self._interval = interval
        self._path = config.home / configmod.CONFIG_FILE
        self._signature = None if catch_up else self._stat()
        self._catching_up = catch_up
        self._waiting = False
        self._wake = asyncio.Event()
        self._force = False
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def trigger(self) -> None:
        """SIGHUP: reload everything now, changed or not."""
        self._force = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            force, self._force = self._force, False
            try:
                await self.check(force)
            except Exception:  # the watcher must outlive any surprise
                log.exception("reload check failed; serving the current configuration")

    async def check(self, force: bool = False) -> None:
        """One round: config.toml first (it may name new TLS files), then the TLS files."""
        await self._check_config(force)
        if self._tls is not None:
            await self._check_tls(force)

    async def _check_config(self, force: bool) -> None:
        signature = await asyncio.to_thread(self._stat)
        if signature == self._signature and not force:
            return
        self._signature = signature
        try:
            loaded = await asyncio.to_thread(configmod.load, self.config.home, True, self.config.keyring)
        except (ConfigError, OSError) as exc:
            log.error("configuration reload refused, still serving the previous configuration: %s", exc, extra=PROXY_WIDE)
            self._metrics.reload("config", False)
            return
        except StorageUnavailable as exc:  # a fleet's stores are in its database: try again next round
            self._signature = None
            if not self._waiting:
                log.error("configuration reload waits for the vault database: %s", exc, extra=PROXY_WIDE)
            self._waiting = True
            return
        self._waiting = False
        catching_up, self._catching_up = self._catching_up, False
        if catching_up and loaded.raw == self.config.raw:
            return  # what this process already serves: nothing to apply or tell
        before, self._file_settings = self._file_settings, _restart_only(loaded)
        for name, value in self._file_settings.items():
            if value != before[name]:
                log.warning("config.toml: %s changed; that takes effect at the next restart", name, extra=PROXY_WIDE)
        new = self.config = self._overrides(loaded)
        self._apply(new)
        if self._tls is not None:
            self._tls.configure(new)
        self._metrics.reload("config", True)
        log.info("configuration reloaded: stores %s", ", ".join(s.uri_path for s in new.stores), extra=PROXY_WIDE)

    def adopt(self, config: Config) -> None:
        """A configuration changed elsewhere (a fleet's shared stores): serve it as a reload would."""
        self.config = config
        self._apply(config)
        if self._tls is not None:
            self._tls.configure(config)

    async def _check_tls(self, force: bool) -> None:
        assert self._tls is not None
        try:
            loaded = await asyncio.to_thread(self._tls.poll, force)
        except TlsError as exc:
            log.error("TLS reload refused, still serving the previous certificate: %s", exc, extra=PROXY_WIDE)
            self._metrics.reload("tls", False)
            return
        if loaded is not None:
            self._tls.install(loaded)
            self._metrics.reload("tls", True)
            log.info("TLS certificate, key and client CA reloaded", extra=PROXY_WIDE)
