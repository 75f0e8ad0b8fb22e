"""The local AES key vault: the default key manager.

Storage is one SQLite file (WAL, synchronous=FULL, one transaction per change), holding key
material only sealed under the master key, each blob bound to its (store, key id, version).
A crash at any instant leaves every committed change readable and nothing half-written;
that is SQLite's guarantee, which tests/test_vault_crash.py checks with SIGKILL.

The server serves from memory: `VaultKeyManager` loads every key once, then a background task
watches a generation counter that every write bumps, and reloads when it moves. So changes
made by the CLI reach a running server within `refresh_seconds`, and the hot path never
touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from keymanager.base import EkmHealth, Encrypted, HealthState, KeyAdminError, KeyInfo, KeyManager, KeyMetadata, KeyUsage
from keymanager.crypto import DataKey, MasterKey
from xks_proxy.errors import (
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidStateException,
    KeyNotFoundException,
    XksError,
)

log = logging.getLogger("xks_proxy.vault")

ENABLED, DISABLED = "ENABLED", "DISABLED"
INTERNAL_STORE = "#internal"  # '#' is not a prefix character: no URI can reach these keys.
HEALTH_KEY = "health"
_METADATA = struct.Struct(">BI")  # format 1, key version
_METADATA_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS keys (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    usage TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (store, key_id)
);
CREATE TABLE IF NOT EXISTS key_versions (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (store, key_id, version),
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
);
"""


class VaultError(KeyAdminError):
    """A refused vault change (the CLI prints it as one line)."""


def material_context(store: str, key_id: str, version: int) -> str:
    """What a sealed key blob is bound to: it opens only as this version of this key."""
    return f"xks-proxy key {store!r} {key_id!r} v{version}"


def encode_metadata(version: int) -> bytes:
    return _METADATA.pack(_METADATA_FORMAT, version)


def decode_metadata(metadata: bytes | None) -> int:
    """Key version named by ciphertextMetadata. No metadata means version 1.

    (Ciphertexts made by other proxies over imported material carry no metadata of ours.)
    """
    if not metadata:
        return 1
    if len(metadata) != _METADATA.size or metadata[0] != _METADATA_FORMAT:
        raise InvalidCiphertextException("ciphertextMetadata was not produced by this key store")
    return _METADATA.unpack(metadata)[1]


def parse_usage(text: str) -> tuple[KeyUsage, ...]:
    """'ENCRYPT,DECRYPT' -> usages in canonical order; '' -> none."""
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    try:
        usage = {KeyUsage(name) for name in names}
    except ValueError:
        raise VaultError(f"usage must be a comma-separated subset of ENCRYPT,DECRYPT, not {text!r}") from None
    return tuple(u for u in KeyUsage if u in usage)


class VaultDB:
    """Synchronous access to the vault file: the CLI's `KeyAdmin`, and the key manager's loader."""

    def __init__(self, path: Path, master_key: MasterKey) -> None:
        self.path = path
        self._master = master_key
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")

    @classmethod
    def create(cls, path: Path, master_key: MasterKey) -> "VaultDB":
        """A new vault with its schema and internal health key."""
        db = cls(path, master_key)
        db.ensure_schema()
        return db

    def close(self) -> None:
        self._conn.close()

    def ensure_schema(self) -> None:
        with self._write() as conn:
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            exists = conn.execute(
                "SELECT 1 FROM keys WHERE store = ? AND key_id = ?", (INTERNAL_STORE, HEALTH_KEY)
            ).fetchone()
            if not exists:
                self._insert_key(conn, INTERNAL_STORE, HEALTH_KEY, (KeyUsage.ENCRYPT, KeyUsage.DECRYPT))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction that also bumps the generation counter."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def generation(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return row[0] if row else -1

    def _insert_key(self, conn: sqlite3.Connection, store: str, key_id: str, usage: tuple[KeyUsage, ...]) -> None:
        now = time.time()
        conn.execute(
            "INSERT INTO keys (store, key_id, state, usage, created_at) VALUES (?, ?, ?, ?, ?)",
            (store, key_id, ENABLED, ",".join(u.value for u in usage), now),
        )
        sealed, _ = self._master.seal_new_key(material_context(store, key_id, 1))
        conn.execute(
            "INSERT INTO key_versions (store, key_id, version, sealed, created_at) VALUES (?, ?, 1, ?, ?)",
            (store, key_id, sealed, now),
        )

    def create_key(self, store: str, key_id: str, usage: tuple[KeyUsage, ...]) -> KeyInfo:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM keys WHERE store = ? AND key_id = ?", (store, key_id)).fetchone():
                raise VaultError(f"key {key_id} already exists in store {store!r}")
            self._insert_key(conn, store, key_id, usage)
        return self.key(store, key_id)

    def set_state(self, store: str, key_id: str, state: str) -> KeyInfo:
        with self._write() as conn:
            updated = conn.execute(
                "UPDATE keys SET state = ? WHERE store = ? AND key_id = ?", (state, store, key_id)
            ).rowcount
            if not updated:
                raise VaultError(f"no key {key_id} in store {store!r}")
        return self.key(store, key_id)

    def rotate(self, store: str, key_id: str) -> KeyInfo:
        """Add a new version: new encryptions use it, older versions keep decrypting."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT MAX(version) FROM key_versions WHERE store = ? AND key_id = ?", (store, key_id)
            ).fetchone()
            if row[0] is None:
                raise VaultError(f"no key {key_id} in store {store!r}")
            version = row[0] + 1
            sealed, _ = self._master.seal_new_key(material_context(store, key_id, version))
            conn.execute(
                "INSERT INTO key_versions (store, key_id, version, sealed, created_at) VALUES (?, ?, ?, ?, ?)",
                (store, key_id, version, sealed, time.time()),
            )
        return self.key(store, key_id)

    def key(self, store: str, key_id: str) -> KeyInfo:
        for info in self.keys(store, key_id):
            return info
        raise VaultError(f"no key {key_id} in store {store!r}")

    def keys(self, store: str, key_id: str | None = None) -> list[KeyInfo]:
        sql = (
            "SELECT k.store, k.key_id, k.state, k.usage, k.created_at, COUNT(v.version) FROM keys k "
            "JOIN key_versions v ON v.store = k.store AND v.key_id = k.key_id WHERE k.store = ?"
        )
        args: tuple[str, ...] = (store,)
        if key_id is not None:
            sql += " AND k.key_id = ?"
            args += (key_id,)
        sql += " GROUP BY k.store, k.key_id ORDER BY k.key_id"
        return [
            KeyInfo(store=r[0], key_id=r[1], state=r[2], usage=parse_usage(r[3]), versions=r[5], created_at=r[4])
            for r in self._conn.execute(sql, args)
        ]

    def load(self) -> tuple[int, dict[tuple[str, str], "LoadedKey"]]:
        """Every key with its opened versions, read in one consistent snapshot."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            generation = self.generation()
            keys = {
                (store, key_id): LoadedKey(state=state, usage=frozenset(parse_usage(usage)), versions={})
                for store, key_id, state, usage in conn.execute("SELECT store, key_id, state, usage FROM keys")
            }
            for store, key_id, version, sealed in conn.execute(
                "SELECT store, key_id, version, sealed FROM key_versions"
            ):
                try:
                    material = self._master.data_key(sealed, material_context(store, key_id, version))
                except ValueError:
                    log.error("key %s/%s v%d does not open under the master key; it is unusable", store, key_id, version)
                    continue
                keys[(store, key_id)].versions[version] = material
        finally:
            conn.execute("COMMIT")
        return generation, keys


@dataclass(slots=True)
class LoadedKey:
    state: str
    usage: frozenset[KeyUsage]
    versions: dict[int, DataKey]

    @property
    def current(self) -> int:
        return max(self.versions)


class VaultKeyManager(KeyManager):
    """Serves keys from memory, reloading when the vault's generation counter moves."""

    vendor = "xks-proxy local vault"

    def __init__(self, path: Path, master_key: MasterKey, refresh_seconds: float = 0.5) -> None:
        self._path = path
        self._master = master_key
        self._refresh_seconds = refresh_seconds
        self._db: VaultDB | None = None
        # A refresh runs in a worker thread that cancelling `_watch` does not stop; the connection
        # is closed only under this lock, never under a query (that crashes the process).
        self._db_lock = threading.Lock()
        self._keys: dict[tuple[str, str], LoadedKey] = {}
        self._generation = -1
        self._task: asyncio.Task[None] | None = None
        self._last_refresh_ok = True

    async def start(self) -> None:
        if not self._path.is_file():
            raise InternalException(f"vault file {self._path} does not exist")
        self._db = VaultDB(self._path, self._master)
        self._db.ensure_schema()
        self._generation, self._keys = self._db.load()
        if (INTERNAL_STORE, HEALTH_KEY) not in self._keys or not self._keys[(INTERNAL_STORE, HEALTH_KEY)].versions:
            raise InternalException("the master key does not open this vault (health key unreadable)")
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self._close_db)

    def _close_db(self) -> None:
        with self._db_lock:
            if self._db:
                self._db.close()
                self._db = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await asyncio.to_thread(self._refresh)
                self._last_refresh_ok = True
            except Exception:  # keep serving what we hold; health reports the trouble
                if self._last_refresh_ok:
                    log.exception("vault refresh failed; serving the keys already loaded")
                self._last_refresh_ok = False

    def _refresh(self) -> None:
        with self._db_lock:
            if self._db is None:
                return
            if self._db.generation() != self._generation:
                self._generation, self._keys = self._db.load()
                log.info("vault reloaded: generation %d, %d keys", self._generation, len(self._keys) - 1)

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
        return self._encrypt(key, plaintext, aad)

    @staticmethod
    def _encrypt(key: LoadedKey, plaintext: bytes, aad: bytes | None) -> Encrypted:
        version = key.current
        metadata = encode_metadata(version)
        iv, ciphertext, tag = key.versions[version].encrypt(plaintext, aad, metadata)
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

    def key_version(self, metadata: bytes | None) -> int | None:
        try:
            return decode_metadata(metadata)
        except InvalidCiphertextException:
            return None

    async def health(self) -> list[EkmHealth]:
        state = HealthState.ACTIVE if self._last_refresh_ok else HealthState.DEGRADED
        try:
            key = self._keys[(INTERNAL_STORE, HEALTH_KEY)]
            probe = b"xks-proxy health probe"
            sealed = self._encrypt(key, probe, b"health")
            if key.versions[key.current].decrypt(sealed.iv, sealed.ciphertext, sealed.tag, b"health", sealed.metadata) != probe:
                raise InternalException("health probe round trip returned other bytes")
        except (XksError, KeyError):
            log.exception("vault health probe failed")
            state = HealthState.UNAVAILABLE
        return [EkmHealth(id=f"vault:{self._path.name}", model="SQLite AES-256-GCM vault", state=state)]
