"""The vault's vocabulary: key states, what a key looks like to the CLI and admin API, what the
key manager holds in memory, and what a sealed key blob is bound to.

Shared by `keymanager.vault.db` (the lifecycle rules), `keymanager.vault.byok` (import) and
`keymanager.vault.manager` (serving), so that none of them imports another for a name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from keymanager.base import KeyInfo as BaseKeyInfo
from keymanager.base import KeyRefused, KeyUsage, NoSuchKey, iso_time, parse_usage
from keymanager.crypto import DataKey
from keymanager.vault.rows import KeyRow, StorageTx
from xks_proxy.errors import InvalidCiphertextException

ENABLED, DISABLED, PENDING_IMPORT, PENDING_DELETION = "ENABLED", "DISABLED", "PENDING_IMPORT", "PENDING_DELETION"
ORIGIN_VAULT, ORIGIN_EXTERNAL = "VAULT", "EXTERNAL"
INTERNAL_STORE = "#internal"  # '#' is not a prefix character: no URI can reach these keys.
HEALTH_KEY = "health"
MAX_ENCRYPTIONS = 1 << 32  # NIST SP 800-38D, random 96-bit IVs: never more under one key
DEFAULT_ROTATE_AFTER = 1 << 31
DEFAULT_COUNT_BLOCK = 1 << 16
_METADATA = struct.Struct(">BI")  # format 1, key version
_METADATA_FORMAT = 1


class VaultError(KeyRefused):
    """A refused vault change: the key's state does not allow it (the CLI prints it as one line).

    Its name is what audit records show as the outcome of such a refusal; NoSuchKey and
    BadRequest (keymanager.base) are its siblings under KeyRefused.
    """


@dataclass(frozen=True, slots=True)
class KeyInfo(BaseKeyInfo):
    """A vault key as the CLI and admin API show it: no material; lifecycle fields added."""

    origin: str = ORIGIN_VAULT
    current_version: int | None = None
    deletion_date: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **BaseKeyInfo.to_json(self),
            "origin": self.origin,
            "currentVersion": self.current_version,
            "deletionDate": iso_time(self.deletion_date),
        }


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One key version: when made, and how many encryptions the vault has reserved for it.

    `reserved` is an upper bound on the encryptions done under it since `counted_since` (exact
    after every server using it shut down cleanly; a crash leaves the unused part counted).
    """

    version: int
    created_at: float
    reserved: int
    counted_since: float
    current: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": iso_time(self.created_at),
            "current": self.current,
            "encryptionsReserved": self.reserved,
            "encryptionsPerformed": None,  # counted in a serving process's memory: the admin API tells it
            "countedSince": iso_time(self.counted_since),
        }


@dataclass(frozen=True, slots=True)
class Grant:
    """Encryptions a server may do under `version`; `rotated` if this reservation made the version."""

    version: int | None
    count: int
    rotated: bool = False


def material_context(store: str, key_id: str, version: int) -> str:
    """What a sealed key blob is bound to: it opens only as this version of this key."""
    return f"xks-proxy key {store!r} {key_id!r} v{version}"


def encode_metadata(version: int) -> bytes:
    return _METADATA.pack(_METADATA_FORMAT, version)


def decode_metadata(metadata: bytes | None) -> int:
    """Key version named by ciphertextMetadata. No metadata means version 1.

    (Ciphertexts made by other proxies over imported material carry no metadata of ours.)
    """
    if not metadata:
        return 1
    if len(metadata) != _METADATA.size or metadata[0] != _METADATA_FORMAT:
        raise InvalidCiphertextException("ciphertextMetadata was not produced by this key store")
    return _METADATA.unpack(metadata)[1]


def existing_row(tx: StorageTx, store: str, key_id: str) -> KeyRow:
    """The key's row; NoSuchKey if there is none (the internal store is never shown)."""
    row = tx.key(store, key_id)
    if row is None or store == INTERNAL_STORE:
        raise NoSuchKey(f"no key {key_id} in store {store!r}")
    return row


def key_info(row: KeyRow) -> KeyInfo:
    return KeyInfo(
        store=row.store,
        key_id=row.key_id,
        state=row.state,
        usage=parse_usage(row.usage),
        versions=row.version_count,
        created_at=row.created_at,
        origin=row.origin,
        current_version=row.current_version,
        deletion_date=row.deletion_date,
    )


@dataclass(slots=True)
class UsageCounter:
    """This process's encryptions under one key version, and how many the vault granted it."""

    used: int = 0
    granted: int = 0


@dataclass(slots=True)
class LoadedKey:
    state: str
    usage: frozenset[KeyUsage]
    origin: str
    versions: dict[int, DataKey]
    current: int | None
    #: The current version's counter (linked by the key manager; survives reloads).
    counter: UsageCounter | None = field(default=None)
