"""`xks-proxy keys ...` on the PKCS#11 backend: keys generated inside the HSM, read from the token."""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute, KeyType

from keymanager.base import KeyAdminError, KeyInfo, KeyUsage
from keymanager.pkcs11.errors import HsmError, PKCS11Error, ckr_name, lost_or_failed
from keymanager.pkcs11.token import (
    Library,
    TokenKey,
    describe,
    duplicate_message,
    find,
    scan,
    signals_deferred,
)


def key_template(usage: tuple[KeyUsage, ...]) -> dict[Attribute, Any]:
    """A token AES key that never leaves the HSM and can do exactly the asked usage."""
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: KeyUsage.ENCRYPT in usage,
        Attribute.DECRYPT: KeyUsage.DECRYPT in usage,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


class Pkcs11Admin:
    """`xks-proxy keys ...` on an HSM: a key is a token AES key named by its CKA_LABEL.

    The token is not partitioned by store: every store sees every label (the CLI and the server
    narrow that by the store's key_ids). Disable, enable and rotate are refused: key state lives
    in the HSM (see docs/pkcs11.md).
    """

    def __init__(self, config: Any) -> None:  # a Pkcs11Config
        self._config = config
        try:
            with signals_deferred():  # a Ctrl-C or SIGTERM lands after the login, never inside it
                library = Library.get(config.module)
                token = library.token(config.token_label, config.slot)
                self._session = library.session(token, config.pin, rw=True)
        except HsmError as exc:
            raise KeyAdminError(str(exc)) from None
        self.token_label: str = token.label

    def close(self) -> None:
        try:
            with signals_deferred():
                self._session.close()
        except PKCS11Error:
            pass

    def _lookup(self, key_id: str) -> TokenKey | None:
        try:
            found = find(self._session, key_id)
        except PKCS11Error as exc:
            raise KeyAdminError(str(lost_or_failed(exc, f"looking up {key_id}"))) from None
        if len(found) > 1:
            raise KeyAdminError(duplicate_message(key_id, len(found)))
        return describe(found[0]) if found else None

    def _info(self, store: str, key: TokenKey) -> KeyInfo:
        state = "ENABLED" if key.copies == 1 else "DUPLICATE_LABEL"
        return KeyInfo(store=store, key_id=key.label, state=state, usage=key.usage, key_spec=key.key_spec)

    def create_key(self, store: str, key_id: str, usage: tuple[KeyUsage, ...]) -> KeyInfo:
        return self._info(store, self.generate(key_id, usage))

    def generate(self, label: str, usage: tuple[KeyUsage, ...]) -> TokenKey:
        """Generate an AES-256 key inside the HSM under a label no other object has."""
        if self._lookup(label) is not None:
            raise KeyAdminError(f"a key labelled {label} already exists in the token")
        try:
            with signals_deferred():  # C_GenerateKey writes the token file
                obj = self._session.generate_key(
                    KeyType.AES, 256, label=label, store=True, capabilities=0, template=key_template(usage)
                )
        except PKCS11Error as exc:
            raise KeyAdminError(f"the HSM refused to generate {label}: {ckr_name(exc)}") from None
        return describe(obj)

    def ensure_health_key(self) -> bool:
        """Create the health-check key if it is missing. True if it was created."""
        if self._lookup(self._config.health_key) is not None:
            return False
        self.generate(self._config.health_key, (KeyUsage.ENCRYPT, KeyUsage.DECRYPT))
        return True

    def keys(self, store: str) -> list[KeyInfo]:
        try:
            found = scan(self._session)
        except PKCS11Error as exc:
            raise KeyAdminError(str(lost_or_failed(exc, "listing the token's keys"))) from None
        return [self._info(store, key) for label, key in sorted(found.items()) if label != self._config.health_key]

    def key(self, store: str, key_id: str) -> KeyInfo:
        key = self._lookup(key_id)
        if key is None:
            raise KeyAdminError(f"no key labelled {key_id} in the token")
        return self._info(store, key)

    def set_state(self, store: str, key_id: str, state: str) -> KeyInfo:
        raise KeyAdminError(
            "keys disable/enable are not available on the pkcs11 backend: key state lives in the HSM. "
            "To stop serving a key, drop it from the store's key_ids in config.toml, or use the HSM's own tools"
        )

    def rotate(self, store: str, key_id: str) -> KeyInfo:
        raise KeyAdminError(
            "keys rotate is not available on the pkcs11 backend: an HSM key's material never changes under its "
            "label; create a new key and a new KMS key over it"
        )
