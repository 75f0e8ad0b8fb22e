"""What SQLite and PostgreSQL spell differently in the vault's SQL: one small table.

Every vault statement is written once (`keymanager.vault.sql`, `keymanager.vault.schema`), with
`?` placeholders, in SQL both engines speak (including `INSERT ... ON CONFLICT`, SQLite's since
3.24). What differs is here: the driver's placeholder, column types, the two-argument maximum,
how a transaction begins (and so which lock it holds), the connection's settings, and how to
ask whether a table exists. Driver error classes are not: which errors mean "the database is
gone" is the connection handling's (`keymanager.vault.postgres`), and a local file has none.
"""

from __future__ import annotations

from dataclasses import dataclass

_SCHEMA_LOCK = 0x786B7331  # pg_advisory_xact_lock id ("xks1"): one proxy creates or upgrades the schema


@dataclass(frozen=True, slots=True)
class Dialect:
    """What SQLite and PostgreSQL spell differently; everything else is written once."""

    name: str
    #: The driver's parameter marker (statements are written with `?`).
    placeholder: str
    #: DDL column types: 64-bit counters, epoch seconds, sealed blobs.
    int64: str
    real: str
    blob: str
    #: The two-argument maximum (a reserved count never goes below zero).
    greatest: str
    #: A statement that yields a row if the table named by its parameter exists.
    table_exists: str
    #: Run on every new connection.
    session: tuple[str, ...]
    #: Begin a schema change: one process at a time creates or upgrades the schema.
    begin_schema: tuple[str, ...]
    #: Begin a write, holding the vault-wide writer lock from the start.
    begin_write: tuple[str, ...]
    #: Begin one consistent snapshot for several reads.
    begin_read: tuple[str, ...]

    def sql(self, statement: str) -> str:
        """The statement with this driver's placeholders (no vault statement has a literal `?`)."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def script(self, text: str) -> list[str]:
        """The `;`-separated statements of a DDL script, with this dialect's column types."""
        text = text.format(int64=self.int64, real=self.real, blob=self.blob)
        return [self.sql(s.strip()) for s in text.split(";") if s.strip()]


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    int64="INTEGER",
    real="REAL",
    blob="BLOB",
    greatest="MAX",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    # Durable commits; destroyed key material is overwritten, not left in free pages.
    session=("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON", "PRAGMA secure_delete=ON"),
    begin_schema=("BEGIN IMMEDIATE",),
    begin_write=("BEGIN IMMEDIATE",),  # the database's write lock: writers queue
    begin_read=("BEGIN",),
)
POSTGRES = Dialect(
    name="postgresql",
    placeholder="%s",
    int64="BIGINT",
    real="DOUBLE PRECISION",
    blob="BYTEA",
    greatest="GREATEST",
    # A catalog scan, not to_regclass(): that can answer from a cache older than the schema lock.
    table_exists="SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = ?",
    # Server-side bounds on how long anything can hang.
    session=(
        "SET statement_timeout = '10s'",
        "SET lock_timeout = '10s'",
        "SET idle_in_transaction_session_timeout = '60s'",
    ),
    begin_schema=("BEGIN", f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"),
    # The generation row is the fleet-wide writer lock; READ COMMITTED then shows each later
    # statement everything committed before the lock was granted.
    begin_write=("BEGIN", "SELECT value FROM meta WHERE name = 'generation' FOR UPDATE"),
    begin_read=("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",),
)
