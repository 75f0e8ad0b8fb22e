"""Imported key material (Origin EXTERNAL), the flow of KMS's developer guide.

CreateKey(Origin=EXTERNAL) makes a key PendingImport. GetParametersForImport gives a fresh RSA
wrapping key (`keymanager.crypto_transfer.WrappingKey`: RSA_2048/3072/4096, RSAES_OAEP_SHA_1/_256,
RSA_AES_KEY_WRAP_SHA_1/_256) and an import token valid 24 hours; ImportKeyMaterial unwraps the
32-byte material straight into its sealed form and the key is usable (Enabled), until ValidTo when
the material expires; DeleteImportedKeyMaterial makes it PendingImport again. Re-importing must
bring the same material (compared by `DataKey.fingerprint`), else IncorrectKeyMaterialException,
so ciphertexts made before the deletion open again.

The import token is 52 random-looking bytes (a prefix, the key's id, 32 random bytes) of which
only the SHA-256 is kept: it is bound to its key and to the latest parameters, and single use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from typing import Any

from keymanager.crypto_transfer import UnwrapError, WrappingKey
from xks_proxy.localkms import keys
from xks_proxy.localkms.context import Caller, Local, now
from xks_proxy.localkms.errors import KmsApiError, invalid_ciphertext, invalid_state, unsupported, validation

TOKEN_PREFIX = b"LKIT"
TOKEN_SECONDS = 86400.0
MAX_VALID_SECONDS = 365 * 86400.0
ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256")
SPECS = ("RSA_2048", "RSA_3072", "RSA_4096")


def _wrapping_context(key_id: str) -> str:
    return f"local-kms key {key_id} wrapping key"


def _imported_key(local: Local, ref: str) -> dict[str, Any]:
    doc = keys.resolve(local, ref, aliases=False)
    if doc["origin"] != "EXTERNAL":
        raise unsupported(f"{local.key_arn(doc['id'])} has Origin {doc['origin']}: key material can be imported only into keys with Origin EXTERNAL")
    if keys.key_state(local, doc) == "PendingDeletion":
        raise invalid_state(f"{local.key_arn(doc['id'])} is pending deletion.")
    return doc


async def get_parameters_for_import(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    algorithm, spec = req["WrappingAlgorithm"], req["WrappingKeySpec"]
    if algorithm not in ALGORITHMS or spec not in SPECS:
        raise validation(f"WrappingAlgorithm {algorithm} with WrappingKeySpec {spec} is not supported; use one of {', '.join(ALGORITHMS)} with {', '.join(SPECS)}")
    doc = _imported_key(local, req["KeyId"])
    wrapping = WrappingKey.generate(spec)
    token = TOKEN_PREFIX + uuid.UUID(doc["id"]).bytes + secrets.token_bytes(32)
    valid_to = round(now() + TOKEN_SECONDS, 3)
    doc["import"] = {
        "token_sha256": hashlib.sha256(token).hexdigest(), "algorithm": algorithm, "valid_to": valid_to,
        "wrapping_key": base64.b64encode(wrapping.seal(local.keyring, _wrapping_context(doc["id"]))).decode(),
    }
    local.state.put("key", doc["id"], doc)
    return {"KeyId": local.key_arn(doc["id"]), "ImportToken": token, "PublicKey": wrapping.public_der(), "ParametersValidTo": valid_to}


def _expiration(req: dict[str, Any]) -> tuple[str, float | None]:
    valid_to = req.get("ValidTo")
    model = req.get("ExpirationModel") or ("KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE")
    if model == "KEY_MATERIAL_EXPIRES" and valid_to is None:
        raise validation("ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES")
    if model == "KEY_MATERIAL_DOES_NOT_EXPIRE" and valid_to is not None:
        raise validation("ValidTo must be omitted when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE")
    if valid_to is not None and not now() < valid_to <= now() + MAX_VALID_SECONDS:
        raise validation("ValidTo must be in the future and at most 365 days from now")
    return model, valid_to


async def import_key_material(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _imported_key(local, req["KeyId"])
    model, valid_to = _expiration(req)
    if req.get("ImportType") == "NEW_KEY_MATERIAL" and doc.get("fingerprint"):
        raise unsupported("importing new key material into a key that has had material (rotation) is not supported by this local KMS")
    params = doc.get("import")
    token = req["ImportToken"]
    if not params or not hmac.compare_digest(hashlib.sha256(token).hexdigest(), params["token_sha256"]):
        raise KmsApiError("InvalidImportTokenException", "The import token is invalid for this key: use the token of its latest GetParametersForImport")
    if params["valid_to"] <= now():
        raise KmsApiError("ExpiredImportTokenException", "The import token has expired: call GetParametersForImport again")
    wrapping = WrappingKey.unseal(local.keyring, base64.b64decode(params["wrapping_key"]), _wrapping_context(doc["id"]))
    try:
        sealed, material = wrapping.unwrap_and_seal(
            params["algorithm"], req["EncryptedKeyMaterial"], local.keyring, "local-kms " + keys.material_context(doc["id"])
        )
    except UnwrapError:
        raise invalid_ciphertext("The encrypted key material does not open with this import token's wrapping key and algorithm, or is not 32 bytes") from None
    if doc.get("fingerprint") and doc["fingerprint"] != material.fingerprint:
        raise KmsApiError("IncorrectKeyMaterialException", "The key material is not the material previously imported into this KMS key")
    doc.update(
        material=base64.b64encode(sealed).decode(), fingerprint=material.fingerprint, expiration_model=model, valid_to=valid_to, **{"import": None}
    )
    local.state.put("key", doc["id"], doc)
    return {"KeyId": local.key_arn(doc["id"])}


async def delete_imported_key_material(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _imported_key(local, req["KeyId"])
    doc.update(material=None, valid_to=None)
    local.state.put("key", doc["id"], doc)
    return {"KeyId": local.key_arn(doc["id"])}
