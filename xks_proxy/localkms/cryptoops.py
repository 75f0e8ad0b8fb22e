"""Encrypt, Decrypt, GenerateDataKey(WithoutPlaintext) and ReEncrypt, with the encryption context bound.

A key whose material KMS holds (AWS_KMS, EXTERNAL) encrypts once, with AES-256-GCM under its
material. A key in an external key store encrypts twice, as KMS does: first under its KMS-side
key, then the proxy encrypts that under the external key (`stores.client`), so a blob opens only
with both. The blob format is `ciphertext`; the raw key bytes stay in `keymanager.crypto`.
"""

from __future__ import annotations

from typing import Any

from keymanager.crypto import new_plaintext_data_key
from xks_proxy.errors import InvalidCiphertextException
from xks_proxy.localkms import ciphertext, keys, stores
from xks_proxy.localkms.context import Caller, Local
from xks_proxy.localkms.errors import KmsApiError, invalid_ciphertext, unsupported, validation
from xks_proxy.localkms.xks import XksCiphertext

SYMMETRIC = keys.SYMMETRIC
EXTERNAL_STORE = "EXTERNAL_KEY_STORE"


def _check_algorithm(name: str | None) -> None:
    if name not in (None, SYMMETRIC):
        raise KmsApiError("InvalidKeyUsageException", f"{name} is not a valid encryption algorithm for a SYMMETRIC_DEFAULT key")


def _dry_run(req: dict[str, Any]) -> None:
    if req.get("DryRun"):
        raise KmsApiError("DryRunOperationException", "The request would have succeeded, but the DryRun option is set.")


async def seal(local: Local, caller: Caller, doc: dict[str, Any], plaintext: bytes, context: dict[str, str] | None, op: str) -> bytes:
    """A ciphertext blob of `plaintext` under the key `doc`, bound to `context`."""
    keys.usable(local, doc)
    material = local.data_key(doc["material"], keys.material_context(doc["id"]))
    double = doc["origin"] == EXTERNAL_STORE
    head = ciphertext.header(ciphertext.DOUBLE if double else ciphertext.LOCAL, doc["id"])
    iv, ct, tag = material.encrypt(plaintext, ciphertext.aad(head, context), b"")
    if not double:
        return ciphertext.encode_local(head, iv, tag, ct)
    store = local.state.get("store", doc["store_id"]) or {}
    sent = await stores.client(local, store).encrypt(
        doc["xks_key_id"], ciphertext.inner(iv, tag, ct), ciphertext.proxy_aad(head, context),
        stores.meta(local, caller, op, local.key_arn(doc["id"])),
    )
    return ciphertext.encode_double(head, sent.iv, sent.tag, sent.metadata, sent.ciphertext)


async def open_blob(
    local: Local, caller: Caller, blob: bytes, context: dict[str, str] | None, key_ref: str | None, op: str
) -> tuple[dict[str, Any], bytes]:
    """(the key, the plaintext) of a blob. With `key_ref`, the blob must be that key's (IncorrectKeyException)."""
    parsed = ciphertext.decode(blob)
    named = keys.resolve(local, key_ref) if key_ref else None
    if named is not None and named["id"] != parsed.key_id:
        raise KmsApiError("IncorrectKeyException", "The key ID in the request does not identify a KMS key that can perform this operation.")
    doc = named or keys.load(local, parsed.key_id)
    if doc is None or (doc["origin"] == EXTERNAL_STORE) != (parsed.kind == ciphertext.DOUBLE):
        raise invalid_ciphertext()
    keys.usable(local, doc)
    body = parsed.body
    if parsed.kind == ciphertext.DOUBLE:
        store = local.state.get("store", doc["store_id"]) or {}
        body = await stores.client(local, store).decrypt(
            doc["xks_key_id"], XksCiphertext(parsed.body, parsed.proxy_iv, parsed.proxy_tag, parsed.proxy_metadata),
            ciphertext.proxy_aad(parsed.header, context), stores.meta(local, caller, op, local.key_arn(doc["id"])),
        )
    iv, tag, ct = ciphertext.split_inner(body)
    material = local.data_key(doc["material"], keys.material_context(doc["id"]))
    try:
        return doc, material.decrypt(iv, ct, tag, ciphertext.aad(parsed.header, context), b"")
    except InvalidCiphertextException:
        raise invalid_ciphertext() from None


async def encrypt(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    _check_algorithm(req.get("EncryptionAlgorithm"))
    doc = keys.resolve(local, req["KeyId"])
    _dry_run(req)
    blob = await seal(local, caller, doc, req["Plaintext"], req.get("EncryptionContext"), "Encrypt")
    return {"CiphertextBlob": blob, "KeyId": local.key_arn(doc["id"]), "EncryptionAlgorithm": SYMMETRIC}


async def decrypt(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    _check_algorithm(req.get("EncryptionAlgorithm"))
    if req.get("Recipient"):
        raise unsupported("Decrypt for a Nitro Enclave recipient is not supported by this local KMS")
    if "CiphertextBlob" not in req:
        raise validation("1 validation error detected: Value null at 'ciphertextBlob' failed to satisfy constraint: Member must not be null")
    _dry_run(req)
    doc, plaintext = await open_blob(local, caller, req["CiphertextBlob"], req.get("EncryptionContext"), req.get("KeyId"), "Decrypt")
    return {"KeyId": local.key_arn(doc["id"]), "Plaintext": plaintext, "EncryptionAlgorithm": SYMMETRIC}


async def _data_key(local: Local, caller: Caller, req: dict[str, Any], op: str) -> tuple[dict[str, Any], bytes, bytes]:
    if req.get("Recipient"):
        raise unsupported(f"{op} for a Nitro Enclave recipient is not supported by this local KMS")
    spec, count = req.get("KeySpec"), req.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise validation("Please specify either number of bytes or key spec, and not both.")
    doc = keys.resolve(local, req["KeyId"])
    _dry_run(req)
    plaintext = new_plaintext_data_key(count or (32 if spec == "AES_256" else 16))
    return doc, plaintext, await seal(local, caller, doc, plaintext, req.get("EncryptionContext"), op)


async def generate_data_key(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc, plaintext, blob = await _data_key(local, caller, req, "GenerateDataKey")
    return {"CiphertextBlob": blob, "Plaintext": plaintext, "KeyId": local.key_arn(doc["id"])}


async def generate_data_key_without_plaintext(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc, _, blob = await _data_key(local, caller, req, "GenerateDataKeyWithoutPlaintext")
    return {"CiphertextBlob": blob, "KeyId": local.key_arn(doc["id"])}


async def re_encrypt(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    _check_algorithm(req.get("SourceEncryptionAlgorithm"))
    _check_algorithm(req.get("DestinationEncryptionAlgorithm"))
    if "CiphertextBlob" not in req:
        raise validation("1 validation error detected: Value null at 'ciphertextBlob' failed to satisfy constraint: Member must not be null")
    target = keys.resolve(local, req["DestinationKeyId"])
    _dry_run(req)
    source, plaintext = await open_blob(
        local, caller, req["CiphertextBlob"], req.get("SourceEncryptionContext"), req.get("SourceKeyId"), "ReEncrypt"
    )
    blob = await seal(local, caller, target, plaintext, req.get("DestinationEncryptionContext"), "ReEncrypt")
    return {
        "CiphertextBlob": blob, "SourceKeyId": local.key_arn(source["id"]), "KeyId": local.key_arn(target["id"]),
        "SourceEncryptionAlgorithm": SYMMETRIC, "DestinationEncryptionAlgorithm": SYMMETRIC,
    }
