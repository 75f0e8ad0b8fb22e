"""`xks-proxy import-config settings.toml`: from the AWS sample proxy to ours, in one command.

Reads the TOML of `aws-samples/aws-kms-xks-proxy` and writes a proxy home over the same HSM:
the pkcs11 backend, the same listening address, each logical key store with its URI prefix,
SigV4 credential (sealed under a new master key) and allowed key ids, the same limits and IV
handling. The user PIN moves to an owner-only `pkcs11.pin`, never into config.toml. Unless
--no-verify, it then logs in to the HSM, pins the token by label, creates the health-check key if
missing and reports which of the stores' key ids exist. docs/pkcs11.md lists how every field of
the sample's file is read (inferred from the field names).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from keymanager.crypto import MasterKey
from xks_proxy import config as configmod
from xks_proxy.config import (
    ACCESS_KEY_RE,
    CONFIG_FILE,
    KEY_ID_RE,
    REGION_RE,
    SECRET_RE,
    ConfigError,
    validate_prefix,
)
from xks_proxy.protocol import MAX_METADATA_BYTES

PIN_FILE = "pkcs11.pin"
HEALTH_KEY = "xks-proxy-health"
_MIN_PLAINTEXT, _MAX_PLAINTEXT = 4300, 1 << 20
_MIN_AAD, _MAX_AAD = 8192, 65535


@dataclass
class ImportedStore:
    prefix: str
    access_key_id: str
    secret: str = field(repr=False)
    key_ids: list[str] | None


@dataclass
class Imported:
    """The sample's settings, read and checked; `config` is our config.toml minus the stores."""

    config: dict[str, Any]
    pin: str = field(repr=False)
    region: str
    stores: list[ImportedStore]
    plain_http: bool
    warnings: list[str]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "import-config", parents=[common], help="make a PKCS#11 proxy home from the AWS sample proxy's settings.toml"
    )
    parser.add_argument("settings", help="the AWS sample proxy's settings.toml")
    parser.add_argument("--token-label", help="the HSM token to use (default: the first initialised token, pinned by label)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not contact the HSM (then create the health-check key later: xks-proxy keys create xks-proxy-health)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Path(args.settings).expanduser().resolve()
    home = configmod.home_dir(args.home)
    imported = read_settings(settings, args.token_label)
    for existing in (CONFIG_FILE, "master.key", PIN_FILE):
        if (home / existing).exists():
            raise ConfigError(f"--home: {home} already holds a proxy home; refusing to overwrite it")
    health_note, key_notes = "not checked (--no-verify)", []
    if not args.no_verify:
        health_note, key_notes = _verify(imported)
    _write_home(home, imported)
    config = configmod.load(home)  # what we wrote must load, or nothing is done
    for warning in imported.warnings:
        print(f"xks-proxy: warning: {warning}", file=sys.stderr)
    _report(settings, home, config, imported, health_note, key_notes)
    return 0


# --- reading the sample's settings ----------------------------------------------------------------------


def read_settings(path: Path, token_label: str | None = None) -> Imported:
    """Parse and check the sample's TOML. A bad field is a ConfigError naming it as the sample does."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    warnings: list[str] = []
    server = _section(raw, "server")
    security = _section(raw, "security")
    pkcs11 = _section(raw, "pkcs11")
    region = _str(server, "server.region")
    if not REGION_RE.match(region):
        raise ConfigError(f"server.region: {region!r} is not an AWS region name")
    service = server.get("service", "kms-xks-proxy")
    if service != "kms-xks-proxy":
        warnings.append(f"server.service is {service!r}; KMS signs for kms-xks-proxy, which xks-proxy always checks")
    if security.get("is_sigv4_auth_enabled", True) is False:
        warnings.append("security.is_sigv4_auth_enabled = false was not carried over: xks-proxy always verifies SigV4")
    server_table, plain_http = _server(path.parent, raw, server, security)
    config: dict[str, Any] = {
        "server": server_table,
        "limits": _limits(_section(raw, "limits"), warnings),
        "keymanager": {"backend": "pkcs11"},
        "pkcs11": _pkcs11(raw, pkcs11, token_label, warnings),
        "master_key": {"file": "master.key", "env": "XKS_PROXY_MASTER_KEY"},
    }
    if security.get("is_mtls_enabled", False) is True:
        config["tls"] = _mtls(path.parent, _section(raw, "tls"))
    pin = pkcs11.get("user_pin")
    if not isinstance(pin, str) or not pin:
        raise ConfigError("pkcs11.user_pin: is required (it moves to an owner-only pin file)")
    return Imported(
        config=config,
        pin=pin,
        region=region,
        stores=_stores(raw.get("external_key_stores")),
        plain_http=plain_http,
        warnings=warnings,
    )


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table")
    return value


def _str(table: dict[str, Any], where: str) -> str:
    value = table.get(where.rsplit(".", 1)[-1])
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: is required and must be a string")
    return value


def _int(table: dict[str, Any], where: str, default: int) -> int:
    value = table.get(where.rsplit(".", 1)[-1], default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: must be a non-negative integer")
    return value


def _server(base: Path, raw: dict[str, Any], server: dict[str, Any], security: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    table: dict[str, Any] = {"host": server.get("ip", "0.0.0.0"), "port": _int(server, "server.port", 443)}
    if not isinstance(table["host"], str):
        raise ConfigError("server.ip: must be a string")
    if security.get("is_tls_enabled", False) is not True:
        return table, True
    tls = _section(raw, "tls")
    for ours, theirs in (("tls_cert", "tls_cert_pem"), ("tls_key", "tls_key_pem")):
        file = (base / _str(tls, f"tls.{theirs}")).resolve()
        if not file.is_file():
            raise ConfigError(f"tls.{theirs}: file {file} does not exist")
        table[ours] = str(file)
    return table, False


def _mtls(base: Path, tls: dict[str, Any]) -> dict[str, Any]:
    """The sample's client CA and the one client DNS name it allows become our [tls] section."""
    ca = (base / _str(tls, "tls.mtls_client_ca_pem")).resolve()
    if not ca.is_file():
        raise ConfigError(f"tls.mtls_client_ca_pem: file {ca} does not exist")
    return {"client_ca": str(ca), "client_names": [_str(tls, "tls.mtls_client_dns_name")]}


def _limits(limits: dict[str, Any], warnings: list[str]) -> dict[str, int]:
    """The sample limits base64 lengths; we limit decoded bytes (4 base64 characters carry 3 bytes)."""
    out = {}
    for ours, theirs, low, high, default in (
        ("max_plaintext_bytes", "max_plaintext_in_base64", _MIN_PLAINTEXT, _MAX_PLAINTEXT, 8192),
        ("max_aad_bytes", "max_aad_in_base64", _MIN_AAD, _MAX_AAD, 8192),
    ):
        if theirs not in limits:
            out[ours] = default
            continue
        decoded = _int(limits, f"limits.{theirs}", 0) // 4 * 3
        value = min(max(decoded, low), high)
        if value != decoded:
            warnings.append(f"limits.{theirs} = {limits[theirs]} ({decoded} bytes) raised or lowered to {value} bytes, the range KMS needs")
        out[ours] = value
    return out


def _pkcs11(raw: dict[str, Any], pkcs11: dict[str, Any], token_label: str | None, warnings: list[str]) -> dict[str, Any]:
    module_name = "PKCS11_HSM_MODULE" if "PKCS11_HSM_MODULE" in pkcs11 else "pkcs11_hsm_module"
    module = Path(_str(pkcs11, f"pkcs11.{module_name}")).expanduser()
    if not module.is_file():
        raise ConfigError(f"pkcs11.{module_name}: file {module} does not exist")
    table: dict[str, Any] = {
        "module": str(module.resolve()),
        "pin_file": PIN_FILE,
        "session_pool_size": min(max(_int(pkcs11, "pkcs11.session_pool_max_size", 8), 1), 1024),
        "iv_mode": _iv_mode(_section(raw, "hsm_capabilities")),
        "health_key": HEALTH_KEY,
    }
    if token_label:
        table["token_label"] = token_label
    wait_ms = _int(pkcs11, "pkcs11.session_pool_timeout_milli", 0)
    if wait_ms:
        table["session_wait_seconds"] = min(wait_ms / 1000, 60.0)
    if pkcs11.get("session_eager_close") is True:
        warnings.append("pkcs11.session_eager_close = true is not carried over: xks-proxy keeps its sessions pooled")
    metadata = _ciphertext_metadata(raw)
    if metadata:
        table["ciphertext_metadata_b64"] = metadata
    return table


def _iv_mode(capabilities: dict[str, Any]) -> str:
    """can_generate_iv: the HSM makes GCM IVs itself; is_zero_iv_required: it wants a zeroed IV buffer to fill."""
    if capabilities.get("can_generate_iv", False) is not True:
        return "proxy"
    return "hsm-zero-buffer" if capabilities.get("is_zero_iv_required", False) is True else "hsm-appended"


def _ciphertext_metadata(raw: dict[str, Any]) -> str | None:
    """ciphertext_metadata_b64, wherever the file keeps it; every place that has it must agree."""
    places = [raw, raw.get("hsm_capabilities"), raw.get("pkcs11"), raw.get("server")]
    places += list(raw.get("external_key_stores") or [])
    found = {p["ciphertext_metadata_b64"] for p in places if isinstance(p, dict) and "ciphertext_metadata_b64" in p}
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError("ciphertext_metadata_b64: given more than once with different values")
    value = found.pop()
    try:
        decoded = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is None or len(decoded) > MAX_METADATA_BYTES:
        raise ConfigError(f"ciphertext_metadata_b64: must be standard base64 of at most {MAX_METADATA_BYTES} bytes")
    return value or None


def _stores(raw: Any) -> list[ImportedStore]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("external_key_stores: at least one [[external_key_stores]] table is required")
    stores: list[ImportedStore] = []
    for i, table in enumerate(raw):
        where = f"external_key_stores[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        prefix = validate_prefix(_str(table, f"{where}.uri_path_prefix").strip("/"), f"{where}.uri_path_prefix")
        akid = _str(table, f"{where}.sigv4_access_key_id")
        if not ACCESS_KEY_RE.match(akid):
            raise ConfigError(f"{where}.sigv4_access_key_id: must be 20-30 characters of A-Z and 2-7")
        secret = _str(table, f"{where}.sigv4_secret_access_key")
        if not SECRET_RE.match(secret):
            raise ConfigError(f"{where}.sigv4_secret_access_key: must be 43-64 characters of [a-zA-Z0-9/+=]")
        key_ids = table.get("xks_key_id_set")
        if key_ids is not None:
            if not isinstance(key_ids, list) or not all(isinstance(k, str) and KEY_ID_RE.match(k) for k in key_ids):
                raise ConfigError(f"{where}.xks_key_id_set: must be a list of key ids (1-128 of [A-Za-z0-9._-])")
            key_ids = sorted(set(key_ids))
        if any(s.prefix == prefix for s in stores):
            raise ConfigError(f"{where}.uri_path_prefix: {prefix!r} is used by another store")
        if any(s.access_key_id == akid for s in stores):
            raise ConfigError(f"{where}.sigv4_access_key_id: {akid} is used by another store")
        stores.append(ImportedStore(prefix=prefix, access_key_id=akid, secret=secret, key_ids=key_ids))
    return stores


# --- the HSM check and the home ---------------------------------------------------------------------------


def _pkcs11_config(imported: Imported) -> Any:
    """What the pkcs11 backend's `key_admin_for` reads of its settings (module, token, slot, PIN,
    health key), before a home exists: the typed `Pkcs11Config` is the backend's own, parsed
    from the home once written (`configmod.load` in `run`)."""
    table = imported.config["pkcs11"]
    return SimpleNamespace(
        module=Path(table["module"]),
        pin=imported.pin,
        token_label=table.get("token_label"),
        slot=None,
        iv_mode=table["iv_mode"],
        health_key=table["health_key"],
    )


def _verify(imported: Imported) -> tuple[str, list[str]]:
    """Log in, pin the token by label, make sure the health key exists, look up the stores' keys."""
    from keymanager.base import KeyAdminError
    from keymanager.registry import backend

    admin_for = backend("pkcs11").key_admin_for
    assert admin_for is not None
    try:
        admin: Any = admin_for(_pkcs11_config(imported))  # the Pkcs11Admin: token_label, ensure_health_key
    except KeyAdminError as exc:
        raise ConfigError(f"pkcs11: cannot use the HSM ({exc}); fix it or import with --no-verify") from None
    try:
        imported.config["pkcs11"]["token_label"] = admin.token_label
        health = f"{HEALTH_KEY} ({'created' if admin.ensure_health_key() else 'present'})"
        notes = []
        for store in imported.stores:
            for key_id in store.key_ids or []:
                try:
                    info = admin.key(store.prefix, key_id)
                    notes.append(f"{key_id}: {info.key_spec} {','.join(u.value for u in info.usage) or '-'}")
                except KeyAdminError as exc:
                    notes.append(f"{key_id}: {exc}")
        return health, notes
    except KeyAdminError as exc:
        raise ConfigError(f"pkcs11: {exc}") from None
    finally:
        admin.close()


def _write_home(home: Path, imported: Imported) -> None:
    from xks_proxy.cli.home import sealed_credential, write_config

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    master_text = MasterKey.generate_text()
    master_key = MasterKey.from_text(master_text)
    _write_private(home / "master.key", master_text)
    _write_private(home / PIN_FILE, imported.pin + "\n")
    stores = []
    for store in imported.stores:
        table: dict[str, Any] = {
            "prefix": store.prefix,
            "regions": [imported.region],
            "credentials": [sealed_credential(master_key, store.access_key_id, store.secret)],
        }
        if store.key_ids is not None:
            table["key_ids"] = store.key_ids
        stores.append(table)
    write_config(home, imported.config | {"stores": stores})


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _report(settings: Path, home: Path, config: configmod.Config, imported: Imported, health: str, keys: list[str]) -> None:
    p = config.pkcs11
    assert p is not None
    lines = [
        f"Imported {settings} into proxy home {home}",
        f"  backend:      pkcs11, module {p.module}, token {p.token_label or '(first initialised token)'}, iv_mode {p.iv_mode}",
        f"  PIN:          {home / PIN_FILE} (mode 0600); remove user_pin from {settings.name}",
        f"  health key:   {health}",
    ]
    for store in config.stores:
        allowed = "every key on the token" if store.key_ids is None else ", ".join(sorted(store.key_ids)) or "(none)"
        lines.append(f"  store:        {store.uri_path}  access key {store.credentials[0].access_key_id}  keys: {allowed}")
    lines += [f"  key          {note}" for note in keys]
    lines.append(f"Serve with:     xks-proxy serve --home {home}{' --http' if imported.plain_http else ''}")
    print("\n".join(lines))
