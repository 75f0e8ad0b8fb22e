"""What a vault storage holds and offers, whatever the database: rows and the storage interface.

Rows are plain frozen dataclasses; sealed blobs are opaque bytes here (only `keymanager.crypto`
opens them). `VaultStorage` is what `VaultDB` needs from a storage: `write()` and `read()` yield
a transaction object with the row operations (`StorageTx`). `keymanager.vault.sql` implements
both once, for SQLite (`keymanager.vault.storage`) and PostgreSQL (`keymanager.vault.postgres`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

#: The vault's tables and columns, in the order `dump()` yields rows and `insert_rows` takes them
#: (backups of a PostgreSQL vault, and moving a local vault into PostgreSQL, go through these).
#: The leading columns of each are its primary key (dumps are ordered by them).
DUMP_TABLES: dict[str, tuple[str, ...]] = {
    "keys": ("store", "key_id", "state", "usage", "created_at", "origin", "deletion_date"),
    "key_versions": ("store", "key_id", "version", "sealed", "created_at", "reserved", "counted_since"),
    "import_params": (
        "params_id", "store", "key_id", "algorithm", "key_spec", "sealed_private", "public_fingerprint",
        "created_at", "expires_at",
    ),
    "vault_secrets": ("name", "sealed", "created_at"),
}  # fmt: skip
#: How many leading `DUMP_TABLES` columns form each table's primary key.
PRIMARY_KEY_COLUMNS = {"keys": 2, "key_versions": 3, "import_params": 1, "vault_secrets": 1}
VaultDump = dict[str, list[tuple[Any, ...]]]


class SchemaError(Exception):
    """The database is a vault this version cannot use (made by a newer release, or not a vault)."""


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
    """The row operations of one transaction (`keymanager.vault.sql.SqlTx`)."""

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
    def replace_secret(self, name: str, sealed: bytes, created_at: float) -> None: ...
    def update_sealed(self, table: str, key: tuple[Any, ...], sealed: bytes) -> None: ...
    def dump(self) -> VaultDump: ...
    def insert_rows(self, table: str, rows: list[tuple[Any, ...]]) -> None: ...


class VaultStorage(Protocol):
    """Where a vault keeps its rows: `SqliteStorage` or `PostgresStorage` (both `keymanager.vault.sql.SqlStorage`).

    `write()` is one atomic transaction, serialised against every other writer, that bumps the
    generation counter on commit unless the caller clears `tx.bump` (usage-count reservations
    change no key a server holds, so they must not make every server reload). `read()` is one
    consistent snapshot.
    """

    #: How logs and errors name it (a file path; a DSN without its password).
    display: str

    def close(self) -> None: ...
    def migrate(self, now: float) -> tuple[int, int]: ...
    def generation(self) -> int: ...
    def write(self, bump: bool = True) -> AbstractContextManager[StorageTx]: ...
    def read(self) -> AbstractContextManager[StorageTx]: ...
    def snapshot(self) -> bytes: ...
    def forget_deleted(self) -> None: ...
