"""The one interface between the XKS server and whatever holds the keys.

The server calls exactly these four operations (plus start/close) and nothing else; every
backend (the local vault, PKCS#11 HSMs) lives in its own module and implements them. Backends
raise only the `xks_proxy.errors` types, which the server maps to HTTP in one place.

A key is addressed by (store, key_id): `store` is the logical key store's URI prefix, so the
same key id under two prefixes names two different keys (or none).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum


class KeyUsage(str, Enum):
    ENCRYPT = "ENCRYPT"
    DECRYPT = "DECRYPT"


class HealthState(str, Enum):
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class KeyMetadata:
    """What GetKeyMetadata reports: keySpec, keyUsage and keyStatus (ENABLED or DISABLED)."""

    key_spec: str
    usage: tuple[KeyUsage, ...]
    enabled: bool


@dataclass(frozen=True, slots=True)
class Encrypted:
    """An AES-GCM result. `metadata` is the ciphertextMetadata, bound into the AAD (may be b"")."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    metadata: bytes
    key_version: int | None = None


@dataclass(frozen=True, slots=True)
class EkmHealth:
    """One entry of ekmFleetDetails: an HSM, a vault, a database."""

    id: str
    model: str
    state: HealthState


class KeyManager(abc.ABC):
    """A source of AES-256 keys addressed by (store, key_id).

    Implementations must be safe to call concurrently from one event loop and must never block
    it for longer than a fast in-memory AES operation: anything slower (an HSM, a disk) runs on
    a thread pool with a timeout.
    """

    #: ekmVendor in GetHealthStatus.
    vendor: str = "xks-proxy"

    async def start(self) -> None:
        """Open connections, load keys, start background refresh. Called once before serving."""

    async def close(self) -> None:
        """Release everything start() acquired."""

    @abc.abstractmethod
    async def get_metadata(self, store: str, key_id: str) -> KeyMetadata:
        """Raise KeyNotFoundException for an unknown key."""

    @abc.abstractmethod
    async def encrypt(self, store: str, key_id: str, plaintext: bytes, aad: bytes | None) -> Encrypted:
        """AES-GCM encrypt with the AAD construction of `keymanager.crypto.bind_aad`.

        Raises KeyNotFoundException, InvalidStateException (disabled or unusable key) or
        InvalidKeyUsageException (key may not encrypt).
        """

    @abc.abstractmethod
    async def decrypt(
        self,
        store: str,
        key_id: str,
        ciphertext: bytes,
        iv: bytes,
        tag: bytes,
        aad: bytes | None,
        metadata: bytes | None,
    ) -> bytes:
        """Reverse of encrypt. A failed authentication is InvalidCiphertextException."""

    def key_version(self, metadata: bytes | None) -> int | None:
        """The key version a ciphertextMetadata names, for the audit log; None when unknown.

        Never raises: a malformed value is the decrypt call's business, not the log's.
        """
        return None

    @abc.abstractmethod
    async def health(self) -> list[EkmHealth]:
        """A deep check: a real encrypt+decrypt on an internal key no KMS key can address."""
