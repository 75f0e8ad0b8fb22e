"""Creating a proxy home: configuration, master key, vault, dev TLS, a first key store.

A home is a directory, every file in it 0600 (the CLI runs under umask 077):
    config.toml   settings and key stores; credential secrets sealed under the master key
    seal.json     the seal record: the master key wrapped under the seal's KEK (keymanager.seal)
    master.key    only with `--seal file`: the master key in clear (development, `demo`)
    vault.db      the SQLite key vault
    tls/          a local development CA and a certificate for localhost
A failed `init` removes what it made, so the corrected command can run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from keymanager.base import iso_time
from keymanager.crypto import Keyring, MasterKey
from keymanager.seal.home import legacy_keyring
from keymanager.seal.kinds import NewSeal, open_keyring
from keymanager.seal.record import SEAL_FILE, FileRecord, SealRecord, wrap_all
from keymanager.registry import backend
from xks_proxy.config import CONFIG_FILE, ConfigError, credential_context, validate_prefix
from xks_proxy.devtls import make_dev_certs

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/+"


def new_access_key_id() -> str:
    """20 characters of [A-Z2-7], as KMS expects; 'XKS' first so operators can tell what it is."""
    return "XKS" + "".join(secrets.choice(_BASE32) for _ in range(17))


def new_secret() -> str:
    """64 characters of [a-zA-Z0-9/+]: 384 bits of entropy, well over the spec's 256."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(64))


def sealed_credential(master_key: Keyring | MasterKey, access_key_id: str, secret: str) -> dict[str, str]:
    """A credential as config.toml holds it: the secret sealed, and when it was made (its age is a metric)."""
    return {
        "access_key_id": access_key_id,
        "secret_access_key_sealed": master_key.seal_text(secret, credential_context(access_key_id)),
        "created_at": iso_time(time.time()) or "",  # iso_time is None only for None
    }


def init_home(
    home: Path, prefix: str, region: str, port: int, seal: "NewSeal | None" = None, seal_settings: dict[str, str] | None = None
) -> tuple[str, str]:
    """Create a fresh home. Returns the first store's (access key id, secret) for the operator.

    `seal`: the seal made for it (`keymanager.seal.kinds.make`); None: the master key in clear in
    master.key, as before seals (`--seal file`). `seal_settings`: config.toml's `[seal]` (where a
    passphrase or PIN comes from at start). On any failure nothing of the home is left.
    """
    validate_prefix(prefix, "--uri-prefix")
    if (home / CONFIG_FILE).exists() or (home / "vault.db").exists() or (home / "master.key").exists() or (home / SEAL_FILE).exists():
        raise ConfigError(f"--home: {home} already holds a proxy home; refusing to overwrite it")
    existed = home.exists()
    before = set(home.iterdir()) if existed else set()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return _fill_home(home, prefix, region, port, seal, seal_settings or {})
    except BaseException:
        if not existed:
            shutil.rmtree(home, ignore_errors=True)
        else:
            for made in set(home.iterdir()) - before:
                shutil.rmtree(made, ignore_errors=True) if made.is_dir() else made.unlink(missing_ok=True)
        raise


def _fill_home(home: Path, prefix: str, region: str, port: int, seal: "NewSeal | None", seal_settings: dict[str, str]) -> tuple[str, str]:
    if seal is None:
        master_text = MasterKey.generate_text()
        keyring = legacy_keyring(MasterKey.from_text(master_text))
        key_file = home / "master.key"
        key_file.write_text(master_text)
        key_file.chmod(0o600)
    else:
        master = MasterKey.generate()
        record = SealRecord(seal.kind, seal.params, master.key_id, wrap_all(seal.kek, [master]))
        FileRecord(home).write(record)
        keyring = open_keyring(record, seal.kek)
    make_dev_certs(home / "tls")
    init_backend = backend("vault").init_home  # a new home starts on the local vault
    assert init_backend is not None
    sections = init_backend(home, keyring)
    access_key_id, secret = new_access_key_id(), new_secret()
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "tls_cert": "tls/server.pem",
            "tls_key": "tls/server.key",
        },
        "limits": {"max_plaintext_bytes": 8192, "max_aad_bytes": 8192},
        **sections,
        **({"master_key": {"file": "master.key", "env": "XKS_PROXY_MASTER_KEY"}} if seal is None else {}),
        **({"seal": dict(seal_settings)} if seal_settings else {}),
        "stores": [
            {"prefix": prefix, "regions": [region], "credentials": [sealed_credential(keyring, access_key_id, secret)]}
        ],
    }
    write_config(home, config)
    return access_key_id, secret


def write_config(home: Path, config: dict[str, Any]) -> None:
    """Atomically replace config.toml (write, fsync, rename): a crash leaves old or new, never half."""
    path = home / CONFIG_FILE
    header = "# xks-proxy configuration. Secrets are sealed under the home's master key; see README.md.\n"
    # A name of its own (mkstemp: 0600 from the start): two writers at once (two rotations, a
    # rotation and `credentials add`) must not rename each other's half-written file.
    fd, tmp = tempfile.mkstemp(prefix=CONFIG_FILE + ".", suffix=".tmp", dir=home)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(header + tomli_w.dumps(config))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
