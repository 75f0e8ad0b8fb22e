"""The proxy's own sections of config.toml, one parser each: `[server]`, `[limits]`, `[tls]`,
`[throttle]`, `[metrics]`, `[audit]`, `[fleet]`, `[master_key]`.

Each takes its table (and the home, for relative paths) and returns its typed settings, or raises
`ConfigError` naming the field. Defaults here are the documented ones (docs/configuration.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from keymanager.crypto import Keyring, MasterKey
from xks_proxy.settings.fields import ConfigError, file, float_range, get, int_range, only, table
from xks_proxy.settings.model import (
    AuditConfig,
    FleetConfig,
    Limits,
    MetricsConfig,
    ServerConfig,
    Store,
    ThrottleConfig,
    TlsConfig,
)

DNS_NAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


def server(home: Path, table: dict[str, Any]) -> ServerConfig:
    return ServerConfig(
        host=get(table, "server.host", "host", str, "127.0.0.1"),
        port=int_range(table, "server.port", "port", 8443, 0, 65535),
        tls_cert=file(home, table, "server.tls_cert", "tls_cert", None),
        tls_key=file(home, table, "server.tls_key", "tls_key", None),
        vendor=get(table, "server.vendor", "vendor", str, "xks-proxy"),
        model=get(table, "server.model", "model", str, "xks-proxy-python"),
        fleet_size=int_range(table, "server.fleet_size", "fleet_size", 1, 1, 10_000),
        header_timeout_seconds=float_range(table, "server.header_timeout_seconds", "header_timeout_seconds", 10.0, 0.1, 300.0),
        body_timeout_seconds=float_range(table, "server.body_timeout_seconds", "body_timeout_seconds", 10.0, 0.1, 300.0),
        idle_timeout_seconds=float_range(table, "server.idle_timeout_seconds", "idle_timeout_seconds", 75.0, 1.0, 3600.0),
        max_connections=int_range(table, "server.max_connections", "max_connections", 1000, 1, 1_000_000),
    )


def limits(table: dict[str, Any]) -> Limits:
    return Limits(
        max_plaintext_bytes=int_range(table, "limits.max_plaintext_bytes", "max_plaintext_bytes", 8192, 4300, 1 << 20),
        # The AAD construction carries the AAD's length in 16 bits.
        max_aad_bytes=int_range(table, "limits.max_aad_bytes", "max_aad_bytes", 8192, 8192, 65535),
    )


def tls(home: Path, table: dict[str, Any], stores: tuple[Store, ...]) -> TlsConfig:
    """Allowed client names default to `cks.kms.<region>.amazonaws.com` for every configured region."""
    only(table, "tls", ("client_ca", "client_names"))
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
        client_ca=file(home, table, "tls.client_ca", "client_ca", None),
        client_names=frozenset(n.lower() for n in names),
    )


def throttle(table: dict[str, Any]) -> ThrottleConfig:
    """`max_in_flight` here; `rate` and `burst` are every store's default quota (`stores.default_quota`)."""
    only(table, "throttle", ("max_in_flight", "rate", "burst"))
    return ThrottleConfig(max_in_flight=int_range(table, "throttle.max_in_flight", "max_in_flight", 256, 0, 1_000_000))


def metrics(table: dict[str, Any]) -> MetricsConfig:
    only(table, "metrics", ("enabled", "host", "port"))
    return MetricsConfig(
        enabled=get(table, "metrics.enabled", "enabled", bool, False),
        host=get(table, "metrics.host", "host", str, "127.0.0.1"),
        port=int_range(table, "metrics.port", "port", 9464, 0, 65535),
    )


def audit(home: Path, table: Any) -> AuditConfig:
    """Audit is on by default (`audit.log` in the home); `path = ""` turns it off."""
    if not isinstance(table, dict):
        raise ConfigError("audit: must be a table")
    only(table, "audit", ("path", "max_bytes", "backups"))
    path = get(table, "audit.path", "path", str, "audit.log")
    return AuditConfig(
        path=(home / path).resolve() if path else None,
        max_bytes=int_range(table, "audit.max_bytes", "max_bytes", 100 * 1024 * 1024, 4096, 1 << 40),
        backups=int_range(table, "audit.backups", "backups", 10, 1, 1000),
    )


def fleet(table: dict[str, Any], shared: bool) -> FleetConfig:
    """`[fleet]`, allowed only when `shared` (the vault is a fleet's database: `vault.dsn`)."""
    for key in table:
        if key not in ("proxy_id", "heartbeat_seconds"):
            raise ConfigError(f"fleet.{key}: unknown setting (expected proxy_id or heartbeat_seconds)")
    if table and not shared:
        raise ConfigError("fleet: a fleet shares its vault in PostgreSQL; set vault.dsn (or dsn_file, dsn_env) first")
    proxy_id = table.get("proxy_id")
    if proxy_id is not None and (not isinstance(proxy_id, str) or not 1 <= len(proxy_id) <= 200 or not proxy_id.isprintable()):
        raise ConfigError("fleet.proxy_id: must be 1-200 printable characters")
    heartbeat = get(table, "fleet.heartbeat_seconds", "heartbeat_seconds", float, 1.0)
    if not 0.1 <= heartbeat <= 30.0:
        raise ConfigError("fleet.heartbeat_seconds: must be between 0.1 and 30")
    return FleetConfig(proxy_id=proxy_id, heartbeat_seconds=heartbeat)


def master_key(home: Path, table: dict[str, Any]) -> MasterKey:
    """A home without a seal record: from `$env` when set (default XKS_PROXY_MASTER_KEY), else the file (default master.key)."""
    env = get(table, "master_key.env", "env", str, "XKS_PROXY_MASTER_KEY")
    if env and os.environ.get(env):
        try:
            return MasterKey.from_text(os.environ[env])
        except ValueError as exc:
            raise ConfigError(f"master_key.env: ${env}: {exc}") from None
    path = file(home, table, "master_key.file", "file", "master.key")
    if path is None:
        raise ConfigError("master_key.file: no master key file, and the environment variable is not set")
    try:
        return MasterKey.from_text(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"master_key.file: {path}: {exc}") from None


def keyring(home: Path, raw: dict[str, Any], dsn: str | None) -> "tuple[Keyring | None, str]":
    """The home's opened master keys and its seal's kind; (None, kind) while it waits for `unseal`.

    No seal record: the master key is in clear (`[master_key]`, as before seals; kind "file").
    """
    from keymanager.seal import home as seal

    seal_table = table(raw, "seal")
    for name in seal_table:
        if name not in ("passphrase_file", "passphrase_env", "pin_file", "pin_env"):
            raise ConfigError(f"seal.{name}: unknown setting (expected passphrase_file, passphrase_env, pin_file or pin_env)")
    try:
        record = seal.read_record(home, dsn)
        if record is None:
            return seal.legacy_keyring(master_key(home, table(raw, "master_key")), home, dsn), "file"
        return seal.auto_open(home, dsn, record, seal_table), record.kind
    except seal.SealError as exc:
        raise ConfigError(str(exc)) from None
