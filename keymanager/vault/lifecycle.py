"""The vault's key lifecycle as JSON documents, audited: what `keys ...` and the admin API run.

`VaultLifecycle` wraps `VaultDB` for one store and one actor, and writes an audit event for
every operation, allowed or refused (the registry hands it out as the vault backend's
`lifecycle` capability; `xks_proxy.admin.client.AdminClient` offers the same methods remotely).
"""

from __future__ import annotations

import base64
from typing import Any, Callable

from keymanager.base import KEY_ID_RE, BadRequest, audit, iso_time, parse_usage
from keymanager.base import KeyRefused as VaultError
from keymanager.vault.db import VaultDB


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

