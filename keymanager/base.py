"""The one interface between the XKS server and whatever holds the keys.

The server calls exactly these four operations (plus start/close) and nothing else; every
backend (the local vault, PKCS#11 HSMs) lives in its own module and implements them. Backends
raise only the `xks_proxy.errors` types, which the server maps to HTTP in one place.

A key is addressed by (store, key_id): `store` is the logical key store's URI prefix, so the
same key id under two prefixes names two different keys (or none).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol


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

    def release(self) -> None:
        """Called once by a serving process about to exit, after close(): let go of what belongs
        to the process rather than to this manager (a PKCS#11 module's initialisation)."""

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


# --- administration (the CLI's view of a backend) -----------------------------------------------


class KeyAdminError(Exception):
    """A refused administrative change or lookup, phrased for the operator (one line, no secrets)."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as the CLI shows it: never material. Fields a backend cannot know are None."""

    store: str
    key_id: str
    state: str
    usage: tuple[KeyUsage, ...]
    key_spec: str = "AES_256"
    versions: int | None = None
    created_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """What `keys show` prints: fields the backend does not know are left out."""
        shown: dict[str, Any] = {
            "keyId": self.key_id,
            "store": self.store,
            "keyStatus": self.state,
            "keyUsage": [u.value for u in self.usage],
            "keySpec": self.key_spec,
        }
        if self.versions is not None:
            shown["versions"] = self.versions
        if self.created_at is not None:
            shown["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at))
        return shown


class KeyAdmin(Protocol):
    """What `xks-proxy keys ...` needs from a backend, and nothing more.

    Synchronous (the CLI has no event loop). `store` is the logical key store's prefix (a backend
    may not partition keys by store: PKCS#11 does not; the CLI applies a store's key_ids).
    Every refusal is a KeyAdminError.
    """

    def create_key(self, store: str, key_id: str, usage: tuple[KeyUsage, ...]) -> KeyInfo: ...

    def keys(self, store: str) -> list[KeyInfo]: ...

    def key(self, store: str, key_id: str) -> KeyInfo: ...

    def set_state(self, store: str, key_id: str, state: str) -> KeyInfo: ...

    def rotate(self, store: str, key_id: str) -> KeyInfo: ...

    def close(self) -> None: ...
