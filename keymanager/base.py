"""The interfaces between the proxy and whatever holds the keys.

The server calls exactly the four `KeyManager` operations (plus start/close) and nothing else;
every backend (the local vault, PKCS#11 HSMs) lives in its own package under `keymanager/` and
implements them. Backends raise only the `xks_proxy.errors` types, which the server maps to HTTP
in one place. The CLI and the admin API administer keys through `KeyAdmin` (every backend) and
`KeyLifecycle` (a backend with versions, scheduled deletion and BYOK import); a `Backend` entry
(see `keymanager.registry`) bundles a backend's factories and its optional capabilities, so that
nothing outside `keymanager/<backend>/` imports a backend's modules.

A key is addressed by (store, key_id): `store` is the logical key store's URI prefix, so the
same key id under two prefixes names two different keys (or none).
"""

from __future__ import annotations

import abc
import json
import logging
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

if TYPE_CHECKING:  # type-only: the configuration model is built from the backends' sections
    from keymanager.crypto import MasterKey
    from xks_proxy.settings.model import Config

#: An external key id, as the XKS API allows it (the same rule for every backend).
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

audit_log = logging.getLogger("xks_proxy.audit")


class KeyUsage(str, Enum):
    ENCRYPT = "ENCRYPT"
    DECRYPT = "DECRYPT"


class HealthState(str, Enum):
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    UNAVAILABLE = "UNAVAILABLE"


class KeyMetadata(NamedTuple):
    """What GetKeyMetadata reports: keySpec, keyUsage and keyStatus (ENABLED or DISABLED).

    This and `Encrypted` are made on every request: NamedTuples, immutable and built in a third
    of a frozen dataclass's time."""

    key_spec: str
    usage: tuple[KeyUsage, ...]
    enabled: bool


class Encrypted(NamedTuple):
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

    def gcm_invocations_ratio(self) -> float | None:
        """How near the most used key is to the AES-GCM invocation limit, for the metrics.

        AES-GCM with random 96-bit IVs allows 2^32 encryptions under one key (NIST SP 800-38D);
        this is the highest fraction of that limit spent by a key version this manager encrypts
        with (0.0 to 1.0). None: the backend does not count its encryptions (an HSM makes its
        own IVs and keeps its own limits), so there is nothing to report. Called every few
        seconds on the event loop: answered from memory, never from storage.
        """
        return None


# --- administration (the CLI's view of a backend) -----------------------------------------------


class KeyAdminError(Exception):
    """A refused administrative change or lookup, phrased for the operator (one line, no secrets)."""


class KeyRefused(KeyAdminError):
    """A refused key change: the key's state does not allow it (the CLI prints it as one line;
    the admin API answers 400 or 404 with its subclasses)."""


class NoSuchKey(KeyRefused):
    """The key does not exist in that store."""


class BadRequest(KeyRefused):
    """An argument out of range or malformed."""


class StorageUnavailable(KeyAdminError):
    """The backend's storage cannot be reached (or is too busy) now: nothing was changed; retry later.

    (A fleet's shared vault database that does not answer: the server answers
    DependencyTimeoutException, the CLI prints one line.)
    """


def parse_usage(text: str) -> tuple[KeyUsage, ...]:
    """'ENCRYPT,DECRYPT' -> usages in canonical order; '' -> none."""
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    try:
        usage = {KeyUsage(name) for name in names}
    except ValueError:
        raise BadRequest(f"usage must be a comma-separated subset of ENCRYPT,DECRYPT, not {text!r}") from None
    return tuple(u for u in KeyUsage if u in usage)


def iso_time(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


#: `extra=` of a log record that every process of a proxy would write alike (a reload, a vault
#: change): a proxy with several workers lets only its first worker write it (process/logsink.py).
PROXY_WIDE: dict[str, bool] = {"proxy_wide": True}


def iso_ms(timestamp: float) -> str:
    """UTC, ISO 8601, milliseconds: the one time format of every log line and audit record."""
    whole = int(timestamp)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{int(timestamp * 1000) % 1000:03d}Z"


def audit(event: dict[str, Any]) -> None:
    """One JSON line on the "xks_proxy.audit" logger (the audit sink of xks_proxy.access.audit reads it)."""
    audit_log.info(json.dumps({"time": iso_ms(time.time()), **event}, sort_keys=True))


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


class KeyLifecycle(Protocol):
    """What the `keys` commands and the admin API call, as JSON documents: a backend's lifecycle
    for one store and actor (audited), or `xks_proxy.admin.client.AdminClient` over the wire."""

    def create(self, key_id: str, usage: str, no_material: bool) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def show(self, key_id: str) -> dict[str, Any]: ...
    def enable(self, key_id: str) -> dict[str, Any]: ...
    def disable(self, key_id: str) -> dict[str, Any]: ...
    def rotate(self, key_id: str) -> dict[str, Any]: ...
    def versions(self, key_id: str) -> dict[str, Any]: ...
    def schedule_deletion(self, key_id: str, pending_days: int) -> dict[str, Any]: ...
    def cancel_deletion(self, key_id: str) -> dict[str, Any]: ...
    def import_params(self, key_id: str, algorithm: str, key_spec: str) -> dict[str, Any]: ...
    def import_material(self, key_id: str, import_token: str, encrypted_material: bytes) -> dict[str, Any]: ...


# --- optional capabilities of a backend ------------------------------------------------------


class SettingsTx(Protocol):
    """One transaction on a fleet's shared settings (a named document with a revision)."""

    def setting(self, name: str) -> tuple[str, int] | None: ...
    def put_setting(self, name: str, document: str, at: float, actor: str) -> None: ...


class ProxyInfo(Protocol):
    """One serving process of a fleet, as its last heartbeat left it."""

    proxy_id: str
    pid: int
    host: str
    port: int
    heartbeat_seconds: float
    started_at: float
    last_seen: float
    age_seconds: float


class SharedStorage(Protocol):
    """The database a fleet shares: its heartbeat table and its settings (the key stores).

    Every method may raise StorageUnavailable.
    """

    display: str
    server_version: str

    def schema_version(self) -> int: ...
    def generation(self) -> int: ...
    def read(self) -> AbstractContextManager[SettingsTx]: ...
    def write(self) -> AbstractContextManager[SettingsTx]: ...
    def setting_revision(self, name: str) -> int: ...
    def heartbeat(self, proxy_id: str, pid: int, host: str, port: int, heartbeat_seconds: float) -> None: ...
    def leave(self, proxy_id: str, pid: int) -> None: ...
    def proxies(self) -> list[Any]: ...  # list[ProxyInfo]
    def close(self) -> None: ...


class Backup(Protocol):
    """A consistent copy of a backend's key storage, and the checks of a restored one."""

    #: The storage's file name inside a backup (and in a restored home).
    file_name: str

    def snapshot(self, config: "Config") -> bytes:
        """The whole key storage as bytes of a file, consistent, safe while servers run."""
        ...

    def check_restored(self, config: "Config", cancel_deletions: bool) -> dict[str, Any]:
        """Open the restored storage under `config`'s master key; raise KeyAdminError if it does not
        open. Returns {"keys": n, "pendingDeletion"|"deletionCancelled": [...]}."""
        ...


class Fleet(Protocol):
    """Several proxies sharing this backend's keys in one database (`vault.dsn`)."""

    def shared_storage(self, config: "Config") -> SharedStorage: ...

    def seal_record(self, dsn: str) -> Any:
        """The fleet's seal record (`keymanager.seal.record`): read() -> SealRecord | None, write(record)."""
        ...

    def move_into(self, config: "Config", copy_local: bool) -> int:
        """Create the shared database's tables and copy the local keys into it (only into an empty
        one: KeyRefused otherwise); returns the number of keys copied."""
        ...


@dataclass(frozen=True)
class Backend:
    """One key backend, as the registry lists it: how to build what the proxy needs from it.

    `key_manager` serves (the server), `key_admin` administers (the CLI). The rest are optional
    capabilities, None where the backend has none: `lifecycle(admin, store, actor, via)` is the
    full audited lifecycle (versions, scheduled deletion, BYOK; without it the CLI offers what
    KeyAdmin does), `init_home(home, master_key)` creates the backend's files in a new home and
    returns its config.toml sections, `backup` and `fleet` as their protocols say.
    `parse_section(home, raw)` validates the backend's own config.toml section(s) of the document
    `raw` into its typed settings, which live in its package (ConfigError naming the field, from
    the leaf `xks_proxy.settings.fields`): `xks_proxy.config.load` calls it once, and
    `Config.backend_settings` carries the result back to the backend's factories.
    """

    name: str
    key_manager: Callable[["Config"], KeyManager]
    key_admin: Callable[["Config"], KeyAdmin]
    lifecycle: Callable[[Any, str, str, str], KeyLifecycle] | None = None
    init_home: Callable[[Path, "MasterKey"], dict[str, Any]] | None = None
    backup: Backup | None = None
    fleet: Fleet | None = None
    parse_section: Callable[[Path, dict[str, Any]], Any] | None = None
    #: Key administration from the backend's own settings alone, before a home exists (import-config
    #: checks an HSM with it); None where `key_admin` needs the whole configuration.
    key_admin_for: Callable[[Any], KeyAdmin] | None = None
    #: A master key rotation's step: `reseal(config, keyring, also)` re-seals everything the backend
    #: keeps sealed under the keyring's current key in ONE transaction, in which `also(tx)` runs
    #: too (a fleet's shared stores and seal record live in the same database); returns counts.
    #: None where the backend keeps nothing sealed under the master key (an HSM's keys).
    reseal: Callable[["Config", Any, Callable[[Any], dict[str, int]] | None], dict[str, int]] | None = None
