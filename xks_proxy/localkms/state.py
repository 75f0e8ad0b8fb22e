"""The local KMS's SQLite state: one table of JSON documents per kind (keys, aliases, stores, principals).

Documents hold metadata in clear and every secret already sealed (base64 of a `Keyring.seal`
blob, under a context naming what it is), so this module never sees a secret. KMS's data model is
small and every operation touches one or two documents, so a document table is enough; SQLite in
WAL mode lets `local-kms principal add` write while the server runs.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

KINDS = ("key", "alias", "store", "principal", "settings")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    created REAL NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (kind, id)
)
"""


class State:
    """Documents by (kind, id), in creation order. Each call is its own transaction."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, kind: str, id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT doc FROM objects WHERE kind = ? AND id = ?", (kind, id)).fetchone()
        return json.loads(row[0]) if row else None

    def all(self, kind: str) -> Iterator[dict[str, Any]]:
        for (doc,) in self._db.execute("SELECT doc FROM objects WHERE kind = ? ORDER BY created, id", (kind,)).fetchall():
            yield json.loads(doc)

    def insert(self, kind: str, id: str, doc: dict[str, Any], created: float) -> bool:
        """False when (kind, id) exists already (the caller answers AlreadyExists or makes a new id)."""
        try:
            self._db.execute("INSERT INTO objects (kind, id, created, doc) VALUES (?, ?, ?, ?)", (kind, id, created, json.dumps(doc)))
        except sqlite3.IntegrityError:
            return False
        return True

    def put(self, kind: str, id: str, doc: dict[str, Any]) -> None:
        """Replace an existing document (its creation order is kept)."""
        self._db.execute("UPDATE objects SET doc = ? WHERE kind = ? AND id = ?", (json.dumps(doc), kind, id))

    def delete(self, kind: str, id: str) -> bool:
        return self._db.execute("DELETE FROM objects WHERE kind = ? AND id = ?", (kind, id)).rowcount > 0
