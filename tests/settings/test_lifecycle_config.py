"""Lifecycle configuration is validated at load: a bad value is one ConfigError naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conftest import Home
from tests.support.lifecycle import cli, patch_config
from xks_proxy import config as configmod
from xks_proxy.config import ConfigError

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM


def _admin(**changes: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "enabled": True,
        "port": 0,
        "tls_cert": "tls/server.pem",
        "tls_key": "tls/server.key",
        "jwt": {"audience": "a", "issuer": "i", "hs256_secret_file": "jwt.secret"},
    }
    for key, value in changes.items():
        if key.startswith("jwt_"):
            table["jwt"][key[4:]] = value
        else:
            table[key] = value
    table["jwt"] = {k: v for k, v in table["jwt"].items() if v is not None}
    return {k: v for k, v in table.items() if v is not None}


def _write_public(home: Home, name: str, key: Any) -> None:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (home.path / name).write_bytes(pem)


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"vault": {"rotate_after_encryptions": 0}}, "vault.rotate_after_encryptions"),
        ({"vault": {"rotate_after_encryptions": (1 << 32) + 1}}, "vault.rotate_after_encryptions"),
        ({"vault": {"count_block": 0}}, "vault.count_block"),
        ({"vault": {"count_block": "big"}}, "vault.count_block"),
        ({"admin": {"enabled": "yes"}}, "admin.enabled"),
        ({"admin": _admin(tls_key=None)}, "admin.tls_cert"),
        ({"admin": _admin(jwt_audience=None)}, "admin.jwt.audience"),
        ({"admin": _admin(jwt_issuer="")}, "admin.jwt.issuer"),
        ({"admin": _admin(jwt_issuer=None)}, "admin.jwt.issuer"),
        ({"admin": _admin(jwt_hs256_secret_file="missing.secret")}, "admin.jwt.hs256_secret_file"),
        ({"admin": _admin(jwt_public_key_files=["idp.pem"])}, "admin.jwt"),
        ({"admin": _admin(jwt_hs256_secret_file=None)}, "admin.jwt"),
        ({"admin": _admin(jwt_hs256_secret_file="short.secret")}, "at least 32 bytes"),
        ({"admin": _admin(jwt_hs256_secret_file=None, jwt_public_key_files=["weak.pem"])}, "admin.jwt.public_key_files[0]"),
        ({"admin": _admin(jwt_hs256_secret_file=None, jwt_public_key_files=["ed.pem"])}, "admin.jwt.public_key_files[0]"),
        ({"admin": _admin(jwt_hs256_secret_file=None, jwt_public_key_files=["jwt.secret"])}, "not a PEM public key"),
        ({"admin": _admin(port=70000)}, "admin.port"),
    ],
)
def test_bad_lifecycle_settings_name_the_field(home: Home, sections: dict[str, Any], field: str) -> None:
    (home.path / "jwt.secret").write_text("s" * 40)
    (home.path / "short.secret").write_text("s" * 20)
    (home.path / "idp.pem").write_text("")
    _write_public(home, "weak.pem", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    _write_public(home, "ed.pem", ed25519.Ed25519PrivateKey.generate())
    patch_config(home.path, **sections)
    with pytest.raises(ConfigError) as caught:
        configmod.load(home.path)
    assert field in str(caught.value)


def test_defaults(home: Home) -> None:
    cfg = configmod.load(home.path)
    assert (cfg.vault.rotate_after_encryptions, cfg.vault.count_block) == (1 << 31, 1 << 16)
    assert cfg.admin.enabled is False
