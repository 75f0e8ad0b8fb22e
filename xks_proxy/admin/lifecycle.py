"""Key lifecycle operations as JSON documents: one code path for the CLI and the admin API.

A backend with a full lifecycle offers it as its `lifecycle` capability (the vault's is
`keymanager.vault.lifecycle.VaultLifecycle`); `KeyAdminLifecycle` gives the others the part their
`KeyAdmin` can do. `xks_proxy.admin.client.AdminClient` offers the same methods over the admin
API, so a CLI command does not care which it holds (`keymanager.base.KeyLifecycle`).
"""

from __future__ import annotations

from typing import Any

from keymanager.base import KEY_ID_RE, BadRequest, KeyAdmin, KeyLifecycle, parse_usage
from xks_proxy.config import Store

__all__ = ["KeyAdminLifecycle", "KeyLifecycle"]


class KeyAdminLifecycle:
    """The `keys` commands on a backend without vault lifecycle (PKCS#11), through its KeyAdmin.

    The HSM holds key state itself: the backend explains its own refusals (disable, rotate);
    the vault-only lifecycle (versions, deletion, import) is refused in one line naming it.
    A store's `key_ids`, when set, limit what it lists and may create.
    """

    def __init__(self, admin: KeyAdmin, store: Store, action: str, backend: str) -> None:
        self.admin = admin
        self.store = store
        self.action = action
        self.backend = backend

    def create(self, key_id: str, usage: str, no_material: bool) -> dict[str, Any]:
        if no_material:
            self._unsupported()
        if not KEY_ID_RE.match(key_id):
            raise BadRequest(f"key id {key_id!r} must be 1-128 characters of [A-Za-z0-9._-]")
        return self.admin.create_key(self.store.prefix, key_id, parse_usage(usage)).to_json()

    def list(self) -> list[dict[str, Any]]:
        return [info.to_json() for info in self.admin.keys(self.store.prefix) if self.store.allows(info.key_id)]

    def show(self, key_id: str) -> dict[str, Any]:
        return self.admin.key(self.store.prefix, key_id).to_json()

    def _unsupported(self, *args: Any) -> dict[str, Any]:
        raise BadRequest(f"keys {self.action} is not supported on backend {self.backend}")

    def enable(self, key_id: str) -> dict[str, Any]:
        return self.admin.set_state(self.store.prefix, key_id, "ENABLED").to_json()

    def disable(self, key_id: str) -> dict[str, Any]:
        return self.admin.set_state(self.store.prefix, key_id, "DISABLED").to_json()

    def rotate(self, key_id: str) -> dict[str, Any]:
        return self.admin.rotate(self.store.prefix, key_id).to_json()

    versions = schedule_deletion = cancel_deletion = import_params = import_material = _unsupported
