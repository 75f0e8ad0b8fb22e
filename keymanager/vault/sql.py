"""The vault's one SQL layer: every row operation and transaction, written once for SQLite and PostgreSQL.

`SqlTx` holds the row operations of one transaction, `SqlStorage` the schema upgrade and the
transactions; what the engines spell differently comes from their `Dialect`
(`keymanager.vault.dialect`). A storage class adds only its connection handling
(`keymanager.vault.storage.SqliteStorage`, `keymanager.vault.postgres.PostgresStorage`).

Crash safety is the database's: every change is one transaction that commits whole or not at
all (SQLite: WAL with synchronous=FULL; PostgreSQL: its WAL). Writers take turns from the start
of their transaction (`Dialect.begin_write`), so a read-then-write (a count reservation and the
rotation it may trigger, the deletion sweep, an import, a create) never interleaves with
another writer's, in this process or any other sharing the database.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, Iterator, Sequence

from keymanager.vault.dialect import Dialect
from keymanager.vault.rows import (
    DUMP_TABLES,
    PRIMARY_KEY_COLUMNS,
    ImportParamsRow,
    KeyRow,
    SchemaError,
    VaultDump,
    VersionRow,
)
from keymanager.vault.schema import SCHEMA_VERSION, Connection, make_schema

_GENERATION = "SELECT value FROM meta WHERE name = 'generation'"
_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'generation'"
_KEY_SELECT = (
    "SELECT k.store, k.key_id, k.state, k.usage, k.origin, k.created_at, k.deletion_date, "
    "COUNT(v.version), MAX(v.version) FROM keys k "
    "LEFT JOIN key_versions v ON v.store = k.store AND v.key_id = k.key_id"
)
_KEY_ORDER = " GROUP BY k.store, k.key_id ORDER BY k.store, k.key_id"
_VERSION_SELECT = "SELECT store, key_id, version, sealed, created_at, reserved, counted_since FROM key_versions"
_PARAMS_SELECT = f"SELECT {', '.join(DUMP_TABLES['import_params'])} FROM import_params"


#: Every sealed column of the vault: (column, primary key condition), for a master key rotation.
_SEALED_COLUMNS = {
    "key_versions": ("sealed", "store = ? AND key_id = ? AND version = ?"),
    "import_params": ("sealed_private", "params_id = ?"),
    "vault_secrets": ("sealed", "name = ?"),
}


class SqlTx:
    """Row operations inside one transaction. Obtained only from `SqlStorage.write/read`."""

    def __init__(self, conn: Connection, dialect: Dialect, bump: bool) -> None:
        self._conn = conn
        self._dialect = dialect
        #: Bump the generation counter on commit (servers reload on a new generation).
        self.bump = bump

    def _run(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self._dialect.sql(sql), args)

    def generation(self) -> int:
        row = self._run(_GENERATION).fetchone()
        return row[0] if row else -1

    # --- keys

    def key(self, store: str, key_id: str) -> KeyRow | None:
        row = self._run(_KEY_SELECT + " WHERE k.store = ? AND k.key_id = ?" + _KEY_ORDER, (store, key_id)).fetchone()
        return KeyRow(*row) if row else None

    def keys(self, store: str | None = None) -> list[KeyRow]:
        where, args = (" WHERE k.store = ?", (store,)) if store is not None else ("", ())
        return [KeyRow(*row) for row in self._run(_KEY_SELECT + where + _KEY_ORDER, args).fetchall()]

    def keys_due_for_deletion(self, now: float) -> list[KeyRow]:
        sql = _KEY_SELECT + " WHERE k.state = 'PENDING_DELETION' AND k.deletion_date <= ?" + _KEY_ORDER
        return [KeyRow(*row) for row in self._run(sql, (now,)).fetchall()]

    def insert_key(self, store: str, key_id: str, state: str, usage: str, origin: str, created_at: float) -> None:
        self._run(
            "INSERT INTO keys (store, key_id, state, usage, origin, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (store, key_id, state, usage, origin, created_at),
        )

    def update_key(self, store: str, key_id: str, *, state: str, deletion_date: float | None) -> None:
        self._run(
            "UPDATE keys SET state = ?, deletion_date = ? WHERE store = ? AND key_id = ?",
            (state, deletion_date, store, key_id),
        )

    def delete_key(self, store: str, key_id: str) -> None:
        """Remove a key with every version and import parameter (SQLite's secure_delete zeroes the pages)."""
        for table in ("import_params", "key_versions", "keys"):
            self._run(f"DELETE FROM {table} WHERE store = ? AND key_id = ?", (store, key_id))

    # --- versions

    def versions(self, store: str | None = None, key_id: str | None = None) -> list[VersionRow]:
        if store is None:
            rows = self._run(_VERSION_SELECT + " ORDER BY store, key_id, version")
        else:
            rows = self._run(_VERSION_SELECT + " WHERE store = ? AND key_id = ? ORDER BY version", (store, key_id))
        return [VersionRow(*row) for row in rows.fetchall()]

    def insert_version(self, store: str, key_id: str, version: int, sealed: bytes, created_at: float, reserved: int = 0) -> None:
        self._run(
            "INSERT INTO key_versions (store, key_id, version, sealed, created_at, reserved, counted_since) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (store, key_id, version, sealed, created_at, reserved, created_at),
        )

    def add_reserved(self, store: str, key_id: str, version: int, delta: int) -> None:
        """Move a version's reserved encryption count by `delta` (never below zero)."""
        self._run(
            f"UPDATE key_versions SET reserved = {self._dialect.greatest}(reserved + ?, 0) "
            "WHERE store = ? AND key_id = ? AND version = ?",
            (delta, store, key_id, version),
        )

    # --- import parameters

    def insert_import_params(self, row: ImportParamsRow) -> None:
        self.insert_rows("import_params", [tuple(getattr(row, col) for col in DUMP_TABLES["import_params"])])

    def import_params(self, params_id: str) -> ImportParamsRow | None:
        row = self._run(_PARAMS_SELECT + " WHERE params_id = ?", (params_id,)).fetchone()
        return ImportParamsRow(*row) if row else None

    def delete_expired_import_params(self, now: float) -> int:
        return self._run("DELETE FROM import_params WHERE expires_at <= ?", (now,)).rowcount

    # --- vault-wide sealed secrets

    def secret(self, name: str) -> bytes | None:
        row = self._run("SELECT sealed FROM vault_secrets WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def insert_secret(self, name: str, sealed: bytes, created_at: float) -> None:
        self._run("INSERT INTO vault_secrets (name, sealed, created_at) VALUES (?, ?, ?)", (name, sealed, created_at))

    def replace_secret(self, name: str, sealed: bytes, created_at: float) -> None:
        self._run(
            "INSERT INTO vault_secrets (name, sealed, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, created_at = excluded.created_at",
            (name, sealed, created_at),
        )

    def update_sealed(self, table: str, key: tuple[Any, ...], sealed: bytes) -> None:
        """Replace one sealed blob in place (a master key rotation's step), by the row's primary key."""
        column, where = _SEALED_COLUMNS[table]
        self._run(f"UPDATE {table} SET {column} = ? WHERE {where}", (sealed, *key))

    # --- whole tables (backups, moving a vault between storages)

    def dump(self) -> VaultDump:
        """Every row of every vault table, columns as `DUMP_TABLES` names them, in primary-key order."""
        out: VaultDump = {}
        for table, cols in DUMP_TABLES.items():
            order = ", ".join(cols[: PRIMARY_KEY_COLUMNS[table]])
            out[table] = [tuple(row) for row in self._run(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {order}").fetchall()]
        return out

    def insert_rows(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        cols = DUMP_TABLES[table]  # a fixed name: never text from outside
        cursor = self._conn.cursor()
        try:
            cursor.executemany(
                self._dialect.sql(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"), rows
            )
        finally:
            cursor.close()


class SqlStorage:
    """The schema and the transactions over one connection; subclasses say how it is held.

    A subclass provides `_session()` (the connection, under the storage's lock, with its own
    failure handling), `display`, `close()`, `snapshot()` and `forget_deleted()`.
    """

    dialect: ClassVar[Dialect]
    #: How errors name this kind of storage ("vault", "vault database").
    noun: ClassVar[str] = "vault"
    #: Tables of this storage beyond the vault's, made with the schema.
    own_tables: ClassVar[str] = ""
    display: str

    def _session(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")

    def _tx(self, conn: Any, bump: bool) -> SqlTx:
        return SqlTx(conn, self.dialect, bump)

    @contextmanager
    def _transaction(self, begin: tuple[str, ...]) -> Iterator[Any]:
        """One transaction: committed if the block ends normally, rolled back on any exception."""
        with self._session() as conn:
            conn.execute(begin[0])  # if this fails there is no transaction to roll back
            try:
                for statement in begin[1:]:
                    conn.execute(statement)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    # --- schema

    def schema_version(self) -> int:
        """0 for an empty database, else meta 'schema'."""
        with self._session() as conn:
            return self._schema_version(conn)

    def _schema_version(self, conn: Any) -> int:
        if not conn.execute(self.dialect.sql(self.dialect.table_exists), ("meta",)).fetchone():
            return 0
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        return row[0] if row else 0

    def migrate(self, now: float) -> tuple[int, int]:
        """Create or upgrade the schema in one transaction. Returns (version before, version after)."""
        before = self.schema_version()
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.noun} {self.display} has schema {before}, newer than this xks-proxy understands "
                f"({SCHEMA_VERSION}); upgrade xks-proxy"
            )
        if before == SCHEMA_VERSION:
            return before, before
        with self._transaction(self.dialect.begin_schema) as conn:
            current = self._schema_version(conn)  # another process may have upgraded meanwhile
            make_schema(conn, self.dialect, current, now, self.own_tables)
            conn.execute(_BUMP)
        return before, SCHEMA_VERSION

    # --- transactions

    def generation(self) -> int:
        """The change counter, read outside any transaction: cheap, for the watchers."""
        with self._session() as conn:
            row = conn.execute(_GENERATION).fetchone()
            return row[0] if row else -1

    @contextmanager
    def write(self, bump: bool = True) -> Iterator[SqlTx]:
        """One atomic transaction, serialised against every other writer; bumps the generation on commit."""
        with self._transaction(self.dialect.begin_write) as conn:
            tx = self._tx(conn, bump)
            yield tx
            if tx.bump:
                conn.execute(_BUMP)

    @contextmanager
    def read(self) -> Iterator[SqlTx]:
        """A consistent snapshot for several reads."""
        with self._transaction(self.dialect.begin_read) as conn:
            yield self._tx(conn, False)
