"""Key managers: the `KeyManager` interface (base.py) and one module per backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keymanager.base import KeyAdmin, KeyAdminError, KeyManager

if TYPE_CHECKING:
    from xks_proxy.config import Config


def create_key_manager(config: "Config") -> KeyManager:
    """The backend the configuration names. The server sees only the interface."""
    if config.backend == "vault":
        from keymanager.vault.db import VaultKeyManager

        vault = config.vault
        return VaultKeyManager(
            vault.path,
            config.master_key,
            vault.refresh_seconds,
            rotate_after=vault.rotate_after_encryptions,
            count_block=vault.count_block,
            dsn=vault.dsn,
        )
    if config.backend == "pkcs11":
        from keymanager.pkcs11.manager import Pkcs11KeyManager

        assert config.pkcs11 is not None
        return Pkcs11KeyManager(config.pkcs11)
    raise ValueError(f"keymanager.backend {config.backend!r} is not available")


def create_key_admin(config: "Config") -> KeyAdmin:
    """The same backend, as the CLI administers it. Raises KeyAdminError if it cannot be reached
    (StorageUnavailable for a vault database that does not answer)."""
    if config.backend == "vault":
        from keymanager.vault.db import VaultDB
        from xks_proxy.config import ConfigError

        if config.vault.dsn is None and not config.vault.path.is_file():
            raise ConfigError(f"vault.path: file {config.vault.path} does not exist")
        return VaultDB.open(config.vault.path, config.master_key, config.vault.dsn)
    if config.backend == "pkcs11":
        from keymanager.pkcs11.admin import Pkcs11Admin

        assert config.pkcs11 is not None
        return Pkcs11Admin(config.pkcs11)
    raise KeyAdminError(f"keymanager.backend {config.backend!r} has no key administration")
