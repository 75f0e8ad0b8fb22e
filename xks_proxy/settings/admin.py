"""`[admin]`: the optional HTTPS admin listener and how its bearer tokens (JWT) are verified.

Validated fully only when enabled: a disabled listener needs nothing, so a half-written
`[admin]` section does not stop a proxy that does not use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xks_proxy.settings.fields import ConfigError, file, get, int_range, table as subtable
from xks_proxy.settings.model import AdminConfig, AdminJwtConfig


def admin(home: Path, table: dict[str, Any], backend: str, has_lifecycle: bool) -> AdminConfig:
    """`has_lifecycle`: the backend offers the audited key lifecycle the admin API serves."""
    enabled = get(table, "admin.enabled", "enabled", bool, False)
    if not enabled:
        return AdminConfig()
    if not has_lifecycle:
        raise ConfigError(f"admin.enabled: the admin API manages vault keys; it is not supported on backend {backend}")
    tls_cert = file(home, table, "admin.tls_cert", "tls_cert", None)
    tls_key = file(home, table, "admin.tls_key", "tls_key", None)
    if tls_cert is None or tls_key is None:
        raise ConfigError("admin.tls_cert: the admin listener is HTTPS only; set admin.tls_cert and admin.tls_key")
    return AdminConfig(
        enabled=True,
        host=get(table, "admin.host", "host", str, "127.0.0.1"),
        port=int_range(table, "admin.port", "port", 8444, 0, 65535),
        tls_cert=tls_cert,
        tls_key=tls_key,
        jwt=_jwt(home, subtable(table, "jwt") if "jwt" in table else {}),
    )


def _jwt(home: Path, table: dict[str, Any]) -> AdminJwtConfig:
    """One HS256 secret (at least 32 bytes) or RS256 (>= 2048 bits) / ES256 (P-256) public keys."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    audience = get(table, "admin.jwt.audience", "audience", str, None)
    issuer = get(table, "admin.jwt.issuer", "issuer", str, None)
    for where, value in (("admin.jwt.audience", audience), ("admin.jwt.issuer", issuer)):
        if not value.strip():
            raise ConfigError(f"{where}: must not be empty (tokens are checked against it)")
    secret_path = file(home, table, "admin.jwt.hs256_secret_file", "hs256_secret_file", None)
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
        path = file(home, {"f": name}, where, "f", None)
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
