"""The embedded vault: one SQLite file (WAL, synchronous=FULL, secure_delete).

The statements and the schema are `keymanager.vault.sql`'s (one SQL layer for SQLite and
PostgreSQL); this module holds only what is SQLite's own: one connection shared by the
process's threads under one lock, the online backup API, and the WAL checkpoint that keeps
deleted rows' old pages from lingering.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from keymanager.base import StorageUnavailable  # noqa: F401  (re-exported: the vault modules raise it)
from keymanager.vault.rows import DUMP_TABLES, VaultDump
from keymanager.vault.dialect import SQLITE
from keymanager.vault.schema import make_schema
from keymanager.vault.sql import SqlStorage, SqlTx


class SqliteStorage(SqlStorage):
    """The vault file. Safe to share between threads: one lock serialises its transactions.

    Busy or broken files raise sqlite3 errors as they are (the key manager answers a busy vault
    with a retryable error; the CLI names the file).
    """

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        for statement in SQLITE.session:
            self._conn.execute(statement)

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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
            make_schema(conn, SQLITE, 0, now=0.0)
            conn.execute("UPDATE meta SET value = ? WHERE name = 'generation'", (generation,))
            tx = SqlTx(conn, SQLITE, bump=False)
            for table in DUMP_TABLES:
                tx.insert_rows(table, dump.get(table, []))
            conn.execute("COMMIT")
            return conn.serialize()
        finally:
            conn.close()
