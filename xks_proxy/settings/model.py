"""The typed configuration: frozen dataclasses, built once by `xks_proxy.config.load`.

Nothing downstream re-validates: if a `Config` exists, it is well-formed. A backend's own
section is parsed by the backend (`keymanager.base.Backend.parse_section`) into its own type,
which lives with it (`keymanager/vault/config.py`, `keymanager/pkcs11/config.py`); the model
names those types for type checkers only, so it never imports a backend.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymanager.crypto import Keyring
from xks_proxy.settings.fields import ConfigError
from xks_proxy.access.policy import EMPTY_POLICY, Policy
from xks_proxy.settings.fields import ConfigError

if TYPE_CHECKING:  # the backends' own section types: named here, never imported at run time
    from keymanager.pkcs11.config import Pkcs11Config
    from keymanager.vault.config import VaultConfig


@dataclass(frozen=True, slots=True)
class Credential:
    access_key_id: str
    secret: str | None = field(repr=False)  # None while the home is sealed: nothing verifies
    #: When it was made (POSIX seconds): its age is a metric, as KMS's XksProxyCredentialAge.
    #: None for a credential made before it was recorded.
    created_at: float | None = None


@dataclass(frozen=True, slots=True)
class Quota:
    """A token bucket: `rate` requests per second on average, bursts up to `burst`. rate 0 = no quota."""

    rate: float = 0.0
    burst: int = 0


#: No per-store quota unless configured: a limit nobody set must not refuse legitimate traffic.
#: (docs/access-control.md suggests KMS's own default quota, 1,800 requests per second.)
DEFAULT_QUOTA = Quota(rate=0.0, burst=0)


@dataclass(frozen=True, slots=True)
class Store:
    """A logical key store: one URI prefix, its regions, SigV4 credentials, policy and quota.

    `key_ids`, when set, is the only key ids this store may address (any backend; the server
    answers KeyNotFoundException for the others). None means every key the backend gives it.
    """

    prefix: str
    regions: frozenset[str]
    credentials: tuple[Credential, ...]
    key_ids: frozenset[str] | None = None
    policy: Policy = EMPTY_POLICY
    quota: Quota = Quota()

    def allows(self, key_id: str) -> bool:
        return self.key_ids is None or key_id in self.key_ids

    @property
    def uri_path(self) -> str:
        return f"/{self.prefix}/kms/xks/v1" if self.prefix else "/kms/xks/v1"

    def secret_for(self, access_key_id: str) -> str | None:
        for cred in self.credentials:
            if cred.access_key_id == access_key_id:
                return cred.secret
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    max_plaintext_bytes: int = 8192
    max_aad_bytes: int = 8192

    @property
    def max_body_bytes(self) -> int:
        """Base64 of the largest plaintext and AAD, plus room for requestMetadata and the rest."""
        return 4 * (self.max_plaintext_bytes // 3 + 1) + 4 * (self.max_aad_bytes // 3 + 1) + 16384


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    vendor: str = "xks-proxy"
    model: str = "xks-proxy-python"
    fleet_size: int = 1
    #: A request's headers must arrive within this many seconds of its first byte (of the connection, for the first one).
    header_timeout_seconds: float = 10.0
    #: Its body within this many seconds of its headers. KMS sends a request at once: seconds, not minutes.
    body_timeout_seconds: float = 10.0
    #: A keep-alive connection with no request in progress is closed after this long.
    idle_timeout_seconds: float = 75.0
    #: Open connections per worker process; one more is closed at accept, before its TLS handshake.
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """`[fleet]`: how this proxy appears to the others of its fleet (used only with `vault.dsn`)."""

    #: This proxy's name in the heartbeat table; default "<host name>:<port>".
    proxy_id: str | None = None
    #: How often each serving process says it is alive; a proxy silent for 3 of these is not counted.
    heartbeat_seconds: float = 1.0

    def name(self, port: int) -> str:
        return self.proxy_id or f"{socket.gethostname()}:{port}"


@dataclass(frozen=True, slots=True)
class AdminJwtConfig:
    """How admin API bearer tokens are verified: one HS256 secret, or RS256/ES256 public keys."""

    audience: str
    issuer: str
    hs256_secret: bytes | None = field(default=None, repr=False)
    public_keys: tuple[Any, ...] = ()  # RSAPublicKey / EllipticCurvePublicKey (P-256)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The optional HTTPS admin listener (off by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8444
    tls_cert: Path | None = None
    tls_key: Path | None = None
    jwt: AdminJwtConfig | None = None


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS. With no `client_ca`, clients are not asked for a certificate."""

    client_ca: Path | None = None
    #: Names a client certificate must carry (SAN DNS, or CN when it has none), lower case.
    client_names: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """`max_in_flight` caps requests being worked on at once across all stores (0 = no cap)."""

    max_in_flight: int = 256


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit log file (None = off) and its size-based rotation."""

    path: Path | None = None
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 10


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one proxy home.

    `backend_settings` is the chosen backend's own section as that backend parsed it (a
    `VaultConfig`, a `Pkcs11Config`, ...): the proxy hands it back to the backend untouched.
    `vault` is the `[vault]` section on every backend, parsed by the vault backend, because
    `vault.dsn` is also the fleet switch the server, CLI and admin API ask (None: not a fleet);
    on the vault backend it is the same object as `backend_settings`.
    """

    home: Path
    server: ServerConfig
    limits: Limits
    stores: tuple[Store, ...]
    backend: str
    vault: VaultConfig
    keyring: Keyring | None = field(repr=False)  # None: sealed (the seal waits for `xks-proxy unseal`)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    tls: TlsConfig = TlsConfig()
    throttle: ThrottleConfig = ThrottleConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    backend_settings: Any = None
    admin: AdminConfig = AdminConfig()
    fleet: FleetConfig = FleetConfig()
    seal: str = "file"  # the home's seal: shamir, passphrase, pkcs11 or file (keymanager.seal)

    @property
    def sealed(self) -> bool:
        return self.keyring is None

    @property
    def master_key(self) -> Keyring:
        """The master keys, to seal and open secrets at rest. ConfigError while the home is sealed."""
        if self.keyring is None:
            raise ConfigError(
                f"the home {self.home} is sealed ({self.seal} seal): unseal the running proxy (`xks-proxy unseal`), "
                "or give this command the shares or passphrase when it asks"
            )
        return self.keyring

    @property
    def pkcs11(self) -> Pkcs11Config | None:
        """The `[pkcs11]` section on the pkcs11 backend, else None (a convenience of the CLI and tests)."""
        return self.backend_settings if self.backend == "pkcs11" else None

    def store(self, prefix: str | None) -> Store:
        """The store a CLI command means: the one named, or the only one."""
        if prefix is None:
            if len(self.stores) == 1:
                return self.stores[0]
            raise ConfigError(f"there are {len(self.stores)} stores; name one with --store")
        for store in self.stores:
            if store.prefix == prefix.strip("/"):
                return store
        raise ConfigError(f"no store with prefix {prefix!r}")
