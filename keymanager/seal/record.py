"""The seal record: which seal a home has, its parameters, and the master keys wrapped under its KEK.

One small JSON document, safe to read (everything in it is public or wrapped): `seal.json` in a
single proxy's home, or the row `seal` of the fleet's PostgreSQL vault (every proxy of a fleet
unseals with the same shares). It is written whole and atomically; a change of seal (rekey) or of
master key (rotation) is one write of it. `current` seals; any other key in `keys` is being
retired by an interrupted or running rotation and still opens what was sealed under it.

    {"format": 1, "seal": "shamir", "params": {"threshold": 3, "shares": 5, "identifier": 1234},
     "current": "<key id>", "keys": {"<key id>": "<base64 of the wrapped master key>", ...},
     "links": {"<key id>": "<base64 of it sealed under the key it succeeded>"}}  (during a rotation)
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keymanager.crypto import MasterKey

FORMAT = 1
SEAL_FILE = "seal.json"
KINDS = ("shamir", "passphrase", "pkcs11", "file")


class SealError(Exception):
    """A seal that cannot be made, read or opened. The message is one line, safe to show."""


@dataclass(frozen=True)
class SealRecord:
    kind: str
    params: dict[str, Any]
    current: str
    keys: dict[str, bytes] = field(default_factory=dict)
    #: key id -> that key sealed under the key it succeeded (`Keyring.link`): a process opened
    #: before a rekey (another KEK) still adopts a rotation's new key through the key it holds.
    #: Only while the rotation runs: a link kept after it would hand the new key to the old key's holder.
    links: dict[str, bytes] = field(default_factory=dict)

    @property
    def retiring(self) -> tuple[str, ...]:
        """Key ids a rotation has not finished moving away from."""
        return tuple(k for k in self.keys if k != self.current)

    def with_keys(self, current: str, keys: dict[str, bytes], links: dict[str, bytes] | None = None) -> "SealRecord":
        kept = {k: v for k, v in (self.links if links is None else links).items() if k in keys}
        return replace(self, current=current, keys=dict(keys), links=kept)

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "seal": self.kind,
            "params": self.params,
            "current": self.current,
            "keys": {kid: base64.b64encode(blob).decode() for kid, blob in self.keys.items()},
        }
        if self.links:
            doc["links"] = {kid: base64.b64encode(blob).decode() for kid, blob in self.links.items()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "SealRecord":
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise SealError(f"{where}: seal record format {doc.get('format')!r} is not supported by this xks-proxy")
            if doc["seal"] not in KINDS:
                raise SealError(f"{where}: unknown seal {doc['seal']!r}")
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in doc["keys"].items()}
            links = {str(k): base64.b64decode(v, validate=True) for k, v in doc.get("links", {}).items()}
            record = cls(kind=doc["seal"], params=dict(doc["params"]), current=str(doc["current"]), keys=keys, links=links)
        except SealError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SealError(f"{where}: the seal record is malformed") from None
        if record.current not in record.keys:
            raise SealError(f"{where}: the seal record's current key is not in its keyring")
        return record


def wrap_all(kek: Any, masters: list[MasterKey]) -> dict[str, bytes]:
    return {m.key_id: kek.wrap(m) for m in masters}


class FileRecord:
    """The record as `seal.json` in a home: replaced whole (write, fsync, rename, fsync the directory)."""

    def __init__(self, home: Path) -> None:
        self.path = home / SEAL_FILE
        self.display = str(self.path)

    def read(self) -> SealRecord | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SealError(f"{self.path}: cannot read: {exc.strerror}") from None
        return SealRecord.from_bytes(data, str(self.path))

    def write(self, record: SealRecord) -> None:
        write_atomic(self.path, record.to_bytes())

    def replace(self, expected: SealRecord | None, record: SealRecord) -> None:
        """Write `record` only if the record is still `expected` (a rekey and a rotation never
        overwrite each other's keys). SealError otherwise. Serialised by a lock file in the home."""
        import fcntl

        fd = os.open(self.path.with_name(".seal.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.read() != expected:
                raise SealError(CHANGED)
            self.write(record)
        finally:
            os.close(fd)  # releases the lock


#: The refusal when the record changed between reading and replacing it.
CHANGED = "the seal record changed meanwhile (another rekey or rotation?); run the command again"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (0600) so that a crash at any instant leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
