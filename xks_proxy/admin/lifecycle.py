"""Key lifecycle operations as JSON documents: one code path for the CLI and the admin API.

`VaultLifecycle` wraps `keymanager.vault.db.VaultDB` for one store and one actor, and writes an
audit event for every operation, allowed or refused. `xks_proxy.admin.client.AdminClient`
offers the same methods over the admin API, so a CLI command does not care which it holds.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Protocol

from keymanager.base import KeyAdmin
from keymanager.vault.db import BadRequest, VaultDB, VaultError, audit, iso_time, parse_usage
from xks_proxy.config import KEY_ID_RE, Store


class KeyLifecycle(Protocol):
    """What the `keys` commands call: local vault or remote admin API."""

    def create(self, key_id: str, usage: str, no_material: bool) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def show(self, key_id: str) -> dict[str, Any]: ...
    def enable(self, key_id: str) -> dict[str, Any]: ...
    def disable(self, key_id: str) -> dict[str, Any]: ...
    def rotate(self, key_id: str) -> dict[str, Any]: ...
    def versions(self, key_id: str) -> dict[str, Any]: ...
    def schedule_deletion(self, key_id: str, pending_days: int) -> dict[str, Any]: ...
    def cancel_deletion(self, key_id: str) -> dict[str, Any]: ...
    def import_params(self, key_id: str, algorithm: str, key_spec: str) -> dict[str, Any]: ...
    def import_material(self, key_id: str, import_token: str, encrypted_material: bytes) -> dict[str, Any]: ...


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


class VaultLifecycle:
    """The operations on the local vault for `store`, audited as done by `actor` through `via`."""

    def __init__(self, db: VaultDB, store: str, actor: str, via: str) -> None:
        self.db = db
        self.store = store
        self.actor = actor
        self.via = via

    def _audited(self, action: str, key_id: str | None, run: Callable[[], Any], **detail: Any) -> Any:
        event = {"event": "key-lifecycle", "action": action, "actor": self.actor, "via": self.via}
        event.update(store=self.store, keyId=key_id, **detail)
        try:
            result = run()
        except VaultError as exc:
            audit({**event, "outcome": type(exc).__name__, "reason": str(exc)})
            raise
        audit({**event, "outcome": "OK"})
        return result

    def create(self, key_id: str, usage: str, no_material: bool) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            if not KEY_ID_RE.match(key_id):
                raise BadRequest(f"key id {key_id!r} must be 1-128 characters of [A-Za-z0-9._-]")
            return self.db.create_key(self.store, key_id, parse_usage(usage), material=not no_material).to_json()

        return self._audited("create", key_id, run, usage=usage, noMaterial=no_material)

    def list(self) -> list[dict[str, Any]]:
        return self._audited("list", None, lambda: [info.to_json() for info in self.db.keys(self.store)])

    def show(self, key_id: str) -> dict[str, Any]:
        return self._audited("show", key_id, lambda: self.db.key(self.store, key_id).to_json())

    def enable(self, key_id: str) -> dict[str, Any]:
        return self._audited("enable", key_id, lambda: self.db.enable(self.store, key_id).to_json())

    def disable(self, key_id: str) -> dict[str, Any]:
        return self._audited("disable", key_id, lambda: self.db.disable(self.store, key_id).to_json())

    def rotate(self, key_id: str) -> dict[str, Any]:
        return self._audited("rotate", key_id, lambda: self.db.rotate(self.store, key_id).to_json())

    def versions(self, key_id: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            return {
                "keyId": key_id,
                "store": self.store,
                "versions": [v.to_json() for v in self.db.versions(self.store, key_id)],
            }

        return self._audited("versions", key_id, run)

    def schedule_deletion(self, key_id: str, pending_days: int) -> dict[str, Any]:
        return self._audited(
            "schedule-deletion",
            key_id,
            lambda: self.db.schedule_deletion(self.store, key_id, pending_days).to_json(),
            pendingDays=pending_days,
        )

    def cancel_deletion(self, key_id: str) -> dict[str, Any]:
        return self._audited("cancel-deletion", key_id, lambda: self.db.cancel_deletion(self.store, key_id).to_json())

    def import_params(self, key_id: str, algorithm: str, key_spec: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            params = self.db.import_params(self.store, key_id, algorithm, key_spec)
            return {
                "keyId": key_id,
                "store": self.store,
                "wrappingAlgorithm": params.algorithm,
                "wrappingKeySpec": params.key_spec,
                "publicKey": base64.b64encode(params.public_der).decode(),
                "importToken": params.token,
                "parametersValidTo": iso_time(params.expires_at),
            }

        return self._audited("get-import-params", key_id, run, wrappingAlgorithm=algorithm, wrappingKeySpec=key_spec)

    def import_material(self, key_id: str, import_token: str, encrypted_material: bytes) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            info, stored = self.db.import_material(self.store, key_id, import_token, encrypted_material)
            return {**info.to_json(), "import": "stored" if stored else "unchanged: this key already holds that material"}

        return self._audited("import", key_id, run)

