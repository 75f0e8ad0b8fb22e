"""This serving process as a member of a fleet: heartbeats, the live count, the shared stores.

Only with a shared vault (`[vault] dsn`). Every serving process (each worker of each proxy)
upserts a row (proxy id, pid, host, port, last seen by the database's clock) every
`fleet.heartbeat_seconds` (which it records), and deletes it on a clean stop.
`xksProxyFleetSize` is the number of distinct proxy ids heard from within 3 of their own
heartbeat intervals. The same background loop watches the shared stores' revision every
`vault.refresh_seconds` and swaps in a changed, valid set, so a store or credential changed
from any machine serves on every proxy within 2 seconds.

Everything here runs in a background task with its database calls on a thread: no request
waits on it. While the database is unreachable the last known fleet size and stores stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import replace
from typing import Callable

from keymanager.base import PROXY_WIDE, ProxyInfo, SharedStorage, StorageUnavailable
from xks_proxy.fleet import shared_settings
from xks_proxy.config import Config, ConfigError
from xks_proxy.settings import sections

log = logging.getLogger("xks_proxy.fleet")

#: A proxy counts as live while its newest heartbeat is younger than this many heartbeats.
LIVE_HEARTBEATS = 3


def live(row: ProxyInfo) -> bool:
    """Heard from within LIVE_HEARTBEATS of its own heartbeat intervals."""
    return row.age_seconds <= LIVE_HEARTBEATS * row.heartbeat_seconds


class FleetMember:
    """Heartbeats for this process and applies the fleet's shared stores through `apply(config)`.

    `current()` is the configuration serving now (config.toml may have been reloaded since):
    a changed store set is applied on top of it.
    """

    def __init__(self, config: Config, current: Callable[[], Config], apply: Callable[[Config], None]) -> None:
        assert config.vault.dsn is not None
        self._config = config
        self._current = current
        #: Where a changed, valid configuration goes (the runner points it at its Reloader).
        self.apply = apply
        self.proxy_id = config.fleet.name(config.server.port)
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._storage: SharedStorage | None = None
        self._task: asyncio.Task[None] | None = None
        self._size = 1
        self._revision: int | None = None
        self._next_heartbeat = 0.0
        self._ok = True

    def size(self) -> int:
        """Live proxies in the fleet, this one included (the last count seen, while the database is away)."""
        return max(1, self._size)

    async def start(self) -> None:
        self._pid = os.getpid()  # after a fork, each worker is its own row
        await self._round()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self._leave)

    def _leave(self) -> None:
        if self._storage is None:
            return
        try:
            self._storage.leave(self.proxy_id, self._pid)
        except StorageUnavailable:
            pass  # the row just ages out
        finally:
            self._storage.close()

    async def _run(self) -> None:
        tick = min(self._config.vault.refresh_seconds, self._config.fleet.heartbeat_seconds)
        while True:
            await asyncio.sleep(tick)
            await self._round()

    async def _round(self) -> None:
        try:
            changed = await asyncio.to_thread(self._poll)
        except StorageUnavailable as exc:
            if self._ok:
                log.error("fleet: %s; keeping the stores and fleet size last seen", exc)
            self._ok = False
            return
        except Exception:  # the loop must outlive any surprise
            log.exception("fleet: background round failed")
            return
        if not self._ok:
            log.warning("fleet: vault database reachable again")
            self._ok = True
        if changed is not None:
            self.apply(changed)
            log.info("fleet: shared stores now %s", ", ".join(s.uri_path for s in changed.stores), extra=PROXY_WIDE)

    def _poll(self) -> Config | None:
        """One round on a worker thread: heartbeat when due, then a changed store set, if any."""
        if self._storage is None:
            self._storage = shared_settings.open_storage(self._config)
        storage = self._storage
        heartbeat = self._config.fleet.heartbeat_seconds
        if time.monotonic() >= self._next_heartbeat:
            storage.heartbeat(self.proxy_id, self._pid, self._host, self._config.server.port, heartbeat)
            self._size = len({row.proxy_id for row in storage.proxies() if live(row)} | {self.proxy_id})
            self._next_heartbeat = time.monotonic() + heartbeat
        revision = storage.setting_revision(shared_settings.STORES)
        if revision == self._revision:
            return None
        self._revision = revision
        found = shared_settings.read(storage)
        if found is None:
            return None
        current = self._current()
        try:
            new = shared_settings.apply(current, found[0])
        except ConfigError as exc:
            log.error("fleet: shared stores revision %d refused, still serving the previous stores: %s", revision, exc)
            return None
        return new if new.stores != current.stores else None


def wait_for_stores(config: Config, retry_seconds: float = 2.0) -> Config:
    """`config` with the fleet's stores, waiting for the vault database as long as it takes.

    A proxy started while its database is down says why once, then retries quietly; it binds
    its port only after this returns, so a load balancer sees it down until it can serve.
    """
    waiting = False
    while True:
        try:
            if config.seal == "unknown":  # the seal record is in the database too
                keyring, kind = sections.keyring(config.home, config.raw, config.vault.dsn)
                config = replace(config, keyring=keyring, seal=kind)
            loaded = shared_settings.load_into(config)
        except StorageUnavailable as exc:
            if not waiting:
                log.error("cannot start serving yet: %s; retrying every %g s until it answers", exc, retry_seconds)
                waiting = True
            time.sleep(retry_seconds)
            continue
        if waiting:
            log.warning("vault database reachable; starting")
        return loaded
