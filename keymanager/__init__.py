"""Key managers: the `KeyManager` interface (base.py) and one module per backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keymanager.base import KeyManager

if TYPE_CHECKING:
    from xks_proxy.config import Config


def create_key_manager(config: "Config") -> KeyManager:
    """The backend the configuration names. The server sees only the interface."""
    if config.backend == "vault":
        from keymanager.vault import VaultKeyManager

        vault = config.vault
        return VaultKeyManager(
            vault.path,
            config.master_key,
            vault.refresh_seconds,
            rotate_after=vault.rotate_after_encryptions,
            count_block=vault.count_block,
        )
    raise ValueError(f"keymanager.backend {config.backend!r} is not available")
