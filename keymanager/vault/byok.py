"""Bring your own key: importing key material into a vault key made without it (BYOK).

As KMS does it: `params` hands out a fresh RSA wrapping key (its private half sealed in the
vault under the master key) and a signed 24-hour import token naming the key, the wrapping
algorithm and the wrapping key's fingerprint; `material` checks the token, unwraps the
material with that key and stores it sealed as the key's version 1, in one transaction. A
re-import of the same material changes nothing; other material is refused (it would make the
key's ciphertexts undecryptable). The token signing key is the vault's own (a vault secret,
made on first use), so a token works only on the vault that issued it.

`VaultDB.import_params/import_material` call this; it needs only the vault's storage, master
key and clock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable

from keymanager.base import BadRequest
from keymanager.crypto import MasterKey
from keymanager.crypto_transfer import (
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_SPECS,
    TokenError,
    TokenSigner,
    UnwrapError,
    WrappingKey,
)
from keymanager.vault.model import (
    ENABLED,
    ORIGIN_EXTERNAL,
    PENDING_DELETION,
    KeyInfo,
    VaultError,
    existing_row,
    key_info,
    material_context,
)
from keymanager.vault.rows import ImportParamsRow, VaultStorage

IMPORT_TOKEN_SECONDS = 24 * 3600
TOKEN_ISSUER = "xks-proxy vault"
TOKEN_AUDIENCE = "xks-proxy import"
_SIGNER_SECRET = "import-token-signing-key"


@dataclass(frozen=True, slots=True)
class ImportParams:
    """What `get-import-params` hands out: a wrapping public key and the token bound to it."""

    store: str
    key_id: str
    algorithm: str
    key_spec: str
    public_der: bytes
    public_pem: bytes
    token: str
    expires_at: float


def _wrapping_context(store: str, key_id: str, params_id: str) -> str:
    return f"xks-proxy wrapping key {store!r} {key_id!r} {params_id}"


def _signer_context() -> str:
    return "xks-proxy import-token signing key"


class KeyImport:
    """Import parameters and imported material for the keys of one vault."""

    def __init__(self, storage: VaultStorage, master: MasterKey, clock: Callable[[], float]) -> None:
        self._storage = storage
        self._master = master
        self._clock = clock

    def _key(self, store: str, key_id: str) -> KeyInfo:
        with self._storage.read() as tx:
            return key_info(existing_row(tx, store, key_id))

    def params(self, store: str, key_id: str, algorithm: str, key_spec: str) -> ImportParams:
        """A fresh RSA wrapping key (private half sealed here) and a 24-hour token bound to it."""
        if algorithm not in WRAPPING_ALGORITHMS:
            raise BadRequest(f"wrapping algorithm must be one of {', '.join(WRAPPING_ALGORITHMS)}")
        if key_spec not in WRAPPING_KEY_SPECS:
            raise BadRequest(f"wrapping key spec must be one of {', '.join(WRAPPING_KEY_SPECS)}")
        self._check_importable(self._key(store, key_id))
        wrapping = WrappingKey.generate(key_spec)  # outside any transaction: RSA-4096 takes a while
        signer = self._signer()
        params_id = secrets.token_urlsafe(18)
        now = self._clock()
        expires = now + IMPORT_TOKEN_SECONDS
        with self._storage.write(bump=False) as tx:
            self._check_importable(key_info(existing_row(tx, store, key_id)))
            tx.delete_expired_import_params(now)
            sealed = wrapping.seal(self._master, _wrapping_context(store, key_id, params_id))
            row = ImportParamsRow(params_id, store, key_id, algorithm, key_spec, sealed, wrapping.fingerprint, now, expires)
            tx.insert_import_params(row)
        token = signer.sign(
            {
                "iss": TOKEN_ISSUER,
                "aud": TOKEN_AUDIENCE,
                "sub": key_id,
                "store": store,
                "jti": params_id,
                "wrappingAlgorithm": algorithm,
                "wrappingKeySpec": key_spec,
                "wrappingKeySha256": wrapping.fingerprint,
                "iat": int(now),
                "exp": int(expires),
            }
        )
        return ImportParams(store, key_id, algorithm, key_spec, wrapping.public_der(), wrapping.public_pem(), token, expires)

    @staticmethod
    def _check_importable(info: KeyInfo) -> None:
        if info.origin != ORIGIN_EXTERNAL:
            raise VaultError(
                f"key {info.key_id} was made with vault-generated material; import works only into keys "
                "created with --no-material"
            )
        if info.state == PENDING_DELETION:
            raise VaultError(f"key {info.key_id} is pending deletion: cancel the deletion first")

    def _signer(self) -> TokenSigner:
        """The vault's import-token signing key, made on first use."""
        with self._storage.read() as tx:
            sealed = tx.secret(_SIGNER_SECRET)
        if sealed is None:
            with self._storage.write(bump=False) as tx:
                sealed = tx.secret(_SIGNER_SECRET)
                if sealed is None:
                    sealed = TokenSigner.generate().seal(self._master, _signer_context())
                    tx.insert_secret(_SIGNER_SECRET, sealed, self._clock())
        return TokenSigner.unseal(self._master, sealed, _signer_context())

    def material(self, store: str, key_id: str, token: str, encrypted: bytes) -> tuple[KeyInfo, bool]:
        """Unwrap and store imported material. Returns (key, True if stored / False if the same was there)."""
        with self._storage.read() as tx:
            sealed_signer = tx.secret(_SIGNER_SECRET)
        if sealed_signer is None:
            raise VaultError("the import token was issued by another vault; get import parameters from this one")
        signer = TokenSigner.unseal(self._master, sealed_signer, _signer_context())
        try:
            claims = signer.verify(token.strip(), audience=TOKEN_AUDIENCE, issuer=TOKEN_ISSUER)
        except TokenError as exc:
            raise VaultError(str(exc)) from None
        if claims["sub"] != key_id or claims.get("store") != store:
            raise VaultError(
                f"the import token is for key {claims['sub']} in store {claims.get('store')!r}, "
                f"not key {key_id} in store {store!r}"
            )
        now = self._clock()
        with self._storage.read() as tx:
            params = tx.import_params(str(claims["jti"]))
        if params is None or params.expires_at <= now or (params.store, params.key_id) != (store, key_id):
            raise VaultError("the import parameters of this token are gone (expired, or the key was deleted); get new ones")
        wrapping = WrappingKey.unseal(self._master, params.sealed_private, _wrapping_context(store, key_id, params.params_id))
        if wrapping.fingerprint != params.public_fingerprint or claims.get("wrappingKeySha256") != params.public_fingerprint:
            raise VaultError("the import token does not match its wrapping key")
        try:
            context = material_context(store, key_id, 1)
            sealed, material = wrapping.unwrap_and_seal(params.algorithm, encrypted, self._master, context)
        except UnwrapError as exc:
            raise VaultError(str(exc)) from None
        with self._storage.write() as tx:
            row = existing_row(tx, store, key_id)
            self._check_importable(key_info(row))
            if row.version_count == 0:
                tx.insert_version(store, key_id, 1, sealed, now)
                tx.update_key(store, key_id, state=ENABLED, deletion_date=None)
                stored = True
            else:
                existing = self._master.data_key(tx.versions(store, key_id)[0].sealed, material_context(store, key_id, 1))
                if not existing.same_material(material):
                    raise VaultError(
                        f"key {key_id} already has different key material; importing other material would make "
                        "its ciphertexts undecryptable (re-import only the same material)"
                    )
                tx.bump = False
                stored = False
        return self._key(store, key_id), stored
