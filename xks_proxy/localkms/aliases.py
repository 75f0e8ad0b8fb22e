"""Aliases: friendly names (`alias/...`) for KMS keys, usable wherever KMS accepts an alias as KeyId."""

from __future__ import annotations

from typing import Any

from xks_proxy.localkms import keys
from xks_proxy.localkms.context import Caller, Local, now, page
from xks_proxy.localkms.errors import KmsApiError, invalid_state, not_found


def _check_name(name: str) -> None:
    if not name.startswith("alias/") or len(name) <= len("alias/"):
        raise KmsApiError("InvalidAliasNameException", f"Alias must start with the prefix \"alias/\": {name[:256]}")
    if name.startswith("alias/aws/"):
        raise KmsApiError("InvalidAliasNameException", "Alias names beginning with alias/aws/ are reserved for AWS managed keys")


def _target(local: Local, ref: str) -> dict[str, Any]:
    doc = keys.resolve(local, ref, aliases=False)
    if keys.key_state(local, doc) == "PendingDeletion":
        raise invalid_state(f"{local.key_arn(doc['id'])} is pending deletion.")
    return doc


async def create_alias(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    name = req["AliasName"]
    _check_name(name)
    target = _target(local, req["TargetKeyId"])
    moment = now()
    if local.state.get("alias", name) is not None or not local.state.insert(
        "alias", name, {"name": name, "key_id": target["id"], "created": moment, "updated": moment}, moment
    ):
        raise KmsApiError("AlreadyExistsException", f"An alias with the name {local.alias_arn(name)} already exists")
    return {}


def _existing(local: Local, name: str) -> dict[str, Any]:
    doc = local.state.get("alias", name)
    if doc is None or keys.load(local, doc["key_id"]) is None:
        raise not_found(f"Alias {local.alias_arn(name)} is not found.")
    return doc


async def update_alias(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _existing(local, req["AliasName"])
    doc.update(key_id=_target(local, req["TargetKeyId"])["id"], updated=now())
    local.state.put("alias", doc["name"], doc)
    return {}


async def delete_alias(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    _existing(local, req["AliasName"])
    local.state.delete("alias", req["AliasName"])
    return {}


async def list_aliases(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    only = keys.resolve(local, req["KeyId"], aliases=False)["id"] if "KeyId" in req else None
    found = [a for a in list(local.state.all("alias")) if (only is None or a["key_id"] == only) and keys.load(local, a["key_id"])]
    shown, more = page(found, req.get("Limit"), req.get("Marker"))
    return {
        "Aliases": [
            {"AliasName": a["name"], "AliasArn": local.alias_arn(a["name"]), "TargetKeyId": a["key_id"],
             "CreationDate": a["created"], "LastUpdatedDate": a["updated"]}
            for a in shown
        ],
        **more,
    }
