"""The vault's one SQL layer makes, on either engine, the schema the per-engine modules before it made.

The DDL below is copied as the releases before the layer wrote it (SQLite: schema 1 plus
migration 2; PostgreSQL: its schema-2 base). A vault made by it opens unchanged (no upgrade), works,
and has the catalog of a vault the layer makes today.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from keymanager.base import parse_usage
from keymanager.crypto import MasterKey
from keymanager.vault.db import VaultDB
from keymanager.vault.postgres import PostgresStorage
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401 (fixtures)

MASTER = MasterKey.from_text(MasterKey.generate_text())
BOTH = parse_usage("ENCRYPT,DECRYPT")

OLD_SQLITE = """
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
CREATE TABLE vault_secrets (name TEXT PRIMARY KEY, sealed BLOB NOT NULL, created_at REAL NOT NULL);
UPDATE meta SET value = 2 WHERE name = 'schema';
UPDATE meta SET value = value + 1 WHERE name = 'generation'
"""

OLD_POSTGRES = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    usage TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    origin TEXT NOT NULL DEFAULT 'VAULT',
    deletion_date DOUBLE PRECISION,
    PRIMARY KEY (store, key_id)
);
CREATE TABLE IF NOT EXISTS key_versions (
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    sealed BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0,
    counted_since DOUBLE PRECISION,
    PRIMARY KEY (store, key_id, version),
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
);
CREATE TABLE IF NOT EXISTS import_params (
    params_id TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    sealed_private BYTEA NOT NULL,
    public_fingerprint TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id)
);
CREATE TABLE IF NOT EXISTS vault_secrets (name TEXT PRIMARY KEY, sealed BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS proxies (
    proxy_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    heartbeat_seconds DOUBLE PRECISION NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (proxy_id, pid)
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    document TEXT NOT NULL,
    revision BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('generation', 0), ('schema', 2) ON CONFLICT (name) DO NOTHING;
UPDATE meta SET value = value + 1 WHERE name = 'generation'
"""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _use(db: VaultDB) -> None:
    """Every kind of write and read, on a vault made by the old DDL."""
    db.create_key("s", "a", BOTH)
    db.rotate("s", "a")
    assert db.reserve("s", "a", 10, 100).count == 10
    db.release("s", "a", 2, 4)
    db.create_key("s", "ext", BOTH, material=False)
    db.import_params("s", "ext", "RSAES_OAEP_SHA_256", "RSA_2048")
    db.schedule_deletion("s", "ext", 7)
    _, keys = db.load()
    assert sorted(keys[("s", "a")].versions) == [1, 2]
    assert [(v.version, v.reserved) for v in db.versions("s", "a")] == [(1, 0), (2, 6)]


def _sqlite_catalog(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        conn.close()


def test_sqlite_vault_of_the_release_before_opens_unchanged(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("BEGIN")
    for statement in _statements(OLD_SQLITE):
        conn.execute(statement, {"now": 0.0} if ":now" in statement else {})
    conn.execute("COMMIT")
    conn.close()
    VaultDB(tmp_path / "new.db", MASTER).close()
    assert _sqlite_catalog(old) == _sqlite_catalog(tmp_path / "new.db")
    db = VaultDB(old, MASTER)
    try:
        _use(db)
    finally:
        db.close()
    assert _sqlite_catalog(old) == _sqlite_catalog(tmp_path / "new.db")


def _pg_catalog(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        columns = conn.execute(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, contype, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2, 3"
        ).fetchall()
    return [*columns, *constraints]


def test_postgres_vault_of_the_release_before_opens_unchanged(pg_database: tuple[Cluster, str, str]) -> None:
    cluster, name, new_dsn = pg_database
    old_dsn = cluster.create_database(f"{name}_old")
    with psycopg.connect(old_dsn) as conn:
        for statement in _statements(OLD_POSTGRES):
            conn.execute(statement)
    VaultDB(Path("unused"), MASTER, storage=PostgresStorage(new_dsn)).close()
    made_before = _pg_catalog(old_dsn)
    assert made_before == _pg_catalog(new_dsn)
    storage = PostgresStorage(old_dsn)
    assert storage.migrate(0.0) == (2, 2) and storage.generation() == 1  # nothing to upgrade, nothing written
    db = VaultDB(Path("unused"), MASTER, storage=storage)
    try:
        _use(db)
        storage.heartbeat("p1", 1, "127.0.0.1", 8443, 1.0)
        assert [row.proxy_id for row in storage.proxies()] == ["p1"]
        with storage.write() as tx:
            assert tx.put_setting("stores", "[]", 0.0, "test") == 1
        with storage.read() as tx:
            assert tx.setting("stores") == ("[]", 1)
            assert all(isinstance(v.sealed, bytes) for v in tx.versions())
    finally:
        db.close()
    assert _pg_catalog(old_dsn) == made_before
