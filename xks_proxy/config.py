"""Configuration: read once at start from `<home>/config.toml`, validated into typed objects.

A bad value stops the program with one line naming the field (`ConfigError`). Nothing
downstream re-validates: if a `Config` exists, it is well-formed. Credential secrets are kept
in the file sealed under the master key (the same protection as key material), and are opened
here, once.

A fleet (`[vault] dsn`: the vault in PostgreSQL, shared) keeps its key stores in that database,
so every proxy serves the same stores and credentials: config.toml then holds only this node's
settings, and `load()` reads the stores from the database (`xks_proxy.shared_settings`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keymanager.crypto import MasterKey
from xks_proxy.access.policy import EMPTY_POLICY, Policy, PolicyError, compile_policy

DEFAULT_HOME = Path.home() / ".xks-proxy"
CONFIG_FILE = "config.toml"

PREFIX_RE = re.compile(r"^[a-zA-Z0-9_-]+(/[a-zA-Z0-9_-]+)*$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ACCESS_KEY_RE = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET_RE = re.compile(r"^[a-zA-Z0-9/+=]{43,64}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
DNS_NAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


class ConfigError(Exception):
    """A configuration problem, phrased as `field: what is wrong`."""


def home_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--home beats XKS_PROXY_HOME beats ~/.xks-proxy."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("XKS_PROXY_HOME")
    return Path(env).expanduser().resolve() if env else DEFAULT_HOME


@dataclass(frozen=True, slots=True)
class Credential:
    access_key_id: str
    secret: str = field(repr=False)


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
class VaultConfig:
    path: Path
    refresh_seconds: float = 0.5
    #: A key version gets a successor before it exceeds this many encryptions (AES-GCM limit: 2^32).
    rotate_after_encryptions: int = 1 << 31
    #: Encryptions a server reserves in the vault at a time (what a crash can leave counted but unused).
    count_block: int = 1 << 16
    #: PostgreSQL connection string of a vault shared by a fleet; None: the SQLite file at `path`.
    #: It may hold a password (from dsn_file or dsn_env): never print it, use `dsn_display`.
    dsn: str | None = field(default=None, repr=False)

    @property
    def dsn_display(self) -> str:
        from keymanager.vault.postgres import display_dsn

        return display_dsn(self.dsn) if self.dsn else str(self.path)


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


IV_MODES = ("proxy", "hsm-zero-buffer", "hsm-appended")
MAX_METADATA_BYTES = 20
#: ciphertextMetadata of PKCS#11 ciphertexts unless configured: format 2 = "HSM key, AAD construction 1"
#: (the vault's is format 1). It versions the construction, as the protocol notes advise.
PKCS11_DEFAULT_METADATA = b"\x02"
_PKCS11_FIELDS = frozenset(
    {
        "module", "token_label", "slot", "pin_file", "pin_env", "session_pool_size", "session_wait_seconds",
        "operation_timeout_seconds", "refresh_seconds", "iv_mode", "ciphertext_metadata_b64", "health_key",
        "health_cache_seconds",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """The `[pkcs11]` section: which module and token, how to log in, pool and timeouts, IV mode.

    The PIN is read here from `pin_file` (owner-only) or `$pin_env`, never from config.toml, and
    is never printed: it is excluded from repr.
    """

    module: Path
    pin: str = field(repr=False)
    token_label: str | None = None
    slot: int | None = None
    session_pool_size: int = 8
    session_wait_seconds: float = 0.05
    operation_timeout_seconds: float = 0.2
    refresh_seconds: float = 1.0
    iv_mode: str = "proxy"
    ciphertext_metadata: bytes = PKCS11_DEFAULT_METADATA
    health_key: str = "xks-proxy-health"
    health_cache_seconds: float = 60.0


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
    home: Path
    server: ServerConfig
    limits: Limits
    stores: tuple[Store, ...]
    backend: str
    vault: VaultConfig
    master_key: MasterKey = field(repr=False)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    tls: TlsConfig = TlsConfig()
    throttle: ThrottleConfig = ThrottleConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    pkcs11: Pkcs11Config | None = None
    admin: AdminConfig = AdminConfig()
    fleet: FleetConfig = FleetConfig()

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


def load(home: Path, shared: bool = True) -> Config:
    """Read and validate `<home>/config.toml`. Raises ConfigError naming the bad field.

    With a shared vault (`vault.dsn`) the stores come from the vault database, unless `shared`
    is False (then `stores` is empty: for commands that must work before the database does).
    Raises keymanager.base.StorageUnavailable if that database does not answer.
    """
    return from_raw(home, read_raw(home), shared)


def read_raw(home: Path) -> dict[str, Any]:
    """The TOML document as parsed, unvalidated (the CLI edits this and writes it back)."""
    path = home / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no configuration here; run `xks-proxy init --home {home}` first")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def from_raw(home: Path, raw: dict[str, Any], shared: bool = True) -> Config:
    """Validate a parsed document into a Config (also used to check an edit before writing it).

    `shared`: as for `load`. A fleet's config.toml has no `[[stores]]`: they are in its database.
    """
    master_key = _master_key(home, _table(raw, "master_key"))
    backend = _choice(_table(raw, "keymanager"), "keymanager.backend", "backend", ("vault", "pkcs11"), "vault")
    vault = _vault(home, _table(raw, "vault"))
    if vault.dsn is not None and backend != "vault":
        raise ConfigError(f"vault.dsn: a shared vault database is for keymanager.backend = \"vault\", not {backend}")
    if vault.dsn is not None and "stores" in raw:
        raise ConfigError(
            "stores: with vault.dsn the key stores live in the vault database, shared by the fleet; "
            f"`xks-proxy fleet init --home {home}` moves them there"
        )
    throttle_table = _table(raw, "throttle")
    stores = () if vault.dsn is not None else _stores(raw.get("stores"), master_key, _default_quota(raw))
    config = Config(
        home=home,
        server=_server(home, _table(raw, "server")),
        limits=_limits(_table(raw, "limits")),
        stores=stores,
        backend=backend,
        vault=vault,
        master_key=master_key,
        raw=raw,
        tls=_tls(home, _table(raw, "tls"), stores),
        throttle=_throttle(throttle_table),
        metrics=_metrics(_table(raw, "metrics")),
        audit=_audit(home, raw.get("audit", {"path": "audit.log"})),
        pkcs11=_pkcs11(home, raw) if backend == "pkcs11" else None,
        admin=_admin(home, _table(raw, "admin"), backend),
        fleet=_fleet(_table(raw, "fleet"), vault),
    )
    if vault.dsn is not None and shared:
        from xks_proxy.fleet import shared_settings

        config = shared_settings.load_into(config)
    return config


def with_stores(config: Config, stores_raw: Any, where: str = "stores") -> Config:
    """`config` serving the `[[stores]]` tables `stores_raw`, validated as config.toml's are.

    (A fleet's stores come from its database; what derives from them, such as the default mTLS
    client names, is derived again here.)
    """
    try:
        stores = _stores(stores_raw, config.master_key, _default_quota(config.raw))
        tls = _tls(config.home, _table(config.raw, "tls"), stores)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where != "stores" else str(exc)) from None
    return replace(config, stores=stores, tls=tls)


def _default_quota(raw: dict[str, Any]) -> Quota:
    """`[throttle]` rate and burst: the quota of every store that sets none of its own."""
    return _quota(_table(raw, "throttle"), "throttle", DEFAULT_QUOTA)


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table")
    return value


def _get(table: dict[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: must be a {kind.__name__}")
    return value


def _choice(table: dict[str, Any], where: str, key: str, options: tuple[str, ...], default: str) -> str:
    value = _get(table, where, key, str, default)
    if value not in options:
        raise ConfigError(f"{where}: must be one of {', '.join(options)}")
    return value


def _file(home: Path, table: dict[str, Any], where: str, key: str, default: str | None) -> Path | None:
    value = table.get(key, default)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a path")
    path = (home / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: file {path} does not exist")
    return path


def _int_range(table: dict[str, Any], where: str, key: str, default: int, low: int, high: int) -> int:
    value = _get(table, where, key, int, default)
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be between {low} and {high}")
    return value


def _only(table: dict[str, Any], where: str, names: tuple[str, ...]) -> None:
    """A misspelt setting must not be silently ignored."""
    for key in table:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown setting (expected one of {', '.join(names)})")


def _tls(home: Path, table: dict[str, Any], stores: tuple[Store, ...]) -> TlsConfig:
    """Allowed client names default to `cks.kms.<region>.amazonaws.com` for every configured region."""
    _only(table, "tls", ("client_ca", "client_names"))
    names = table.get("client_names")
    if names is None:
        regions = sorted({region for store in stores for region in store.regions})
        names = [f"cks.kms.{region}.amazonaws.com" for region in regions]
    elif not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError("tls.client_names: must be a non-empty list of DNS names")
    for name in names:
        if not DNS_NAME_RE.match(name):
            raise ConfigError(f"tls.client_names: {name!r} is not a DNS name")
    return TlsConfig(
        client_ca=_file(home, table, "tls.client_ca", "client_ca", None),
        client_names=frozenset(n.lower() for n in names),
    )


def _quota(table: dict[str, Any], where: str, default: Quota) -> Quota:
    """A token bucket; a rate given without a burst admits one second's worth at once."""
    rate = _get(table, f"{where}.rate", "rate", float, default.rate)
    if not 0 <= rate <= 1e6:
        raise ConfigError(f"{where}.rate: must be between 0 (no quota) and 1000000 requests per second")
    default_burst = max(1, int(rate)) if "rate" in table else default.burst
    burst = _int_range(table, f"{where}.burst", "burst", default_burst, 0, 10_000_000)
    if rate > 0 and burst < 1:
        raise ConfigError(f"{where}.burst: must be at least 1 when a rate is set")
    return Quota(rate=rate, burst=burst)


def _throttle(table: dict[str, Any]) -> ThrottleConfig:
    _only(table, "throttle", ("max_in_flight", "rate", "burst"))
    return ThrottleConfig(max_in_flight=_int_range(table, "throttle.max_in_flight", "max_in_flight", 256, 0, 1_000_000))


def _metrics(table: dict[str, Any]) -> MetricsConfig:
    _only(table, "metrics", ("enabled", "host", "port"))
    return MetricsConfig(
        enabled=_get(table, "metrics.enabled", "enabled", bool, False),
        host=_get(table, "metrics.host", "host", str, "127.0.0.1"),
        port=_int_range(table, "metrics.port", "port", 9464, 0, 65535),
    )


def _audit(home: Path, table: Any) -> AuditConfig:
    """Audit is on by default (`audit.log` in the home); `path = ""` turns it off."""
    if not isinstance(table, dict):
        raise ConfigError("audit: must be a table")
    _only(table, "audit", ("path", "max_bytes", "backups"))
    path = _get(table, "audit.path", "path", str, "audit.log")
    return AuditConfig(
        path=(home / path).resolve() if path else None,
        max_bytes=_int_range(table, "audit.max_bytes", "max_bytes", 100 * 1024 * 1024, 4096, 1 << 40),
        backups=_int_range(table, "audit.backups", "backups", 10, 1, 1000),
    )


def _server(home: Path, table: dict[str, Any]) -> ServerConfig:
    return ServerConfig(
        host=_get(table, "server.host", "host", str, "127.0.0.1"),
        port=_int_range(table, "server.port", "port", 8443, 0, 65535),
        tls_cert=_file(home, table, "server.tls_cert", "tls_cert", None),
        tls_key=_file(home, table, "server.tls_key", "tls_key", None),
        vendor=_get(table, "server.vendor", "vendor", str, "xks-proxy"),
        model=_get(table, "server.model", "model", str, "xks-proxy-python"),
        fleet_size=_int_range(table, "server.fleet_size", "fleet_size", 1, 1, 10_000),
        header_timeout_seconds=_float_range(table, "server.header_timeout_seconds", "header_timeout_seconds", 10.0, 0.1, 300.0),
        body_timeout_seconds=_float_range(table, "server.body_timeout_seconds", "body_timeout_seconds", 10.0, 0.1, 300.0),
        idle_timeout_seconds=_float_range(table, "server.idle_timeout_seconds", "idle_timeout_seconds", 75.0, 1.0, 3600.0),
        max_connections=_int_range(table, "server.max_connections", "max_connections", 1000, 1, 1_000_000),
    )


def _limits(table: dict[str, Any]) -> Limits:
    return Limits(
        max_plaintext_bytes=_int_range(table, "limits.max_plaintext_bytes", "max_plaintext_bytes", 8192, 4300, 1 << 20),
        # The AAD construction carries the AAD's length in 16 bits.
        max_aad_bytes=_int_range(table, "limits.max_aad_bytes", "max_aad_bytes", 8192, 8192, 65535),
    )


def _vault(home: Path, table: dict[str, Any]) -> VaultConfig:
    path = _get(table, "vault.path", "path", str, "vault.db")
    refresh = _get(table, "vault.refresh_seconds", "refresh_seconds", float, 0.5)
    if not 0.05 <= refresh <= 2.0:
        raise ConfigError("vault.refresh_seconds: must be between 0.05 and 2 (changes must show within 2 s)")
    return VaultConfig(
        dsn=_dsn(home, table),
        path=(home / path).resolve(),
        refresh_seconds=refresh,
        rotate_after_encryptions=_int_range(
            table, "vault.rotate_after_encryptions", "rotate_after_encryptions", 1 << 31, 1, 1 << 32
        ),
        count_block=_int_range(table, "vault.count_block", "count_block", 1 << 16, 1, 1 << 24),
    )


def _dsn(home: Path, table: dict[str, Any]) -> str | None:
    """The PostgreSQL connection string of a shared vault, from dsn, dsn_file (owner-only) or $dsn_env.

    A password may sit in the file or the environment, never in config.toml (nor in any message).
    """
    given = [name for name in ("dsn", "dsn_file", "dsn_env") if name in table]
    if len(given) > 1:
        raise ConfigError(f"vault.{given[1]}: give only one of dsn, dsn_file or dsn_env")
    if not given:
        return None
    where = f"vault.{given[0]}"
    if given[0] == "dsn":
        text = _get(table, where, "dsn", str, None)
    elif given[0] == "dsn_file":
        path = _file(home, table, where, "dsn_file", None)
        if path is None:
            raise ConfigError(f"{where}: must name a file")
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ConfigError(f"{where}: {path} is readable or writable by others; chmod 600 it")
        text = path.read_text().strip()
    else:
        name = _get(table, where, "dsn_env", str, None)
        text = os.environ.get(name, "").strip()
        if not text:
            raise ConfigError(f"{where}: the environment variable {name} is not set")
    if not text.strip():
        raise ConfigError(f"{where}: is empty")
    from keymanager.vault.postgres import check_dsn

    try:
        params = check_dsn(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if given[0] == "dsn" and params.get("password"):
        raise ConfigError(
            "vault.dsn: holds a password, which config.toml must not; put the DSN in a file named by "
            "vault.dsn_file (chmod 600) or in the environment variable named by vault.dsn_env, or use ~/.pgpass"
        )
    return text.strip()


def _fleet(table: dict[str, Any], vault: VaultConfig) -> FleetConfig:
    for key in table:
        if key not in ("proxy_id", "heartbeat_seconds"):
            raise ConfigError(f"fleet.{key}: unknown setting (expected proxy_id or heartbeat_seconds)")
    if table and vault.dsn is None:
        raise ConfigError("fleet: a fleet shares its vault in PostgreSQL; set vault.dsn (or dsn_file, dsn_env) first")
    proxy_id = table.get("proxy_id")
    if proxy_id is not None and (not isinstance(proxy_id, str) or not 1 <= len(proxy_id) <= 200 or not proxy_id.isprintable()):
        raise ConfigError("fleet.proxy_id: must be 1-200 printable characters")
    heartbeat = _get(table, "fleet.heartbeat_seconds", "heartbeat_seconds", float, 1.0)
    if not 0.1 <= heartbeat <= 30.0:
        raise ConfigError("fleet.heartbeat_seconds: must be between 0.1 and 30")
    return FleetConfig(proxy_id=proxy_id, heartbeat_seconds=heartbeat)


def _admin(home: Path, table: dict[str, Any], backend: str) -> AdminConfig:
    """[admin]: validated fully only when enabled (a disabled listener needs nothing)."""
    enabled = _get(table, "admin.enabled", "enabled", bool, False)
    if not enabled:
        return AdminConfig()
    if backend != "vault":
        raise ConfigError(f"admin.enabled: the admin API manages vault keys; it is not supported on backend {backend}")
    tls_cert = _file(home, table, "admin.tls_cert", "tls_cert", None)
    tls_key = _file(home, table, "admin.tls_key", "tls_key", None)
    if tls_cert is None or tls_key is None:
        raise ConfigError("admin.tls_cert: the admin listener is HTTPS only; set admin.tls_cert and admin.tls_key")
    return AdminConfig(
        enabled=True,
        host=_get(table, "admin.host", "host", str, "127.0.0.1"),
        port=_int_range(table, "admin.port", "port", 8444, 0, 65535),
        tls_cert=tls_cert,
        tls_key=tls_key,
        jwt=_admin_jwt(home, _table(table, "jwt") if "jwt" in table else {}),
    )


def _admin_jwt(home: Path, table: dict[str, Any]) -> AdminJwtConfig:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    audience = _get(table, "admin.jwt.audience", "audience", str, None)
    issuer = _get(table, "admin.jwt.issuer", "issuer", str, None)
    for where, value in (("admin.jwt.audience", audience), ("admin.jwt.issuer", issuer)):
        if not value.strip():
            raise ConfigError(f"{where}: must not be empty (tokens are checked against it)")
    secret_path = _file(home, table, "admin.jwt.hs256_secret_file", "hs256_secret_file", None)
    key_files = table.get("public_key_files", [])
    if not isinstance(key_files, list) or not all(isinstance(f, str) for f in key_files):
        raise ConfigError("admin.jwt.public_key_files: must be a list of paths")
    if (secret_path is None) == (not key_files):
        raise ConfigError("admin.jwt: set exactly one of hs256_secret_file or public_key_files")
    if secret_path is not None:
        secret = secret_path.read_bytes().strip()
        if len(secret) < 32:
            raise ConfigError("admin.jwt.hs256_secret_file: the secret must be at least 32 bytes")
        return AdminJwtConfig(audience=audience, issuer=issuer, hs256_secret=secret)
    keys = []
    for i, name in enumerate(key_files):
        where = f"admin.jwt.public_key_files[{i}]"
        path = _file(home, {"f": name}, where, "f", None)
        assert path is not None
        try:
            key = load_pem_public_key(path.read_bytes())
        except ValueError:
            raise ConfigError(f"{where}: {path} is not a PEM public key") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
            keys.append(key)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            keys.append(key)
        else:
            raise ConfigError(f"{where}: must be an RSA key of 2048 bits or more (RS256) or a P-256 key (ES256)")
    return AdminJwtConfig(audience=audience, issuer=issuer, public_keys=tuple(keys))


def _float_range(table: dict[str, Any], where: str, key: str, default: float, low: float, high: float) -> float:
    value = _get(table, where, key, float, default)
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be between {low:g} and {high:g}")
    return value


def _pkcs11(home: Path, raw: dict[str, Any]) -> Pkcs11Config:
    """The [pkcs11] section, required when keymanager.backend is "pkcs11"."""
    if "pkcs11" not in raw:
        raise ConfigError('pkcs11: a [pkcs11] section is required when keymanager.backend = "pkcs11"')
    table = _table(raw, "pkcs11")
    for key in table:
        if key not in _PKCS11_FIELDS:
            hint = "; the PIN goes in a file named by pin_file, or in $pin_env" if "pin" in key.lower() else ""
            raise ConfigError(f"pkcs11.{key}: unknown field{hint}")
    module = _file(home, table, "pkcs11.module", "module", None)
    if module is None:
        raise ConfigError("pkcs11.module: is required (the path of the HSM vendor's PKCS#11 library)")
    token_label = table.get("token_label")
    if token_label is not None and (not isinstance(token_label, str) or not token_label):
        raise ConfigError("pkcs11.token_label: must be a non-empty string")
    slot = _int_range(table, "pkcs11.slot", "slot", 0, 0, 2**64 - 1) if "slot" in table else None
    if token_label is not None and slot is not None:
        raise ConfigError("pkcs11.slot: give token_label or slot, not both")
    iv_mode = _choice(table, "pkcs11.iv_mode", "iv_mode", IV_MODES, "proxy")
    default_text = base64.b64encode(PKCS11_DEFAULT_METADATA).decode()
    metadata_text = _get(table, "pkcs11.ciphertext_metadata_b64", "ciphertext_metadata_b64", str, default_text)
    try:
        metadata = base64.b64decode(metadata_text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("pkcs11.ciphertext_metadata_b64: must be standard base64") from None
    if len(metadata) > MAX_METADATA_BYTES:
        raise ConfigError(f"pkcs11.ciphertext_metadata_b64: at most {MAX_METADATA_BYTES} bytes (it is {len(metadata)})")
    health_key = _get(table, "pkcs11.health_key", "health_key", str, "xks-proxy-health")
    if not KEY_ID_RE.match(health_key):
        raise ConfigError("pkcs11.health_key: must be 1-128 characters of [A-Za-z0-9._-]")
    return Pkcs11Config(
        module=module,
        pin=_pin(home, table),
        token_label=token_label,
        slot=slot,
        session_pool_size=_int_range(table, "pkcs11.session_pool_size", "session_pool_size", 8, 1, 1024),
        session_wait_seconds=_float_range(table, "pkcs11.session_wait_seconds", "session_wait_seconds", 0.05, 0.0, 60.0),
        operation_timeout_seconds=_float_range(
            table, "pkcs11.operation_timeout_seconds", "operation_timeout_seconds", 0.2, 0.01, 60.0
        ),
        refresh_seconds=_float_range(table, "pkcs11.refresh_seconds", "refresh_seconds", 1.0, 0.1, 60.0),
        iv_mode=iv_mode,
        ciphertext_metadata=metadata,
        health_key=health_key,
        health_cache_seconds=_float_range(table, "pkcs11.health_cache_seconds", "health_cache_seconds", 60.0, 0.0, 60.0),
    )


def _pin(home: Path, table: dict[str, Any]) -> str:
    """The user PIN, from an owner-only file or an environment variable. Never from config.toml."""
    has_file, has_env = "pin_file" in table, "pin_env" in table
    if has_file == has_env:
        raise ConfigError("pkcs11.pin_file: give exactly one of pin_file or pin_env")
    if has_env:
        name = _get(table, "pkcs11.pin_env", "pin_env", str, None)
        pin = os.environ.get(name, "")
        if not pin:
            raise ConfigError(f"pkcs11.pin_env: the environment variable {name} is not set")
        return pin
    path = _file(home, table, "pkcs11.pin_file", "pin_file", None)
    if path is None:
        raise ConfigError("pkcs11.pin_file: must name a file")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"pkcs11.pin_file: {path} is readable or writable by others; chmod 600 it")
    pin = path.read_text().rstrip("\r\n")
    if not pin:
        raise ConfigError(f"pkcs11.pin_file: {path} is empty")
    return pin


def _master_key(home: Path, table: dict[str, Any]) -> MasterKey:
    env = _get(table, "master_key.env", "env", str, "XKS_PROXY_MASTER_KEY")
    if env and os.environ.get(env):
        try:
            return MasterKey.from_text(os.environ[env])
        except ValueError as exc:
            raise ConfigError(f"master_key.env: ${env}: {exc}") from None
    path = _file(home, table, "master_key.file", "file", "master.key")
    if path is None:
        raise ConfigError("master_key.file: no master key file, and the environment variable is not set")
    try:
        return MasterKey.from_text(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"master_key.file: {path}: {exc}") from None


def validate_prefix(prefix: str, where: str = "prefix") -> str:
    if prefix and (len(prefix) > 117 or not PREFIX_RE.match(prefix)):
        raise ConfigError(
            f"{where}: {prefix!r} must be empty or up to 117 characters of [a-zA-Z0-9_-] in '/'-separated segments"
        )
    return prefix


def _stores(raw: Any, master_key: MasterKey, default_quota: Quota) -> tuple[Store, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stores: at least one [[stores]] table is required")
    stores: list[Store] = []
    seen_prefixes: set[str] = set()
    seen_keys: set[str] = set()
    for i, table in enumerate(raw):
        where = f"stores[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        prefix = validate_prefix(_get(table, f"{where}.prefix", "prefix", str, None), f"{where}.prefix")
        if prefix in seen_prefixes:
            raise ConfigError(f"{where}.prefix: {prefix!r} is used by another store")
        seen_prefixes.add(prefix)
        regions = table.get("regions")
        if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
            raise ConfigError(f"{where}.regions: must be a non-empty list of region names")
        for region in regions:
            if not REGION_RE.match(region):
                raise ConfigError(f"{where}.regions: {region!r} is not an AWS region name")
        creds = _credentials(table.get("credentials"), f"{where}.credentials", master_key, seen_keys)
        stores.append(
            Store(
                prefix=prefix,
                regions=frozenset(regions),
                credentials=creds,
                key_ids=_key_ids(table, f"{where}.key_ids"),
                policy=_policy(table, where),
                quota=_store_quota(table, where, default_quota),
            )
        )
    return tuple(stores)


def _policy(table: dict[str, Any], where: str) -> Policy:
    """`[[stores.policy]]` rules, compiled (see policy.py and docs/access-control.md)."""
    try:
        return compile_policy(table.get("policy", []), f"{where}.policy")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None


def _store_quota(table: dict[str, Any], where: str, default: Quota) -> Quota:
    """`[stores.throttle]`: this store's rate and burst, else the `[throttle]` defaults."""
    throttle = table.get("throttle", {})
    if not isinstance(throttle, dict):
        raise ConfigError(f"{where}.throttle: must be a table")
    _only(throttle, f"{where}.throttle", ("rate", "burst"))
    return _quota(throttle, f"{where}.throttle", default)


def _key_ids(table: dict[str, Any], where: str) -> frozenset[str] | None:
    """A store's optional allow-list of key ids (absent: every key the backend has)."""
    raw = table.get("key_ids")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{where}: must be a list of key ids")
    for key_id in raw:
        if not KEY_ID_RE.match(key_id):
            raise ConfigError(f"{where}: {key_id!r} is not 1-128 characters of [A-Za-z0-9._-]")
    return frozenset(raw)


def _credentials(raw: Any, where: str, master_key: MasterKey, seen: set[str]) -> tuple[Credential, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: at least one credential is required")
    creds = []
    for j, table in enumerate(raw):
        here = f"{where}[{j}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: must be a table")
        akid = _get(table, f"{here}.access_key_id", "access_key_id", str, None)
        if not ACCESS_KEY_RE.match(akid):
            raise ConfigError(f"{here}.access_key_id: must be 20-30 characters of A-Z and 2-7")
        if akid in seen:
            raise ConfigError(f"{here}.access_key_id: {akid} is used by another credential")
        seen.add(akid)
        sealed = _get(table, f"{here}.secret_access_key_sealed", "secret_access_key_sealed", str, None)
        try:
            secret = master_key.unseal_text(sealed, credential_context(akid))
        except ValueError as exc:
            raise ConfigError(f"{here}.secret_access_key_sealed: {exc}") from None
        if not SECRET_RE.match(secret):
            raise ConfigError(f"{here}.secret_access_key_sealed: the secret must be 43-64 characters of [a-zA-Z0-9/+=]")
        creds.append(Credential(access_key_id=akid, secret=secret))
    return tuple(creds)


def credential_context(access_key_id: str) -> str:
    """What a sealed secret is bound to: it opens only for this access key id."""
    return f"xks-proxy credential {access_key_id}"
