"""Key managers: the interfaces (base.py), the backend registry (registry.py), the one wall around
raw key material (crypto.py, crypto_transfer.py), the seals of the master key (seal/), and one
package per backend (vault/, pkcs11/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keymanager.base import KeyAdmin, KeyManager
from keymanager.registry import backend

if TYPE_CHECKING:
    from xks_proxy.config import Config


def create_key_manager(config: "Config") -> KeyManager:
    """The backend the configuration names. The server sees only the interface."""
    return backend(config.backend).key_manager(config)


def create_key_admin(config: "Config") -> KeyAdmin:
    """The same backend, as the CLI administers it. Raises KeyAdminError if it cannot be reached
    (StorageUnavailable for a vault database that does not answer)."""
    return backend(config.backend).key_admin(config)
