"""KMS keys: how a KeyId names one, its KeyMetadata and KeyState, and the lifecycle operations.

A key is one document (`state`, kind "key"). Its state is derived, never stored, so that it can
never disagree with its facts: PendingDeletion (a deletion date), PendingImport (an EXTERNAL key
without material, never imported, deleted, or expired), Unavailable (an external key store that
is not CONNECTED), else Enabled or Disabled. Deadlines (deletion, expiry of imported material)
are applied when the key is next read.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from xks_proxy.localkms import stores
from xks_proxy.localkms.context import Caller, Local, now, page
from xks_proxy.localkms.errors import KmsApiError, invalid_state, not_found, unsupported, validation

SYMMETRIC = "SYMMETRIC_DEFAULT"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ARN = re.compile(r"arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):(?P<kind>key|alias)/(?P<rest>.+)")
DAY = 86400.0


def material_context(key_id: str) -> str:
    return f"key {key_id} material"


# --- finding a key ---------------------------------------------------------------------------


def load(local: Local, key_id: str) -> dict[str, Any] | None:
    """The key's document, after applying a deletion or material expiry that has come due."""
    doc = local.state.get("key", key_id)
    if doc is None:
        return None
    moment = now()
    if doc.get("deletion_date") and doc["deletion_date"] <= moment:
        local.state.delete("key", key_id)
        for alias in list(local.state.all("alias")):
            if alias["key_id"] == key_id:
                local.state.delete("alias", alias["name"])
        return None
    if doc.get("valid_to") and doc["valid_to"] <= moment and doc.get("material"):
        doc["material"] = None
        local.state.put("key", key_id, doc)
    return doc


def resolve(local: Local, key_ref: str, *, aliases: bool = True) -> dict[str, Any]:
    """The key a KeyId names: key id, key ARN, alias name or alias ARN. NotFoundException if none."""
    ref = key_ref
    match = _ARN.fullmatch(key_ref)
    if match:
        if match["region"] != local.region or match["account"] != local.account:
            raise not_found(f"{'Key' if match['kind'] == 'key' else 'Alias'} '{key_ref}' does not exist")
        ref = match["rest"] if match["kind"] == "key" else "alias/" + match["rest"]
    elif key_ref.startswith("arn:"):
        raise KmsApiError("InvalidArnException", f"Invalid arn {key_ref[:256]}")
    if ref.startswith("alias/"):
        alias = local.state.get("alias", ref) if aliases else None
        doc = load(local, alias["key_id"]) if alias else None
        if doc is None:
            raise not_found(f"Alias '{local.alias_arn(ref)}' is not found.")
        return doc
    if not _UUID.fullmatch(ref):
        raise not_found(f"Invalid keyId '{key_ref[:256]}'")
    doc = load(local, ref)
    if doc is None:
        raise not_found(f"Key '{local.key_arn(ref)}' does not exist")
    return doc


def key_state(local: Local, doc: dict[str, Any]) -> str:
    if doc.get("deletion_date"):
        return "PendingDeletion"
    if doc["origin"] == "EXTERNAL" and not doc.get("material"):
        return "PendingImport"
    if doc["origin"] == "EXTERNAL_KEY_STORE" and stores.connection_state(local, doc["store_id"]) != "CONNECTED":
        return "Unavailable"
    return "Enabled" if doc["enabled"] else "Disabled"


def usable(local: Local, doc: dict[str, Any]) -> None:
    """Refuse a cryptographic operation with a key not Enabled, with KMS's exception for its state."""
    state = key_state(local, doc)
    arn = local.key_arn(doc["id"])
    if state == "Disabled":
        raise KmsApiError("DisabledException", f"{arn} is disabled.")
    if state != "Enabled":
        words = {"PendingDeletion": "pending deletion", "PendingImport": "pending import", "Unavailable": "unavailable"}
        raise invalid_state(f"{arn} is {words[state]}.")


def metadata(local: Local, doc: dict[str, Any]) -> dict[str, Any]:
    """KeyMetadata as DescribeKey, CreateKey and the imports answer it."""
    state = key_state(local, doc)
    meta: dict[str, Any] = {
        "AWSAccountId": local.account,
        "KeyId": doc["id"],
        "Arn": local.key_arn(doc["id"]),
        "CreationDate": doc["created"],
        "Enabled": state == "Enabled",
        "Description": doc.get("description", ""),
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": state,
        "Origin": doc["origin"],
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": SYMMETRIC,
        "KeySpec": SYMMETRIC,
        "EncryptionAlgorithms": [SYMMETRIC],
        "MultiRegion": False,
    }
    if doc.get("deletion_date"):
        meta["DeletionDate"] = doc["deletion_date"]
    if doc["origin"] == "EXTERNAL" and doc.get("expiration_model"):
        meta["ExpirationModel"] = doc["expiration_model"]
        if doc.get("valid_to") and doc.get("material"):
            meta["ValidTo"] = doc["valid_to"]
    if doc.get("store_id"):
        meta["CustomKeyStoreId"] = doc["store_id"]
        meta["XksKeyConfiguration"] = {"Id": doc["xks_key_id"]}
    return meta


# --- operations -------------------------------------------------------------------------------


async def create_key(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    origin = req.get("Origin", "AWS_KMS")
    spec = req.get("KeySpec") or req.get("CustomerMasterKeySpec") or SYMMETRIC
    if req.get("KeySpec") and req.get("CustomerMasterKeySpec"):
        raise validation("You cannot specify both KeySpec and CustomerMasterKeySpec")
    store_id = req.get("CustomKeyStoreId")
    if origin == "AWS_CLOUDHSM":
        raise unsupported("AWS CloudHSM key stores are not supported by this local KMS")
    if store_id and origin != "EXTERNAL_KEY_STORE":
        raise validation("CustomKeyStoreId is valid only with Origin EXTERNAL_KEY_STORE here (AWS_CLOUDHSM is not supported)")
    if origin == "EXTERNAL_KEY_STORE" and (not store_id or not req.get("XksKeyId")):
        raise validation("Origin EXTERNAL_KEY_STORE requires CustomKeyStoreId and XksKeyId")
    if req.get("XksKeyId") and origin != "EXTERNAL_KEY_STORE":
        raise validation("XksKeyId is valid only with Origin EXTERNAL_KEY_STORE")
    if spec != SYMMETRIC:
        where = "in a custom key store" if origin == "EXTERNAL_KEY_STORE" else f"with Origin {origin} in this local KMS"
        raise unsupported(f"KeySpec {spec} is not supported {where}; only SYMMETRIC_DEFAULT keys are")
    if req.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        raise validation(f"KeyUsage {req['KeyUsage']} is not compatible with KeySpec SYMMETRIC_DEFAULT")
    if req.get("MultiRegion"):
        raise unsupported("multi-Region keys are not supported by this local KMS")
    key_id = str(uuid.uuid4())
    doc: dict[str, Any] = {
        "id": key_id, "created": now(), "description": req.get("Description", ""), "origin": origin, "enabled": True,
        "material": None, "tags": req.get("Tags", []),
    }
    if origin != "EXTERNAL":  # KMS's own material, or the KMS-side key of double encryption
        doc["material"] = local.new_key(material_context(key_id))
    if origin == "EXTERNAL_KEY_STORE":
        doc.update(store_id=store_id, xks_key_id=req["XksKeyId"])
        async with local.lock(store_id):  # no other key may take the same external key meanwhile
            await stores.check_xks_key(local, caller, store_id, req["XksKeyId"], local.key_arn(key_id))
            local.state.insert("key", key_id, doc, doc["created"])
    else:
        local.state.insert("key", key_id, doc, doc["created"])
    return {"KeyMetadata": metadata(local, doc)}


async def describe_key(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    return {"KeyMetadata": metadata(local, resolve(local, req["KeyId"]))}


async def list_keys(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    ids = [doc["id"] for doc in list(local.state.all("key")) if load(local, doc["id"]) is not None]
    shown, more = page(ids, req.get("Limit"), req.get("Marker"))
    return {"Keys": [{"KeyId": k, "KeyArn": local.key_arn(k)} for k in shown], **more}


def _change(local: Local, req: dict[str, Any], refuse: tuple[str, ...]) -> dict[str, Any]:
    doc = resolve(local, req["KeyId"], aliases=False)
    state = key_state(local, doc)
    if state in refuse:
        raise invalid_state(f"{local.key_arn(doc['id'])} is {'pending deletion' if state == 'PendingDeletion' else 'pending import'}.")
    return doc


async def enable_key(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _change(local, req, ("PendingDeletion", "PendingImport"))
    doc["enabled"] = True
    local.state.put("key", doc["id"], doc)
    return {}


async def disable_key(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _change(local, req, ("PendingDeletion", "PendingImport"))
    doc["enabled"] = False
    local.state.put("key", doc["id"], doc)
    return {}


async def schedule_key_deletion(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    days = req.get("PendingWindowInDays", 30)
    if not 7 <= days <= 30:
        raise validation(f"PendingWindowInDays must be between 7 and 30, not {days}")
    doc = _change(local, req, ("PendingDeletion",))
    doc["deletion_date"] = round(now() + days * DAY, 3)
    doc["pending_window"] = days
    local.state.put("key", doc["id"], doc)
    return {"KeyId": local.key_arn(doc["id"]), "DeletionDate": doc["deletion_date"], "KeyState": "PendingDeletion", "PendingWindowInDays": days}


async def cancel_key_deletion(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = resolve(local, req["KeyId"], aliases=False)
    if not doc.get("deletion_date"):
        raise invalid_state(f"{local.key_arn(doc['id'])} is not pending deletion.")
    doc["deletion_date"] = None
    doc["enabled"] = False  # as KMS: a key whose deletion is cancelled is Disabled
    local.state.put("key", doc["id"], doc)
    return {"KeyId": local.key_arn(doc["id"])}
