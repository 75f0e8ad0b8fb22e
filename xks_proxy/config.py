"""Configuration: read once at start from `<home>/config.toml`, validated into typed objects.

A bad value stops the program with one line naming the field (`ConfigError`). Nothing
downstream re-validates: if a `Config` exists, it is well-formed. Credential secrets are kept
in the file sealed under the master key (the same protection as key material), and are opened
here, once.

This module is the entry: it reads the file and assembles the model (`xks_proxy.settings.model`)
from one parser per section (`xks_proxy.settings.*`); a key backend's own section (`[vault]`,
`[pkcs11]`) is parsed by that backend (`keymanager.base.Backend.parse_section`, through the
registry). The names callers use are re-exported here, so `from xks_proxy import config` stays
the one import for them.

A fleet (`[vault] dsn`: the vault in PostgreSQL, shared) keeps its key stores in that database,
so every proxy serves the same stores and credentials: config.toml then holds only this node's
settings, and `load()` reads the stores from the database (`xks_proxy.fleet.shared_settings`,
which builds on `xks_proxy.settings`, never on this module: no cycle).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from keymanager import registry
from keymanager.base import Backend, StorageUnavailable
from keymanager.crypto import Keyring
from xks_proxy.settings import sections
from xks_proxy.settings.admin import admin as _admin
from xks_proxy.settings.fields import ConfigError, choice, table
from xks_proxy.settings.model import (
    DEFAULT_QUOTA,
    AdminConfig,
    AdminJwtConfig,
    AuditConfig,
    Config,
    Credential,
    FleetConfig,
    Limits,
    MetricsConfig,
    Quota,
    ServerConfig,
    Store,
    ThrottleConfig,
    TlsConfig,
)
from xks_proxy.settings.sections import DNS_NAME_RE
from xks_proxy.settings.stores import (
    ACCESS_KEY_RE,
    KEY_ID_RE,
    PREFIX_RE,
    REGION_RE,
    SECRET_RE,
    credential_context,
    default_quota,
    validate_prefix,
    with_stores,
)
from xks_proxy.settings.stores import parse as parse_stores

__all__ = [
    "ACCESS_KEY_RE", "CONFIG_FILE", "DEFAULT_HOME", "DEFAULT_QUOTA", "DNS_NAME_RE", "KEY_ID_RE", "PREFIX_RE",
    "REGION_RE", "SECRET_RE", "AdminConfig", "AdminJwtConfig", "AuditConfig", "Config", "ConfigError", "Credential",
    "FleetConfig", "Limits", "MetricsConfig", "Quota", "ServerConfig", "Store", "ThrottleConfig", "TlsConfig",
    "credential_context", "from_raw", "home_dir", "load", "read_raw", "validate_prefix", "with_stores",
]  # fmt: skip

DEFAULT_HOME = Path.home() / ".xks-proxy"
CONFIG_FILE = "config.toml"


def home_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--home beats XKS_PROXY_HOME beats ~/.xks-proxy."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("XKS_PROXY_HOME")
    return Path(env).expanduser().resolve() if env else DEFAULT_HOME


def load(home: Path, shared: bool = True, keyring: Keyring | None = None) -> Config:
    """Read and validate `<home>/config.toml`. Raises ConfigError naming the bad field.

    With a shared vault (`vault.dsn`) the stores come from the vault database, unless `shared`
    is False (then `stores` is empty: for commands that must work before the database does).
    Raises keymanager.base.StorageUnavailable if that database does not answer.
    `keyring`: the master keys this process holds already (a serving worker's reload, or after
    `unseal`); otherwise the home's seal is opened here if it opens without a person.
    """
    return from_raw(home, read_raw(home), shared, keyring)


def read_raw(home: Path) -> dict[str, Any]:
    """The TOML document as parsed, unvalidated (the CLI edits this and writes it back)."""
    path = home / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no configuration here; run `xks-proxy init --home {home}` first")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def from_raw(home: Path, raw: dict[str, Any], shared: bool = True, keyring: Keyring | None = None) -> Config:
    """Validate a parsed document into a Config (also used to check an edit before writing it).

    `shared`: as for `load`. A fleet's config.toml has no `[[stores]]`: they are in its database.
    The checks run in a fixed order, so a document with several faults always names the same one.
    """
    name = choice(table(raw, "keymanager"), "keymanager.backend", "backend", registry.NAMES, registry.NAMES[0])
    backend = registry.backend(name)
    vault = _section(registry.backend("vault"), home, raw)  # on every backend: vault.dsn is the fleet switch
    if vault.dsn is not None and backend.fleet is None:
        raise ConfigError(f"vault.dsn: a shared vault database is for keymanager.backend = \"vault\", not {name}")
    if vault.dsn is not None and "stores" in raw:
        raise ConfigError(
            "stores: with vault.dsn the key stores live in the vault database, shared by the fleet; "
            f"`xks-proxy fleet init --home {home}` moves them there"
        )
    if keyring is None:
        try:
            keyring, seal_kind = sections.keyring(home, raw, vault.dsn)
        except StorageUnavailable:
            if shared:
                raise
            keyring, seal_kind = None, "unknown"  # a fleet's record is in its database: wait_for_stores reads it
    else:
        seal_kind = keyring.seal_kind
    table(raw, "throttle")  # "throttle: must be a table" before any store's error, as always
    stores = () if vault.dsn is not None else parse_stores(raw.get("stores"), keyring, default_quota(raw))
    config = Config(
        home=home,
        server=sections.server(home, table(raw, "server")),
        limits=sections.limits(table(raw, "limits")),
        stores=stores,
        backend=name,
        vault=vault,
        keyring=keyring,
        seal=seal_kind,
        raw=raw,
        tls=sections.tls(home, table(raw, "tls"), stores),
        throttle=sections.throttle(table(raw, "throttle")),
        metrics=sections.metrics(table(raw, "metrics")),
        audit=sections.audit(home, raw.get("audit", {"path": "audit.log"})),
        backend_settings=vault if name == "vault" else _section(backend, home, raw),
        admin=_admin(home, table(raw, "admin"), name, backend.lifecycle is not None),
        fleet=sections.fleet(table(raw, "fleet"), vault.dsn is not None),
    )
    if vault.dsn is not None and shared:
        from xks_proxy.fleet import shared_settings  # psycopg and tomli_w: only for a fleet

        config = shared_settings.load_into(config)
    return config


def _section(backend: Backend, home: Path, raw: dict[str, Any]) -> Any:
    """The backend's own section(s) of `raw`, parsed by the backend (None if it has none)."""
    return backend.parse_section(home, raw) if backend.parse_section is not None else None
