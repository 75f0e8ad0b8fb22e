"""The vault on PostgreSQL, shared by a fleet of proxies: the connection, and the fleet's own rows.

The vault's statements, schema and transactions are `keymanager.vault.sql`'s, written once for
SQLite and PostgreSQL, so `VaultDB` runs its lifecycle rules unchanged over either. Key
material arrives here already sealed under the master key (`keymanager.crypto`); the database
never sees it in clear.

Concurrency (`keymanager.vault.sql.POSTGRES`). Every `write()` transaction first locks the
generation row (`SELECT ... FOR UPDATE`), so writers across the whole fleet take turns exactly
as SQLite's `BEGIN IMMEDIATE` makes them. Writes are rare and short (a lifecycle change; one
reservation per `count_block` encryptions per proxy), so one fleet-wide writer at a time costs
nothing measurable. `read()` is a REPEATABLE READ READ ONLY transaction: one consistent snapshot
for a full key load.

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

from keymanager.base import StorageUnavailable
from keymanager.vault.rows import SchemaError
from keymanager.vault.dialect import POSTGRES
from keymanager.vault.sql import SqlStorage, SqlTx
from keymanager.vault.storage import SqliteStorage

#: The fleet's tables, made with the vault's schema (PostgreSQL only: a fleet needs a server).
_FLEET_TABLES = """
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
)
"""

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


class PostgresTx(SqlTx):
    """The vault's row operations (`SqlTx`), and the fleet's shared settings."""

    # --- the fleet's shared settings (beyond the vault interface)

    def setting(self, name: str) -> tuple[str, int] | None:
        """(document, revision) of a shared setting, or None."""
        row = self._run("SELECT document, revision FROM settings WHERE name = ?", (name,)).fetchone()
        return (row[0], row[1]) if row else None

    def put_setting(self, name: str, document: str, now: float, actor: str) -> int:
        """Store a shared setting; returns its new revision."""
        row = self._run(
            "INSERT INTO settings (name, document, revision, updated_at, updated_by) VALUES (?, ?, 1, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET document = EXCLUDED.document, revision = settings.revision + 1, "
            "updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by RETURNING revision",
            (name, document, now, actor),
        ).fetchone()
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


class PostgresStorage(SqlStorage):
    """The shared vault in one PostgreSQL database. Safe to share between threads (one lock)."""

    dialect = POSTGRES
    noun = "vault database"
    own_tables = _FLEET_TABLES

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
            for statement in POSTGRES.session:
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

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        if not (conn.broken or conn.closed):  # a lost session's transaction ended with it
            conn.execute("ROLLBACK")

    def _tx(self, conn: psycopg.Connection[Any], bump: bool) -> PostgresTx:
        return PostgresTx(conn, POSTGRES, bump)

    def migrate(self, now: float) -> tuple[int, int]:
        """As `SqlStorage.migrate`; a refusal by the server (e.g. no CREATE permission) is a SchemaError."""
        try:
            return super().migrate(now)
        except psycopg.Error as exc:  # not a lost connection (that is StorageUnavailable): the operator must fix it
            raise SchemaError(_reason(exc, self._password)) from None

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

