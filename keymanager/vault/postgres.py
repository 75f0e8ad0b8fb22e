"""The vault on PostgreSQL, shared by a fleet of proxies: every PostgreSQL statement lives here.

`PostgresStorage` provides exactly `SqliteStorage`'s methods (`vault_storage.VaultStorage`),
with the same tables and the same meaning, so `VaultDB` runs its lifecycle rules unchanged over
either. Key material arrives here already sealed under the master key (`keymanager.crypto`);
the database never sees it in clear.

Concurrency. Every `write()` transaction first locks the generation row (`SELECT ... FOR
UPDATE`), so writers across the whole fleet take turns exactly as SQLite's `BEGIN IMMEDIATE`
makes them: a read-then-write inside one (a count-block reservation and the rotation it may
trigger, the deletion sweep, an import, a create) can never interleave with another proxy's.
Under READ COMMITTED each statement after the lock sees everything committed before it was
granted. Writes are rare and short (a lifecycle change; one reservation per `count_block`
encryptions per proxy), so one fleet-wide writer at a time costs nothing measurable. `read()`
is a REPEATABLE READ READ ONLY transaction: one consistent snapshot for a full key load.

Failure. One connection per storage object, used under a lock (like the SQLite one). A lost
or refused connection raises `StorageUnavailable` with a one-line reason (the DSN's password is
never in it), and the next call reconnects; while the database is known to be down, calls fail
at once for `retry_seconds` instead of each waiting for a connect timeout. Server-side timeouts
(statement, lock, idle transaction) and TCP keepalives bound how long anything can hang.

Beyond the vault tables, the fleet's own (`proxies`: heartbeats; `settings`: the key stores
shared by every proxy, with their sealed credentials) live here too, used by `xks_proxy.fleet`.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
from psycopg import conninfo

from keymanager.vault.storage import (
    DUMP_TABLES,
    ImportParamsRow,
    KeyRow,
    SchemaError,
    SqliteStorage,
    StorageUnavailable,
    VaultDump,
    VersionRow,
)

#: The schema this module writes. PostgreSQL vaults start at 2 (the first release on
#: PostgreSQL); a later vault_storage migration N gets its PostgreSQL twin in _MIGRATIONS[N].
SCHEMA_VERSION = 2
_BASE_VERSION = 2
_SCHEMA_LOCK = 0x786B7331  # pg_advisory_xact_lock id: one proxy creates or upgrades the schema

_BASE = """
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
INSERT INTO meta (name, value) VALUES ('generation', 0), ('schema', 2) ON CONFLICT (name) DO NOTHING
"""
_MIGRATIONS: dict[int, str] = {}

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
_PRIMARY_KEYS = {
    "keys": "store, key_id",
    "key_versions": "store, key_id, version",
    "import_params": "params_id",
    "vault_secrets": "name",
}

#: libpq settings applied unless the DSN sets them: fail fast, notice a dead peer within seconds.
_CONNECT_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "xks-proxy",
}
#: A connection idle longer than this is checked (SELECT 1) before it is used again.
_IDLE_CHECK_SECONDS = 1.0
_SESSION_SETTINGS = (
    "SET statement_timeout = '10s'",
    "SET lock_timeout = '10s'",
    "SET idle_in_transaction_session_timeout = '60s'",
)


def display_dsn(dsn: str) -> str:
    """The DSN as logs may show it: user@host:port/dbname, never the password."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable DSN)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def check_dsn(dsn: str) -> dict[str, Any]:
    """The DSN's parameters; ValueError (without the DSN's text) if libpq cannot parse it."""
    try:
        return conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ValueError("not a PostgreSQL connection string (key=value pairs or a postgresql:// URI)") from None


def _reason(exc: BaseException, secret: str | None) -> str:
    """One line saying why, from a psycopg error, with the password (if any) masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if secret:
        text = text.replace(secret, "***")
    return text[:300]


class PostgresTx:
    """Row operations inside one transaction. Obtained only from `PostgresStorage.write/read`."""

    def __init__(self, conn: psycopg.Connection[Any], bump: bool) -> None:
        self._conn = conn
        #: Bump the generation counter on commit (servers reload on a new generation).
        self.bump = bump

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        return self._conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, args).fetchall()

    def generation(self) -> int:
        row = self._one("SELECT value FROM meta WHERE name = 'generation'")
        return row[0] if row else -1

    # --- keys

    def key(self, store: str, key_id: str) -> KeyRow | None:
        row = self._one(_KEY_SELECT + " WHERE k.store = %s AND k.key_id = %s GROUP BY k.store, k.key_id", (store, key_id))
        return KeyRow(*row) if row else None

    def keys(self, store: str | None = None) -> list[KeyRow]:
        where, args = (" WHERE k.store = %s", (store,)) if store is not None else ("", ())
        sql = _KEY_SELECT + where + " GROUP BY k.store, k.key_id ORDER BY k.store, k.key_id"
        return [KeyRow(*row) for row in self._all(sql, args)]

    def keys_due_for_deletion(self, now: float) -> list[KeyRow]:
        sql = (
            _KEY_SELECT + " WHERE k.state = 'PENDING_DELETION' AND k.deletion_date <= %s "
            "GROUP BY k.store, k.key_id ORDER BY k.store, k.key_id"
        )
        return [KeyRow(*row) for row in self._all(sql, (now,))]

    def insert_key(self, store: str, key_id: str, state: str, usage: str, origin: str, created_at: float) -> None:
        self._conn.execute(
            "INSERT INTO keys (store, key_id, state, usage, origin, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (store, key_id, state, usage, origin, created_at),
        )

    def update_key(self, store: str, key_id: str, *, state: str, deletion_date: float | None) -> None:
        self._conn.execute(
            "UPDATE keys SET state = %s, deletion_date = %s WHERE store = %s AND key_id = %s",
            (state, deletion_date, store, key_id),
        )

    def delete_key(self, store: str, key_id: str) -> None:
        """Remove a key with every version and import parameter."""
        args = (store, key_id)
        self._conn.execute("DELETE FROM import_params WHERE store = %s AND key_id = %s", args)
        self._conn.execute("DELETE FROM key_versions WHERE store = %s AND key_id = %s", args)
        self._conn.execute("DELETE FROM keys WHERE store = %s AND key_id = %s", args)

    # --- versions

    def versions(self, store: str | None = None, key_id: str | None = None) -> list[VersionRow]:
        if store is None:
            rows = self._all(_VERSION_SELECT + " ORDER BY store, key_id, version")
        else:
            rows = self._all(_VERSION_SELECT + " WHERE store = %s AND key_id = %s ORDER BY version", (store, key_id))
        return [VersionRow(r[0], r[1], r[2], bytes(r[3]), *r[4:]) for r in rows]

    def insert_version(self, store: str, key_id: str, version: int, sealed: bytes, created_at: float, reserved: int = 0) -> None:
        self._conn.execute(
            "INSERT INTO key_versions (store, key_id, version, sealed, created_at, reserved, counted_since) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (store, key_id, version, sealed, created_at, reserved, created_at),
        )

    def add_reserved(self, store: str, key_id: str, version: int, delta: int) -> None:
        """Move a version's reserved encryption count by `delta` (never below zero)."""
        self._conn.execute(
            "UPDATE key_versions SET reserved = GREATEST(reserved + %s, 0) WHERE store = %s AND key_id = %s AND version = %s",
            (delta, store, key_id, version),
        )

    # --- import parameters

    def insert_import_params(self, row: ImportParamsRow) -> None:
        self._conn.execute(
            "INSERT INTO import_params (params_id, store, key_id, algorithm, key_spec, sealed_private, "
            "public_fingerprint, created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(_PARAMS_SELECT + " WHERE params_id = %s", (params_id,))
        return ImportParamsRow(*row[:5], bytes(row[5]), *row[6:]) if row else None

    def delete_expired_import_params(self, now: float) -> int:
        return self._conn.execute("DELETE FROM import_params WHERE expires_at <= %s", (now,)).rowcount

    # --- vault-wide sealed secrets

    def secret(self, name: str) -> bytes | None:
        row = self._one("SELECT sealed FROM vault_secrets WHERE name = %s", (name,))
        return bytes(row[0]) if row else None

    def insert_secret(self, name: str, sealed: bytes, created_at: float) -> None:
        self._conn.execute("INSERT INTO vault_secrets (name, sealed, created_at) VALUES (%s, %s, %s)", (name, sealed, created_at))

    # --- whole tables (backups, moving a vault between storages)

    def dump(self) -> VaultDump:
        """Every row of every vault table, columns as `DUMP_TABLES` names them."""
        out: VaultDump = {}
        for table, cols in DUMP_TABLES.items():
            rows = self._all(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {_PRIMARY_KEYS[table]}")
            out[table] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
        return out

    def insert_rows(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        cols = DUMP_TABLES[table]  # a fixed name: never text from outside
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        with self._conn.cursor() as cur:
            cur.executemany(sql, rows)

    # --- the fleet's shared settings (beyond the vault interface)

    def setting(self, name: str) -> tuple[str, int] | None:
        """(document, revision) of a shared setting, or None."""
        row = self._one("SELECT document, revision FROM settings WHERE name = %s", (name,))
        return (row[0], row[1]) if row else None

    def put_setting(self, name: str, document: str, now: float, actor: str) -> int:
        """Store a shared setting; returns its new revision."""
        row = self._one(
            "INSERT INTO settings (name, document, revision, updated_at, updated_by) VALUES (%s, %s, 1, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET document = EXCLUDED.document, revision = settings.revision + 1, "
            "updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by RETURNING revision",
            (name, document, now, actor),
        )
        assert row is not None
        return row[0]


@dataclass(frozen=True, slots=True)
class ProxyRow:
    """One serving process of the fleet, as its last heartbeat left it."""

    proxy_id: str
    pid: int
    host: str
    port: int
    heartbeat_seconds: float
    started_at: float
    last_seen: float
    age_seconds: float


class PostgresStorage:
    """The shared vault in one PostgreSQL database. Safe to share between threads (one lock)."""

    def __init__(self, dsn: str, *, retry_seconds: float = 1.0) -> None:
        params = check_dsn(dsn)
        self.display = display_dsn(dsn)
        self._password = params.get("password")
        self._conninfo = conninfo.make_conninfo(dsn, **{k: v for k, v in _CONNECT_DEFAULTS.items() if k not in params})
        self._retry_seconds = retry_seconds
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._down_since: float | None = None  # monotonic time of the failure that is still current
        self._last_reason = ""
        self._next_attempt = 0.0
        self._last_used = time.monotonic()
        #: `SHOW server_version` of the last connection ("" before the first).
        self.server_version = ""
        #: time.monotonic() of the last successful round trip (0 before the first).
        self.last_ok = 0.0
        with self._session():
            pass  # connect now: a wrong DSN or a stopped server is reported by whoever opened us

    # --- connection

    @property
    def reachable(self) -> bool:
        """Whether the last attempt to use the database worked."""
        return self._down_since is None and self.last_ok > 0

    def _connect(self) -> psycopg.Connection[Any]:
        now = time.monotonic()
        if now < self._next_attempt:
            raise StorageUnavailable(f"the vault database {self.display} is unreachable: {self._last_reason}")
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            for statement in _SESSION_SETTINGS:
                conn.execute(statement)
            version = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error as exc:
            self._failed(exc)
            raise StorageUnavailable(f"the vault database {self.display} is unreachable: {self._last_reason}") from None
        self.server_version = str(version[0]).split(" ")[0] if version else ""
        return conn

    def _failed(self, exc: BaseException) -> None:
        self._last_reason = _reason(exc, self._password)
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._next_attempt = time.monotonic() + self._retry_seconds

    def _usable(self) -> psycopg.Connection[Any]:
        """The connection, reconnecting if it is gone, or if it sat idle and no longer answers.

        (A connection the server dropped while idle, e.g. across a database restart, fails only
        when used: a cheap check after a pause spares the next real transaction that failure.)
        """
        conn = self._conn
        if conn is not None and not conn.closed and time.monotonic() - self._last_used > _IDLE_CHECK_SECONDS:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                conn.close()
        if conn is None or conn.closed:
            conn = self._conn = self._connect()
        return conn

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection (reconnecting if needed), under the lock; a lost one becomes StorageUnavailable."""
        with self._lock:
            conn = self._usable()
            try:
                yield conn
            except psycopg.OperationalError as exc:
                if conn.broken or conn.closed:
                    self._conn = None
                    conn.close()
                self._failed(exc)
                raise StorageUnavailable(f"the vault database {self.display} failed: {self._last_reason}") from None
            except psycopg.InterfaceError as exc:  # used after the server closed it
                self._conn = None
                conn.close()
                self._failed(exc)
                raise StorageUnavailable(f"the vault database {self.display} failed: {self._last_reason}") from None
            finally:
                self._last_used = time.monotonic()
            self._down_since = None
            self._next_attempt = 0.0
            self.last_ok = self._last_used

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- schema

    def schema_version(self) -> int:
        """0 for an empty database, else meta 'schema'."""
        with self._session() as conn:
            return self._schema_version(conn)

    @staticmethod
    def _schema_version(conn: psycopg.Connection[Any]) -> int:
        if conn.execute("SELECT to_regclass('meta')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        return row[0] if row else 0

    def migrate(self, now: float) -> tuple[int, int]:
        """Create or upgrade the schema in one transaction. Returns (version before, version after)."""
        before = self.schema_version()
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"vault database {self.display} has schema {before}, newer than this xks-proxy understands "
                f"({SCHEMA_VERSION}); upgrade xks-proxy"
            )
        if before == SCHEMA_VERSION:
            return before, before
        with self._session() as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    current = self._schema_version(conn)  # another proxy may have done it meanwhile
                    if current == 0:
                        for statement in _statements(_BASE):
                            conn.execute(statement)
                        current = _BASE_VERSION
                    for version in range(current + 1, SCHEMA_VERSION + 1):
                        for statement in _statements(_MIGRATIONS[version]):
                            conn.execute(statement, {"now": now} if "%(now)s" in statement else None)
                        conn.execute("UPDATE meta SET value = %s WHERE name = 'schema'", (version,))
                    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:  # e.g. no CREATE permission: the operator must fix it
                raise SchemaError(_reason(exc, self._password)) from None
        return before, SCHEMA_VERSION

    # --- transactions

    def generation(self) -> int:
        """The change counter, read outside any transaction: cheap, for the watchers."""
        with self._session() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
            return row[0] if row else -1

    @contextmanager
    def write(self, bump: bool = True) -> Iterator[PostgresTx]:
        """One transaction, holding the fleet-wide writer lock (the generation row) from its start."""
        with self._session() as conn:
            with conn.transaction():
                conn.execute("SELECT value FROM meta WHERE name = 'generation' FOR UPDATE")
                tx = PostgresTx(conn, bump)
                yield tx
                if tx.bump:
                    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")

    @contextmanager
    def read(self) -> Iterator[PostgresTx]:
        """A consistent snapshot for several reads."""
        with self._session() as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield PostgresTx(conn, False)

    def snapshot(self) -> bytes:
        """The whole vault, consistent, as the bytes of an SQLite vault file (what backups hold)."""
        with self.read() as tx:
            generation = tx.generation()
            dump = tx.dump()
        return SqliteStorage.image(dump, generation)

    def forget_deleted(self) -> None:
        """Let PostgreSQL reclaim destroyed rows now (VACUUM), rather than at its next autovacuum.

        PostgreSQL does not overwrite dead rows (nor its WAL, nor its backups): destroyed key
        material stays sealed under the master key there until the space is reused.
        """
        try:
            with self._session() as conn:
                conn.execute("VACUUM key_versions, import_params")
        except (StorageUnavailable, psycopg.Error):
            pass  # best effort: autovacuum does it later

    # --- the fleet (beyond the vault interface)

    def heartbeat(self, proxy_id: str, pid: int, host: str, port: int, interval: float) -> None:
        """This serving process is alive now, and says again in `interval` s (by the database's clock)."""
        with self._session() as conn:
            conn.execute(
                "INSERT INTO proxies (proxy_id, pid, host, port, heartbeat_seconds) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (proxy_id, pid) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port, "
                "heartbeat_seconds = EXCLUDED.heartbeat_seconds, last_seen = now()",
                (proxy_id, pid, host, port, interval),
            )

    def leave(self, proxy_id: str, pid: int) -> None:
        """This serving process stops (a clean shutdown): it no longer counts."""
        with self._session() as conn:
            conn.execute("DELETE FROM proxies WHERE proxy_id = %s AND pid = %s", (proxy_id, pid))

    def proxies(self, forget_after_seconds: float = 3600.0) -> list[ProxyRow]:
        """Every process that heartbeated recently, oldest first (long-dead rows are deleted)."""
        with self._session() as conn:
            conn.execute("DELETE FROM proxies WHERE last_seen < now() - make_interval(secs => %s)", (forget_after_seconds,))
            rows = conn.execute(
                "SELECT proxy_id, pid, host, port, heartbeat_seconds, extract(epoch FROM started_at), "
                "extract(epoch FROM last_seen), extract(epoch FROM now() - last_seen) FROM proxies "
                "ORDER BY started_at, proxy_id, pid"
            ).fetchall()
        return [ProxyRow(*r[:5], float(r[5]), float(r[6]), float(r[7])) for r in rows]

    def setting_revision(self, name: str) -> int:
        """The revision of a shared setting (0 if unset): one cheap query, for the watchers."""
        with self._session() as conn:
            row = conn.execute("SELECT revision FROM settings WHERE name = %s", (name,)).fetchone()
            return row[0] if row else 0


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
