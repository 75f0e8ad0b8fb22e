"""The vault's tables, written once for SQLite and PostgreSQL (column types from `Dialect`).

Every vault, on either engine, is made by schema 1 plus every migration, in one transaction,
so the upgrade path is the path every vault takes and a migration is written once. The version
is meta 'schema'; the change counter the servers watch is meta 'generation'. Vaults made before
this module (SQLite files; PostgreSQL databases, which began at schema 2) have exactly these
tables (tests/keymanager/vault/test_vault_sql.py compares the catalogs).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from keymanager.vault.dialect import Dialect

SCHEMA_VERSION = 2

# Schema 1, exactly as the first release wrote it (types per dialect).
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value {int64} NOT NULL);
INSERT INTO meta (name, value) VALUES ('generation', 0), ('schema', 1) ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS keys (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    usage TEXT NOT NULL,
    created_at {real} NOT NULL,
    PRIMARY KEY (store, key_id)
);
CREATE TABLE IF NOT EXISTS key_versions (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    sealed {blob} NOT NULL,
    created_at {real} NOT NULL,
    PRIMARY KEY (store, key_id, version),
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
)
"""

# Schema 2: key origin and deletion date, per-version usage reservations, import parameters,
# vault-wide sealed secrets (the import-token signing key). `counted_since` says from when a
# version's count is complete: versions that predate the upgrade were used uncounted before it.
# A statement with a `?` gets the migration's time.
_MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'VAULT';
ALTER TABLE keys ADD COLUMN deletion_date {real};
ALTER TABLE key_versions ADD COLUMN reserved {int64} NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN counted_since {real};
UPDATE key_versions SET counted_since = ?;
CREATE TABLE import_params (
    params_id TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    sealed_private {blob} NOT NULL,
    public_fingerprint TEXT NOT NULL,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL,
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
);
CREATE TABLE vault_secrets (name TEXT PRIMARY KEY, sealed {blob} NOT NULL, created_at {real} NOT NULL)
""",
}


class Connection(Protocol):
    """What the layer uses of a DB-API connection (sqlite3's and psycopg's both have it)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def cursor(self) -> Any: ...


def make_schema(conn: Connection, dialect: Dialect, current: int, now: float, own_tables: str = "") -> None:
    """Bring the schema from version `current` (0: none) to SCHEMA_VERSION, in the caller's transaction.

    `own_tables`: a storage's tables beyond the vault's (PostgreSQL: the fleet's), made with it.
    """
    if current == 0:
        for statement in dialect.script(_SCHEMA_1) + dialect.script(own_tables):
            conn.execute(statement)
        current = 1
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in dialect.script(_MIGRATIONS[version]):
            if dialect.placeholder in statement:
                conn.execute(statement, (now,))
            else:
                conn.execute(statement)
        conn.execute(dialect.sql("UPDATE meta SET value = ? WHERE name = 'schema'"), (version,))

