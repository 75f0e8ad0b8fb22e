"""The local AES key vault: the rules of a key's life, and the counts the key manager reserves.

Storage is one SQLite file (`keymanager.vault.storage`) or, for a fleet of proxies sharing
their keys, one PostgreSQL database (`keymanager.vault.postgres`): the same tables, statements
and rules (`keymanager.vault.sql`). Either holds key material only sealed under the master key,
each blob bound to its (store, key id, version). A crash at any instant leaves every committed
change readable and nothing half-written.

`VaultDB` is the one place lifecycle rules live (the CLI and the admin API both call it):
    create ─▶ ENABLED ◀─▶ DISABLED          create --no-material ─▶ PENDING_IMPORT ─import─▶ ENABLED
    any state ─schedule-deletion (7-30 days)─▶ PENDING_DELETION ─cancel─▶ DISABLED (PENDING_IMPORT
    if it never had material) … and after the waiting period, destroyed by the next sweep.
GetKeyMetadata reports every state but ENABLED as DISABLED; crypto on them is InvalidStateException.
Importing material is `keymanager.vault.byok`'s; the names all these share, `keymanager.vault.model`'s.

Encryptions are counted per key version against the AES-GCM limit (NIST SP 800-38D: 2^32
random-IV encryptions per key) in blocks reserved here ahead of use (`keymanager.vault.manager`
spends them from memory): the stored count is an upper bound that survives a crash. A version
whose reservations reach `rotate_after` gets a successor in the same transaction, so several
servers rotate once.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable

from keymanager.base import BadRequest, KeyUsage, audit, iso_time, parse_usage
from keymanager.crypto import MasterKey
from keymanager.vault.byok import ImportParams, KeyImport
from keymanager.vault.model import (
    DISABLED,
    ENABLED,
    HEALTH_KEY,
    INTERNAL_STORE,
    MAX_ENCRYPTIONS,
    ORIGIN_EXTERNAL,
    ORIGIN_VAULT,
    PENDING_DELETION,
    PENDING_IMPORT,
    Grant,
    KeyInfo,
    LoadedKey,
    VaultError,
    VersionInfo,
    existing_row,
    key_info,
    material_context,
)
from keymanager.vault.rows import SchemaError, StorageTx, VaultStorage
from keymanager.vault.storage import SqliteStorage

log = logging.getLogger("xks_proxy.vault")

MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30


def _usage_text(usage: tuple[KeyUsage, ...]) -> str:
    return ",".join(u.value for u in usage)


class VaultDB:
    """The vault's lifecycle operations, over its storage. Used by the CLI, admin API and key manager.

    `clock` exists so tests can act at another time in-process; nothing outside code can set it.
    `storage` defaults to the SQLite file at `path`; another implementation of the same methods
    (`keymanager.vault.storage.VaultStorage`, e.g. PostgreSQL) can be passed instead. Raises
    StorageUnavailable when a networked storage cannot be reached.
    """

    def __init__(
        self,
        path: Path,
        master_key: MasterKey,
        *,
        clock: Callable[[], float] = time.time,
        storage: VaultStorage | None = None,
    ) -> None:
        self.path = path
        self._master = master_key
        self._clock = clock
        name = storage.display if storage is not None else str(path)
        try:
            self._storage: VaultStorage = storage if storage is not None else SqliteStorage(path)
            before, after = self._storage.migrate(clock())
        except (sqlite3.DatabaseError, SchemaError) as exc:
            if storage is not None:
                storage.close()
            raise VaultError(f"{name} is not a usable vault: {exc}") from None
        if before and before != after:
            log.warning("vault %s upgraded in place from schema %d to %d", name, before, after)
        self._import = KeyImport(self._storage, master_key, clock)
        self._ensure_health_key()

    @classmethod
    def create(cls, path: Path, master_key: MasterKey) -> "VaultDB":
        """A new vault with its schema and internal health key."""
        return cls(path, master_key)

    @classmethod
    def open(cls, path: Path, master_key: MasterKey, dsn: str | None = None) -> "VaultDB":
        """The vault a configuration names: the SQLite file at `path`, or the PostgreSQL database at `dsn`."""
        if dsn is None:
            return cls(path, master_key)
        from keymanager.vault.postgres import PostgresStorage

        return cls(path, master_key, storage=PostgresStorage(dsn))

    @property
    def storage(self) -> VaultStorage:
        """The storage underneath (the fleet reads its heartbeat and settings tables through it)."""
        return self._storage

    @property
    def display(self) -> str:
        """How logs name this vault: its file, or its database without the password."""
        return self._storage.display

    def close(self) -> None:
        self._storage.close()

    def ensure_schema(self) -> None:
        """Kept for callers of the first release: opening a VaultDB already does this."""
        self._storage.migrate(self._clock())
        self._ensure_health_key()

    def generation(self) -> int:
        return self._storage.generation()

    def snapshot(self) -> bytes:
        """The whole vault, consistent, as bytes of a database file (for backups)."""
        return self._storage.snapshot()

    def _ensure_health_key(self) -> None:
        with self._storage.read() as tx:
            if tx.key(INTERNAL_STORE, HEALTH_KEY):
                return
        with self._storage.write() as tx:
            if not tx.key(INTERNAL_STORE, HEALTH_KEY):
                self._insert_key(tx, INTERNAL_STORE, HEALTH_KEY, (KeyUsage.ENCRYPT, KeyUsage.DECRYPT), material=True)

    # --- reading

    def key(self, store: str, key_id: str) -> KeyInfo:
        with self._storage.read() as tx:
            return key_info(existing_row(tx, store, key_id))

    def keys(self, store: str) -> list[KeyInfo]:
        with self._storage.read() as tx:
            return [key_info(row) for row in tx.keys(store)]

    def versions(self, store: str, key_id: str) -> list[VersionInfo]:
        with self._storage.read() as tx:
            row = existing_row(tx, store, key_id)
            return [
                VersionInfo(v.version, v.created_at, v.reserved, v.counted_since, v.version == row.current_version)
                for v in tx.versions(store, key_id)
            ]

    # --- creating, enabling, disabling, rotating

    def _insert_key(self, tx: StorageTx, store: str, key_id: str, usage: tuple[KeyUsage, ...], material: bool) -> None:
        now = self._clock()
        if material:
            tx.insert_key(store, key_id, ENABLED, _usage_text(usage), ORIGIN_VAULT, now)
            sealed, _ = self._master.seal_new_key(material_context(store, key_id, 1))
            tx.insert_version(store, key_id, 1, sealed, now)
        else:
            tx.insert_key(store, key_id, PENDING_IMPORT, _usage_text(usage), ORIGIN_EXTERNAL, now)

    def create_key(self, store: str, key_id: str, usage: tuple[KeyUsage, ...], *, material: bool = True) -> KeyInfo:
        """A new key: with fresh vault material (ENABLED), or none yet (PENDING_IMPORT, origin EXTERNAL)."""
        with self._storage.write() as tx:
            if tx.key(store, key_id):
                raise VaultError(f"key {key_id} already exists in store {store!r}")
            self._insert_key(tx, store, key_id, usage, material)
        return self.key(store, key_id)

    def set_state(self, store: str, key_id: str, state: str) -> KeyInfo:
        if state == ENABLED:
            return self.enable(store, key_id)
        if state == DISABLED:
            return self.disable(store, key_id)
        raise BadRequest("state must be ENABLED or DISABLED (deletion and import have their own commands)")

    def enable(self, store: str, key_id: str) -> KeyInfo:
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            if row.state == PENDING_IMPORT:
                raise VaultError(f"key {key_id} has no key material yet: import it (keys import) to enable it")
            if row.state == PENDING_DELETION:
                raise VaultError(f"key {key_id} is pending deletion: cancel the deletion first (keys cancel-deletion)")
            tx.update_key(store, key_id, state=ENABLED, deletion_date=None)
        return self.key(store, key_id)

    def disable(self, store: str, key_id: str) -> KeyInfo:
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            if row.state == PENDING_IMPORT:
                raise VaultError(f"key {key_id} has no key material yet; there is nothing to disable")
            if row.state == PENDING_DELETION:
                raise VaultError(f"key {key_id} is pending deletion, which already refuses all crypto")
            tx.update_key(store, key_id, state=DISABLED, deletion_date=None)
        return self.key(store, key_id)

    def rotate(self, store: str, key_id: str) -> KeyInfo:
        """Add a new version: new encryptions use it, older versions keep decrypting."""
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            if row.origin == ORIGIN_EXTERNAL:
                raise VaultError(
                    f"key {key_id} holds imported key material: rotating would add material you do not hold; "
                    "create a new key and import new material into it instead"
                )
            if row.state not in (ENABLED, DISABLED):
                raise VaultError(f"key {key_id} is {row.state}; only ENABLED or DISABLED keys rotate")
            self._add_version(tx, store, key_id, row.current_version + 1, reserved=0)
        return self.key(store, key_id)

    def _add_version(self, tx: StorageTx, store: str, key_id: str, version: int, reserved: int) -> None:
        sealed, _ = self._master.seal_new_key(material_context(store, key_id, version))
        tx.insert_version(store, key_id, version, sealed, self._clock(), reserved=reserved)
        tx.bump = True

    # --- deletion

    def schedule_deletion(self, store: str, key_id: str, pending_days: int) -> KeyInfo:
        """PENDING_DELETION for `pending_days` (7-30), then destroyed. Crypto is refused meanwhile."""
        whole = isinstance(pending_days, int) and not isinstance(pending_days, bool)
        if not whole or not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
            raise BadRequest(f"pending days must be a whole number from {MIN_PENDING_DAYS} to {MAX_PENDING_DAYS}")
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            if row.state == PENDING_DELETION:
                raise VaultError(f"key {key_id} is already scheduled for deletion on {iso_time(row.deletion_date)}")
            tx.update_key(store, key_id, state=PENDING_DELETION, deletion_date=self._clock() + pending_days * 86400)
        return self.key(store, key_id)

    def cancel_deletion(self, store: str, key_id: str) -> KeyInfo:
        """As KMS: back to DISABLED (or PENDING_IMPORT if it never had material); enable it yourself."""
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            if row.state != PENDING_DELETION:
                raise VaultError(f"key {key_id} is {row.state}, not pending deletion")
            state = DISABLED if row.version_count else PENDING_IMPORT
            tx.update_key(store, key_id, state=state, deletion_date=None)
        return self.key(store, key_id)

    def sweep(self, actor: str) -> list[KeyInfo]:
        """Destroy every key whose waiting period is over. Cheap when nothing is due (one read)."""
        now = self._clock()
        with self._storage.read() as tx:
            if not tx.keys_due_for_deletion(now):
                return []
        with self._storage.write() as tx:
            due = tx.keys_due_for_deletion(now)  # again, inside the lock: another process may have swept
            for row in due:
                tx.delete_key(row.store, row.key_id)
            tx.delete_expired_import_params(now)
        self._storage.forget_deleted()
        destroyed = [key_info(row) for row in due]
        for info in destroyed:
            log.warning(
                "destroyed key %s in store %r: its deletion date %s passed", info.key_id, info.store, iso_time(info.deletion_date)
            )
            audit(
                {
                    "event": "key-lifecycle",
                    "action": "destroy",
                    "actor": actor,
                    "store": info.store,
                    "keyId": info.key_id,
                    "outcome": "OK",
                    "deletionDate": iso_time(info.deletion_date),
                }
            )
        return destroyed

    # --- importing key material (keymanager.vault.byok)

    def import_params(self, store: str, key_id: str, algorithm: str, key_spec: str) -> ImportParams:
        """A fresh RSA wrapping key (private half sealed here) and a 24-hour token bound to it."""
        return self._import.params(store, key_id, algorithm, key_spec)

    def import_material(self, store: str, key_id: str, token: str, encrypted: bytes) -> tuple[KeyInfo, bool]:
        """Unwrap and store imported material. Returns (key, True if stored / False if the same was there)."""
        return self._import.material(store, key_id, token, encrypted)

    # --- moving a vault

    def copy_keys_from(self, other: "VaultDB") -> int:
        """Copy every key of `other` (versions, counts, import parameters) into this vault, which has none.

        One transaction: all or nothing. Sealed blobs are copied as they are (they are bound to
        store, key id and version, not to a storage), so both vaults must share the master key:
        every blob of `other` is checked to open under this vault's first. Returns the number of
        keys copied.
        """
        with other._storage.read() as tx:
            dump = tx.dump()
        unreadable = []
        for store, key_id, version, sealed, *_ in dump["key_versions"]:
            try:
                self._master.data_key(sealed, material_context(store, key_id, version))
            except ValueError:
                unreadable.append(f"{store}/{key_id} v{version}")
        if f"{INTERNAL_STORE}/{HEALTH_KEY} v1" in unreadable:
            raise VaultError(f"the master key does not open the vault {other.display} (another home's master key?)")
        if unreadable:
            raise VaultError(f"key material of {', '.join(unreadable[:5])} in {other.display} does not open under this master key")
        with self._storage.write() as tx:
            if any(row.store != INTERNAL_STORE for row in tx.keys()):
                raise VaultError(f"the vault {self.display} already holds keys; keys are copied only into an empty one")
            for table, rows in dump.items():
                if table == "vault_secrets":
                    rows = [row for row in rows if tx.secret(row[0]) is None]
                else:
                    rows = [row for row in rows if row[1 if table == "import_params" else 0] != INTERNAL_STORE]
                tx.insert_rows(table, rows)
        return sum(1 for row in dump["keys"] if row[0] != INTERNAL_STORE)

    # --- usage counting, for the key manager

    def reserve(self, store: str, key_id: str, block: int, rotate_after: int, may_rotate: bool = True) -> Grant:
        """Reserve up to `block` encryptions under the key's current version, in one transaction.

        A version gets at most `rotate_after` (vault keys) or MAX_ENCRYPTIONS (imported material,
        which the vault cannot replace). When a vault key's current version is full, the same
        transaction adds its successor, so with many servers exactly one of them rotates: the
        others find the new version already current.
        """
        with self._storage.write(bump=False) as tx:
            row = tx.key(store, key_id)
            if row is None or row.current_version is None:
                return Grant(None, 0)
            version = row.current_version
            reserved = tx.versions(store, key_id)[-1].reserved
            limit = rotate_after if row.origin == ORIGIN_VAULT else MAX_ENCRYPTIONS
            room = limit - reserved
            if room > 0:
                count = min(block, room)
                tx.add_reserved(store, key_id, version, count)
                if row.origin == ORIGIN_EXTERNAL and reserved < rotate_after <= reserved + count:
                    log.warning(
                        "key %s (imported material) passed %d encryptions; at %d it refuses to encrypt",
                        key_id,
                        rotate_after,
                        MAX_ENCRYPTIONS,
                    )
                return Grant(version, count)
            if row.origin != ORIGIN_VAULT or row.state != ENABLED or not may_rotate:
                return Grant(version, 0)
            count = min(block, rotate_after)
            self._add_version(tx, store, key_id, version + 1, reserved=count)
        log.info("key %s in store %r reached %d encryptions on v%d; rotated", key_id, store, rotate_after, version)
        audit(
            {
                "event": "key-lifecycle",
                "action": "auto-rotate",
                "actor": "xks-proxy server",
                "store": store,
                "keyId": key_id,
                "outcome": "OK",
                "version": version + 1,
            }
        )
        return Grant(version + 1, count, rotated=True)

    def release(self, store: str, key_id: str, version: int, count: int) -> None:
        """Give back reserved encryptions that were not used (on clean shutdown)."""
        with self._storage.write(bump=False) as tx:
            tx.add_reserved(store, key_id, version, -count)

    def load(self) -> tuple[int, dict[tuple[str, str], "LoadedKey"]]:
        """Every key with its opened versions, read in one consistent snapshot."""
        with self._storage.read() as tx:
            generation = tx.generation()
            keys = {
                (row.store, row.key_id): LoadedKey(
                    state=row.state,
                    usage=frozenset(parse_usage(row.usage)),
                    origin=row.origin,
                    versions={},
                    current=row.current_version,
                )
                for row in tx.keys()
            }
            for v in tx.versions():
                try:
                    material = self._master.data_key(v.sealed, material_context(v.store, v.key_id, v.version))
                except ValueError:
                    log.error("key %s/%s v%d does not open under the master key; it is unusable", v.store, v.key_id, v.version)
                    continue
                keys[(v.store, v.key_id)].versions[v.version] = material
        return generation, keys

