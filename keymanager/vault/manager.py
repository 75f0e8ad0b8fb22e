"""The vault as the server's key manager: every key served from memory.

`VaultKeyManager` loads every key once, then a background task watches a generation counter that
every lifecycle change bumps, and reloads when it moves. So changes made by the CLI reach a
running server within `refresh_seconds`, and the hot path never touches the disk. Encryptions are
counted per key version against the AES-GCM limit by reserving blocks of counts in the vault
ahead of use (see `keymanager.vault.db`); the hot path only increments an integer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

from keymanager.base import PROXY_WIDE, EkmHealth, Encrypted, HealthState, KeyManager, KeyMetadata, KeyUsage, StorageUnavailable
from keymanager.base import KeyRefused as VaultError  # any refusal: VaultError, NoSuchKey, BadRequest
from keymanager.crypto import MasterKey
from xks_proxy.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidStateException,
    KeyNotFoundException,
    XksError,
)

from keymanager.vault.db import VaultDB
from keymanager.vault.model import (
    DEFAULT_COUNT_BLOCK,
    DEFAULT_ROTATE_AFTER,
    HEALTH_KEY,
    INTERNAL_STORE,
    MAX_ENCRYPTIONS,
    ENABLED,
    Grant,
    LoadedKey,
    UsageCounter,
    decode_metadata,
    encode_metadata,
)

log = logging.getLogger("xks_proxy.vault")

#: (store, key id, version) -> encryptions the vault has reserved for that version.
Reserved = dict[tuple[str, str, int], int]
#: What a load gives `_install`: the generation, every key, and the reserved counts.
Loaded = tuple[int, dict[tuple[str, str], LoadedKey], Reserved]


class VaultKeyManager(KeyManager):
    """Serves keys from memory, reloading when the vault's generation counter moves.

    With `dsn` the vault is a PostgreSQL database shared by a fleet. Then losing the database
    costs no Encrypt/Decrypt of a loaded key: they run from memory, health turns DEGRADED, and
    encryption counts are spent only from blocks already reserved. When this process's block
    runs out while the database is down, Encrypt answers DependencyTimeoutException (retryable)
    rather than encrypt uncounted. Everything resumes by itself when the database answers again.
    """

    vendor = "xks-proxy local vault"
    #: Seconds between attempts to reach the vault database at start.
    start_retry_seconds = 2.0

    def __init__(
        self,
        path: Path,
        master_key: MasterKey,
        refresh_seconds: float = 0.5,
        rotate_after: int = DEFAULT_ROTATE_AFTER,
        count_block: int = DEFAULT_COUNT_BLOCK,
        dsn: str | None = None,
    ) -> None:
        self._path = path
        self._dsn = dsn
        self._master = master_key
        self._refresh_seconds = refresh_seconds
        self._rotate_after = rotate_after
        self._block = count_block
        self._refill_at = count_block // 2  # reserve the next block in the background from here
        self._db: VaultDB | None = None
        # Vault calls run in worker threads that cancelling a task does not stop; the connection
        # is used and closed only under this lock, never closed under a query (that crashes).
        self._db_lock = threading.Lock()
        self._keys: dict[tuple[str, str], LoadedKey] = {}
        self._counters: dict[tuple[str, str, int], UsageCounter] = {}
        #: The vault's reserved count per version, as last read (never lowered: an upper bound).
        self._vault_reserved: Reserved = {}
        #: In-flight reservation per key, and whether it may rotate (only when a request waits on it).
        self._reserving: dict[tuple[str, str], tuple[asyncio.Task[int], bool]] = {}
        self._generation = -1
        self._task: asyncio.Task[None] | None = None
        self._last_refresh_ok = True

    async def start(self) -> None:
        if self._dsn is None and not self._path.is_file():
            raise InternalException(f"vault file {self._path} does not exist")
        loaded = await self._open_and_load()
        self._install(*loaded)
        if (INTERNAL_STORE, HEALTH_KEY) not in self._keys or not self._keys[(INTERNAL_STORE, HEALTH_KEY)].versions:
            raise InternalException("the master key does not open this vault (health key unreadable)")
        self._task = asyncio.create_task(self._watch())

    async def _open_and_load(self) -> Loaded:
        """Open the vault and load every key; a database that cannot be reached is retried, said once."""
        waiting = False
        while True:
            try:
                loaded = await asyncio.to_thread(self._open_sync)
            except StorageUnavailable as exc:
                if not waiting:
                    log.error("cannot load keys: %s; retrying every %g s until it answers", exc, self.start_retry_seconds)
                    waiting = True
                await asyncio.sleep(self.start_retry_seconds)
                continue
            except VaultError as exc:
                raise InternalException(str(exc)) from None
            if waiting:
                log.warning("vault database reachable again; keys loaded")
            return loaded

    def _open_sync(self) -> Loaded:
        with self._db_lock:
            if self._db is None:
                self._db = VaultDB.open(self._path, self._master, self._dsn)
            self._db.sweep(actor="xks-proxy server")
            return *self._db.load(), self._read_reserved()

    def _read_reserved(self, store: str | None = None, key_id: str | None = None) -> Reserved:
        """Every version's (or one key's) reserved count: all proxies' and all runs', under the lock."""
        assert self._db is not None
        with self._db.storage.read() as tx:
            return {(v.store, v.key_id, v.version): v.reserved for v in tx.versions(store, key_id)}

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._reserving:
            await asyncio.gather(*(task for task, _ in self._reserving.values()), return_exceptions=True)
        await asyncio.to_thread(self._close_db)

    def _close_db(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._release_unused()
                self._db.close()
                self._db = None

    def _release_unused(self) -> None:
        """Give back what this process reserved but did not use, so stored counts end exact."""
        assert self._db is not None
        for (store, key_id, version), counter in self._counters.items():
            if counter.granted > counter.used:
                try:
                    self._db.release(store, key_id, version, counter.granted - counter.used)
                    counter.granted = counter.used
                except Exception:  # the reservation stays an upper bound: safe, just not exact
                    log.exception("could not give back unused encryption counts of %s/%s v%d", store, key_id, version)

    def _install(self, generation: int, keys: dict[tuple[str, str], LoadedKey], reserved: Reserved) -> None:
        """Swap in a loaded key set (on the event loop), keeping this process's counters."""
        if generation < self._generation:
            return  # a slower, older load finished after a newer one
        self._vault_reserved = {k: max(count, self._vault_reserved.get(k, 0)) for k, count in reserved.items()}
        for (store, key_id), key in keys.items():
            if key.current is not None:
                key.counter = self._counters.setdefault((store, key_id, key.current), UsageCounter())
        self._counters = {k: c for k, c in self._counters.items() if (k[0], k[1]) in keys}
        self._generation, self._keys = generation, keys

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self._refresh()
            except StorageUnavailable as exc:  # keep serving what we hold; health reports the trouble
                if self._last_refresh_ok:
                    log.error("%s; serving the keys already loaded (lifecycle changes wait for it)", exc)
                self._last_refresh_ok = False
            except Exception:
                if self._last_refresh_ok:
                    log.exception("vault refresh failed; serving the keys already loaded")
                self._last_refresh_ok = False
            else:
                if not self._last_refresh_ok:
                    log.warning("vault %s answers again; changes are taken up", self._db.display if self._db else "")
                    self._last_refresh_ok = True
                    self._top_up()

    def _top_up(self) -> None:
        """Reserve the next block wherever a background refill failed while the vault was unreachable."""
        for (store, key_id), key in self._keys.items():
            counter = key.counter
            if counter is None or (store, key_id) in self._reserving or key.state != ENABLED:
                continue
            if counter.used and counter.granted - counter.used <= self._refill_at:
                self._reserve(store, key_id, may_rotate=False)

    async def _refresh(self, force: bool = False) -> None:
        loaded = await asyncio.to_thread(self._load_if_changed, force)
        if loaded is not None:
            self._install(*loaded)
            log.info("vault reloaded: generation %d, %d keys", self._generation, len(self._keys) - 1, extra=PROXY_WIDE)

    def _load_if_changed(self, force: bool) -> Loaded | None:
        with self._db_lock:
            if self._db is None:
                return None  # closed meanwhile
            destroyed = self._db.sweep(actor="xks-proxy server")
            if force or destroyed or self._db.generation() != self._generation:
                return *self._db.load(), self._read_reserved()
            return None

    def _key(self, store: str, key_id: str) -> LoadedKey:
        key = self._keys.get((store, key_id))
        if key is None or store == INTERNAL_STORE:
            raise KeyNotFoundException(f"no key {key_id} in this key store")
        return key

    @staticmethod
    def _usable(key: LoadedKey, key_id: str, usage: KeyUsage) -> None:
        if key.state != ENABLED:
            raise InvalidStateException(f"key {key_id} is {key.state}")
        if usage not in key.usage:
            raise InvalidKeyUsageException(f"key {key_id} does not allow {usage.value}")

    async def get_metadata(self, store: str, key_id: str) -> KeyMetadata:
        key = self._key(store, key_id)
        return KeyMetadata(key_spec="AES_256", usage=tuple(u for u in KeyUsage if u in key.usage), enabled=key.state == ENABLED)

    async def encrypt(self, store: str, key_id: str, plaintext: bytes, aad: bytes | None) -> Encrypted:
        key = self._key(store, key_id)
        self._usable(key, key_id, KeyUsage.ENCRYPT)
        counter = key.counter
        if counter is None or counter.used >= counter.granted:
            key, counter = await self._granted(store, key_id)
        counter.used += 1
        if counter.granted - counter.used == self._refill_at and not self._reserving.get((store, key_id)):
            self._reserve(store, key_id, may_rotate=False)  # the next block, before this one runs out
        return self._encrypt(key, plaintext, aad)

    async def _granted(self, store: str, key_id: str) -> tuple[LoadedKey, UsageCounter]:
        """Wait (off the event loop) until this process may do one more encryption under the key."""
        while True:
            pending = self._reserving.get((store, key_id))
            if pending is None or pending[0].done():  # a finished one was already counted in
                pending = (self._reserve(store, key_id, may_rotate=True), True)
            task, may_rotate = pending
            count = await asyncio.shield(task)
            key = self._key(store, key_id)
            self._usable(key, key_id, KeyUsage.ENCRYPT)
            counter = key.counter
            if counter is not None and counter.used < counter.granted:
                return key, counter
            if count == 0 and may_rotate:
                raise InvalidStateException(
                    f"key {key_id} reached the AES-GCM limit of {MAX_ENCRYPTIONS} encryptions for its imported "
                    "key material; it still decrypts, but new encryptions need a new key"
                )

    def _reserve(self, store: str, key_id: str, may_rotate: bool) -> asyncio.Task[int]:
        task = asyncio.create_task(self._do_reserve(store, key_id, may_rotate))
        self._reserving[(store, key_id)] = (task, may_rotate)
        task.add_done_callback(lambda done: self._reserved(store, key_id, done))
        return task

    def _reserved(self, store: str, key_id: str, task: asyncio.Task[int]) -> None:
        if self._reserving.get((store, key_id), (None, False))[0] is task:
            del self._reserving[(store, key_id)]
        if not task.cancelled():
            task.exception()  # logged in _do_reserve; waiters get it, a background refill just drops it

    def _reserve_locked(self, store: str, key_id: str, block: int, limit: int, may_rotate: bool) -> tuple[Grant, Reserved]:
        """The reservation (in a worker thread, never on a closed connection), then the key's reserved counts."""
        with self._db_lock:
            if self._db is None:
                raise InternalException("the vault is closed")
            grant = self._db.reserve(store, key_id, block, limit, may_rotate)
            try:
                return grant, (self._read_reserved(store, key_id) if grant.count else {})
            except Exception as exc:  # only the metrics lose: they count this grant from memory
                log.warning("could not read the reserved encryption counts of %s/%s: %s", store, key_id, exc)
                return grant, {}

    async def _do_reserve(self, store: str, key_id: str, may_rotate: bool) -> int:
        """One reservation transaction; installs the grant. Rotation only when a request is waiting."""
        assert self._db is not None
        block, limit = self._block, self._rotate_after
        try:
            grant, reserved = await asyncio.to_thread(self._reserve_locked, store, key_id, block, limit, may_rotate)
        except StorageUnavailable as exc:
            log.error("could not reserve encryption counts for %s/%s: %s", store, key_id, exc)
            raise DependencyTimeoutException(
                "the vault database is unreachable and this proxy's reserved encryptions are used up; retry"
            ) from None
        except sqlite3.OperationalError:
            log.exception("could not reserve encryption counts for %s/%s", store, key_id)
            raise DependencyTimeoutException("the vault is busy; could not reserve encryption counts") from None
        except Exception:
            log.exception("could not reserve encryption counts for %s/%s", store, key_id)
            raise InternalException("could not reserve encryption counts; see the proxy log") from None
        if grant.version is not None and grant.count:
            self._counters.setdefault((store, key_id, grant.version), UsageCounter()).granted += grant.count
            granted = (store, key_id, grant.version)
            reserved = reserved or {granted: self._vault_reserved.get(granted, 0) + grant.count}
            for counted, count in reserved.items():
                self._vault_reserved[counted] = max(count, self._vault_reserved.get(counted, 0))
        key = self._keys.get((store, key_id))
        if key is None or grant.version != key.current or (grant.count == 0 and may_rotate):
            try:
                await self._refresh(force=True)  # rotated (here or elsewhere), deleted, or disabled
            except StorageUnavailable:
                raise DependencyTimeoutException("the vault database is unreachable; could not load the new key version") from None
        return grant.count

    def _encrypt(self, key: LoadedKey, plaintext: bytes, aad: bytes | None) -> Encrypted:
        version = key.current
        material = key.versions.get(version) if version is not None else None
        if material is None:
            raise InternalException("the current key material does not open under the master key")
        metadata = encode_metadata(version)
        iv, ciphertext, tag = material.encrypt(plaintext, aad, metadata)
        return Encrypted(ciphertext=ciphertext, iv=iv, tag=tag, metadata=metadata, key_version=version)

    async def decrypt(
        self,
        store: str,
        key_id: str,
        ciphertext: bytes,
        iv: bytes,
        tag: bytes,
        aad: bytes | None,
        metadata: bytes | None,
    ) -> bytes:
        key = self._key(store, key_id)
        self._usable(key, key_id, KeyUsage.DECRYPT)
        material = key.versions.get(decode_metadata(metadata))
        if material is None:
            raise InvalidCiphertextException("ciphertextMetadata names a key version this key does not have")
        return material.decrypt(iv, ciphertext, tag, aad, metadata)

    def usage_counts(self, store: str, key_id: str) -> dict[int, int]:
        """Exact encryptions this process did per version since it started (the admin API shows them)."""
        return {k[2]: c.used for k, c in self._counters.items() if k[0] == store and k[1] == key_id}

    def gcm_invocations_ratio(self) -> float:
        """Reserved encryptions over 2^32, highest over the current versions of keys that may encrypt now.

        Reserved, not performed: the vault's count is the upper bound it keeps across a fleet and
        restarts (this process's `used` sees neither), as last read at a load or reservation here.
        2^32 for every version: imported material stops there; a vault key rotates before (0.5 by default).
        """
        ratios = (self._vault_reserved.get((s, k, key.current), 0) / MAX_ENCRYPTIONS for (s, k), key in self._keys.items()
                  if s != INTERNAL_STORE and key.current is not None and key.state == ENABLED and KeyUsage.ENCRYPT in key.usage)
        return max(ratios, default=0.0)

    def key_version(self, metadata: bytes | None) -> int | None:
        try:
            return decode_metadata(metadata)
        except InvalidCiphertextException:
            return None

    async def health(self) -> list[EkmHealth]:
        """The in-memory vault (a real AES-GCM round trip on the health key), then its database if shared.

        Read from what the background watcher last saw: health never waits on the database.
        """
        state = HealthState.ACTIVE if self._last_refresh_ok else HealthState.DEGRADED
        try:
            key = self._keys[(INTERNAL_STORE, HEALTH_KEY)]
            probe = b"xks-proxy health probe"
            sealed = self._encrypt(key, probe, b"health")
            material = key.versions[sealed.key_version]
            if material.decrypt(sealed.iv, sealed.ciphertext, sealed.tag, b"health", sealed.metadata) != probe:
                raise InternalException("health probe round trip returned other bytes")
        except (XksError, KeyError):
            log.exception("vault health probe failed")
            state = HealthState.UNAVAILABLE
        if self._dsn is None:
            return [EkmHealth(id=f"vault:{self._path.name}", model="SQLite AES-256-GCM vault", state=state)]
        return [EkmHealth(id="vault", model="AES-256-GCM vault, keys held in memory", state=state), self._database_health()]

    def _database_health(self) -> EkmHealth:
        """The shared database: ACTIVE when its last round trip (every refresh) worked, else UNAVAILABLE."""
        storage = self._db.storage if self._db is not None else None
        display = getattr(storage, "display", "postgresql")
        version = getattr(storage, "server_version", "")
        up = self._last_refresh_ok and bool(getattr(storage, "reachable", False))
        return EkmHealth(
            id=display.removeprefix("postgresql://"),
            model=f"PostgreSQL {version}".strip(),
            state=HealthState.ACTIVE if up else HealthState.UNAVAILABLE,
        )
