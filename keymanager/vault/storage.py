"""Where the vault keeps its rows: every SQLite statement of the vault lives in this module.

`SqliteStorage` is the embedded default (one file, WAL, synchronous=FULL, secure_delete).
`keymanager.vault.postgres.PostgresStorage` (the shared vault of a fleet) provides the same
methods (`VaultStorage` below): `write()` and `read()` yield a transaction object with the row
operations (`StorageTx`); `write()` is one atomic transaction, serialised against every other
writer, that bumps the generation counter on commit (unless the caller clears `tx.bump`:
usage-count reservations change no key a server holds, so they must not make every server
reload).

Rows are plain frozen dataclasses; sealed blobs are opaque bytes here (only
`keymanager.crypto` opens them). The schema is versioned in meta 'schema' and upgraded in
place, in one transaction, when an older vault is opened.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from keymanager.base import StorageUnavailable  # noqa: F401  (re-exported: the vault modules raise it)

SCHEMA_VERSION = 2

#: The vault's tables and columns, in the order `dump()` yields rows and `insert_rows` takes them
#: (backups of a PostgreSQL vault, and moving a local vault into PostgreSQL, go through these).
DUMP_TABLES: dict[str, tuple[str, ...]] = {
    "keys": ("store", "key_id", "state", "usage", "created_at", "origin", "deletion_date"),
    "key_versions": ("store", "key_id", "version", "sealed", "created_at", "reserved", "counted_since"),
    "import_params": (
        "params_id", "store", "key_id", "algorithm", "key_spec", "sealed_private", "public_fingerprint",
        "created_at", "expires_at",
    ),
    "vault_secrets": ("name", "sealed", "created_at"),
}  # fmt: skip
VaultDump = dict[str, list[tuple[Any, ...]]]

# Schema 1, exactly as the first release wrote it. New vaults are made by this plus every
# migration, so the upgrade path is the path every vault takes.
_SCHEMA_1 = """
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
)
"""

# Schema 2: key origin and deletion date, per-version usage reservations, import parameters,
# vault-wide sealed secrets (the import-token signing key). `counted_since` says from when a
# version's count is complete: versions that predate the upgrade were used uncounted before it.
_MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'VAULT';
ALTER TABLE keys ADD COLUMN deletion_date REAL;
ALTER TABLE key_versions ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN counted_since REAL;
UPDATE key_versions SET counted_since = :now;
CREATE TABLE import_params (
    params_id TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    sealed_private BLOB NOT NULL,
    public_fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
);
CREATE TABLE vault_secrets (name TEXT PRIMARY KEY, sealed BLOB NOT NULL, created_at REAL NOT NULL)
""",
}


class SchemaError(Exception):
    """The file is a vault this version cannot use (made by a newer release, or not a vault)."""


@dataclass(frozen=True, slots=True)
class KeyRow:
    store: str
    key_id: str
    state: str
    usage: str
    origin: str
    created_at: float
    deletion_date: float | None
    version_count: int
    current_version: int | None


@dataclass(frozen=True, slots=True)
class VersionRow:
    store: str
    key_id: str
    version: int
    sealed: bytes = field(repr=False)
    created_at: float
    reserved: int
    counted_since: float


@dataclass(frozen=True, slots=True)
class ImportParamsRow:
    params_id: str
    store: str
    key_id: str
    algorithm: str
    key_spec: str
    sealed_private: bytes = field(repr=False)
    public_fingerprint: str
    created_at: float
    expires_at: float


class StorageTx(Protocol):
    """The row operations of one transaction (`SqliteTx`, `keymanager.vault.postgres.PostgresTx`)."""

    bump: bool

    def generation(self) -> int: ...
    def key(self, store: str, key_id: str) -> KeyRow | None: ...
    def keys(self, store: str | None = None) -> list[KeyRow]: ...
    def keys_due_for_deletion(self, now: float) -> list[KeyRow]: ...
    def insert_key(self, store: str, key_id: str, state: str, usage: str, origin: str, created_at: float) -> None: ...
    def update_key(self, store: str, key_id: str, *, state: str, deletion_date: float | None) -> None: ...
    def delete_key(self, store: str, key_id: str) -> None: ...
    def versions(self, store: str | None = None, key_id: str | None = None) -> list[VersionRow]: ...
    def insert_version(
        self, store: str, key_id: str, version: int, sealed: bytes, created_at: float, reserved: int = 0
    ) -> None: ...
    def add_reserved(self, store: str, key_id: str, version: int, delta: int) -> None: ...
    def insert_import_params(self, row: ImportParamsRow) -> None: ...
    def import_params(self, params_id: str) -> ImportParamsRow | None: ...
    def delete_expired_import_params(self, now: float) -> int: ...
    def secret(self, name: str) -> bytes | None: ...
    def insert_secret(self, name: str, sealed: bytes, created_at: float) -> None: ...
    def dump(self) -> VaultDump: ...
    def insert_rows(self, table: str, rows: list[tuple[Any, ...]]) -> None: ...


class VaultStorage(Protocol):
    """Where a vault keeps its rows: `SqliteStorage` or `keymanager.vault.postgres.PostgresStorage`."""

    #: How logs and errors name it (a file path; a DSN without its password).
    display: str

    def close(self) -> None: ...
    def migrate(self, now: float) -> tuple[int, int]: ...
    def generation(self) -> int: ...
    def write(self, bump: bool = True) -> Any: ...  # a context manager yielding a StorageTx
    def read(self) -> Any: ...  # a context manager yielding a StorageTx (a consistent snapshot)
    def snapshot(self) -> bytes: ...
    def forget_deleted(self) -> None: ...


_KEY_SELECT = (
    "SELECT k.store, k.key_id, k.state, k.usage, k.origin, k.created_at, k.deletion_date, "
    "COUNT(v.version), MAX(v.version) FROM keys k "
    "LEFT JOIN key_versions v ON v.store = k.store AND v.key_id = k.key_id"
)
_VERSION_SELECT = "SELECT store, key_id, version, sealed, created_at, reserved, counted_since FROM key_versions"
_PARAMS_SELECT = (
    "SELECT params_id, store, key_id, algorithm, key_spec, sealed_private, public_fingerprint, created_at, expires_at "
    "FROM import_params"
)


class SqliteTx:
    """Row operations inside one transaction. Obtained only from `SqliteStorage.write/read`."""

    def __init__(self, conn: sqlite3.Connection, bump: bool) -> None:
        self._conn = conn
        #: Bump the generation counter on commit (servers reload on a new generation).
        self.bump = bump

    def generation(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return row[0] if row else -1

    # --- keys

    def key(self, store: str, key_id: str) -> KeyRow | None:
        row = self._conn.execute(
            _KEY_SELECT + " WHERE k.store = ? AND k.key_id = ? GROUP BY k.store, k.key_id", (store, key_id)
        ).fetchone()
        return KeyRow(*row) if row else None

    def keys(self, store: str | None = None) -> list[KeyRow]:
        where, args = (" WHERE k.store = ?", (store,)) if store is not None else ("", ())
        sql = _KEY_SELECT + where + " GROUP BY k.store, k.key_id ORDER BY k.store, k.key_id"
        return [KeyRow(*row) for row in self._conn.execute(sql, args)]

    def keys_due_for_deletion(self, now: float) -> list[KeyRow]:
        sql = (
            _KEY_SELECT + " WHERE k.state = 'PENDING_DELETION' AND k.deletion_date <= ? "
            "GROUP BY k.store, k.key_id ORDER BY k.store, k.key_id"
        )
        return [KeyRow(*row) for row in self._conn.execute(sql, (now,))]

    def insert_key(self, store: str, key_id: str, state: str, usage: str, origin: str, created_at: float) -> None:
        self._conn.execute(
            "INSERT INTO keys (store, key_id, state, usage, origin, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (store, key_id, state, usage, origin, created_at),
        )

    def update_key(self, store: str, key_id: str, *, state: str, deletion_date: float | None) -> None:
        self._conn.execute(
            "UPDATE keys SET state = ?, deletion_date = ? WHERE store = ? AND key_id = ?",
            (state, deletion_date, store, key_id),
        )

    def delete_key(self, store: str, key_id: str) -> None:
        """Remove a key with every version and import parameter (secure_delete zeroes the pages)."""
        args = (store, key_id)
        self._conn.execute("DELETE FROM import_params WHERE store = ? AND key_id = ?", args)
        self._conn.execute("DELETE FROM key_versions WHERE store = ? AND key_id = ?", args)
        self._conn.execute("DELETE FROM keys WHERE store = ? AND key_id = ?", args)

    # --- versions

    def versions(self, store: str | None = None, key_id: str | None = None) -> list[VersionRow]:
        if store is None:
            rows = self._conn.execute(_VERSION_SELECT + " ORDER BY store, key_id, version")
        else:
            rows = self._conn.execute(
                _VERSION_SELECT + " WHERE store = ? AND key_id = ? ORDER BY version", (store, key_id)
            )
        return [VersionRow(*row) for row in rows]

    def insert_version(self, store: str, key_id: str, version: int, sealed: bytes, created_at: float, reserved: int = 0) -> None:
        self._conn.execute(
            "INSERT INTO key_versions (store, key_id, version, sealed, created_at, reserved, counted_since) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (store, key_id, version, sealed, created_at, reserved, created_at),
        )

    def add_reserved(self, store: str, key_id: str, version: int, delta: int) -> None:
        """Move a version's reserved encryption count by `delta` (never below zero)."""
        self._conn.execute(
            "UPDATE key_versions SET reserved = MAX(reserved + ?, 0) WHERE store = ? AND key_id = ? AND version = ?",
            (delta, store, key_id, version),
        )

    # --- import parameters

    def insert_import_params(self, row: ImportParamsRow) -> None:
        self._conn.execute(
            "INSERT INTO import_params (params_id, store, key_id, algorithm, key_spec, sealed_private, "
            "public_fingerprint, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.params_id,
                row.store,
                row.key_id,
                row.algorithm,
                row.key_spec,
                row.sealed_private,
                row.public_fingerprint,
                row.created_at,
                row.expires_at,
            ),
        )

    def import_params(self, params_id: str) -> ImportParamsRow | None:
        row = self._conn.execute(_PARAMS_SELECT + " WHERE params_id = ?", (params_id,)).fetchone()
        return ImportParamsRow(*row) if row else None

    def delete_expired_import_params(self, now: float) -> int:
        return self._conn.execute("DELETE FROM import_params WHERE expires_at <= ?", (now,)).rowcount

    # --- vault-wide sealed secrets

    def secret(self, name: str) -> bytes | None:
        row = self._conn.execute("SELECT sealed FROM vault_secrets WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def insert_secret(self, name: str, sealed: bytes, created_at: float) -> None:
        self._conn.execute("INSERT INTO vault_secrets (name, sealed, created_at) VALUES (?, ?, ?)", (name, sealed, created_at))

    # --- whole tables (backups, moving a vault between storages)

    def dump(self) -> VaultDump:
        """Every row of every vault table, columns as `DUMP_TABLES` names them."""
        return {
            table: [tuple(row) for row in self._conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid")]
            for table, cols in DUMP_TABLES.items()
        }

    def insert_rows(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        cols = DUMP_TABLES[table]  # a fixed name: never text from outside
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self._conn.executemany(sql, rows)


class SqliteStorage:
    """The vault file. Safe to share between threads: one lock serialises its transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # Destroyed key material is overwritten, not left in free pages.
        self._conn.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def schema_version(self) -> int:
        """0 for an empty file, else meta 'schema'."""
        with self._lock:
            if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
                return 0
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            return row[0] if row else 0

    def migrate(self, now: float) -> tuple[int, int]:
        """Create or upgrade the schema in one transaction. Returns (version before, version after)."""
        before = self.schema_version()
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"vault {self.path} has schema {before}, newer than this xks-proxy understands ({SCHEMA_VERSION}); "
                "upgrade xks-proxy"
            )
        if before == SCHEMA_VERSION:
            return before, before
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = self.schema_version()  # another process may have upgraded meanwhile
                if current == 0:
                    _run_script(conn, _SCHEMA_1, {})
                    current = 1
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    _run_script(conn, _MIGRATIONS[version], {"now": now})
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (version,))
                conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return before, SCHEMA_VERSION

    def generation(self) -> int:
        """The change counter, read outside any transaction: cheap, for the watcher."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
            return row[0] if row else -1

    @contextmanager
    def write(self, bump: bool = True) -> Iterator[SqliteTx]:
        """One durable transaction (BEGIN IMMEDIATE: writers queue, so read-then-write is race-free)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            tx = SqliteTx(conn, bump)
            try:
                yield tx
                if tx.bump:
                    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self) -> Iterator[SqliteTx]:
        """A consistent snapshot for several reads."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield SqliteTx(conn, False)
            finally:
                conn.execute("COMMIT")

    def snapshot(self) -> bytes:
        """A consistent copy of the whole database (SQLite's online backup API), while others write."""
        with self._lock:
            copy = sqlite3.connect(":memory:")
            try:
                self._conn.backup(copy)
                return copy.serialize()
            finally:
                copy.close()

    def forget_deleted(self) -> None:
        """Fold the WAL into the file and truncate it, so deleted rows' old pages do not linger there."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @staticmethod
    def image(dump: VaultDump, generation: int = 1) -> bytes:
        """The bytes of a vault file holding exactly `dump` (a backup of a vault kept elsewhere)."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            conn.execute("BEGIN")
            _run_script(conn, _SCHEMA_1, {})
            for version in range(2, SCHEMA_VERSION + 1):
                _run_script(conn, _MIGRATIONS[version], {"now": 0.0})
                conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (version,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'generation'", (generation,))
            tx = SqliteTx(conn, bump=False)
            for table in DUMP_TABLES:
                tx.insert_rows(table, dump.get(table, []))
            conn.execute("COMMIT")
            return conn.serialize()
        finally:
            conn.close()


def _run_script(conn: sqlite3.Connection, script: str, params: dict[str, object]) -> None:
    """Run `;`-separated statements inside the caller's transaction (executescript would commit)."""
    for statement in filter(None, (s.strip() for s in script.split(";"))):
        conn.execute(statement, {name: value for name, value in params.items() if f":{name}" in statement})
