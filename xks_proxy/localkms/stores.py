"""External key stores (custom key stores of type EXTERNAL_KEY_STORE): their CRUD and connection state.

KMS's rules, kept here: a store is created DISCONNECTED after a GetHealthStatus its proxy must
answer (kmsOperation CreateCustomKeyStore); Connect asks again (ConnectCustomKeyStore) and ends
CONNECTED or FAILED with a ConnectionErrorCode; a FAILED store must be disconnected before it is
connected again; endpoint, path and connectivity change only while DISCONNECTED, the name and
the credential at any time (a credential changed while CONNECTED is tried first: the
UpdateCustomKeyStore health call); a store is deleted only DISCONNECTED and without KMS keys.
Connect answers once the state is final (KMS answers at once and is CONNECTING a while; a client
polling DescribeCustomKeyStores sees the same end).

Every call to the proxy goes through `xks.XksClient` (one per store, dropped when its endpoint or
credential changes), which signs, times out and maps answers exactly as KMS does.
"""

from __future__ import annotations

import functools
import secrets
from typing import Any, Awaitable, Callable

from xks_proxy.localkms.context import Caller, Local, now, page
from xks_proxy.localkms.errors import KmsApiError, unsupported, validation
from xks_proxy.localkms.xks import KmsError, RequestMeta, XksClient, XksEndpoint

XKS = "EXTERNAL_KEY_STORE"


def _secret_context(store_id: str) -> str:
    return f"store {store_id} credential secret"


def connection_state(local: Local, store_id: str) -> str:
    doc = local.state.get("store", store_id)
    return doc["state"] if doc else "DISCONNECTED"


def _find(local: Local, store_id: str) -> dict[str, Any]:
    doc = local.state.get("store", store_id)
    if doc is None:
        raise KmsApiError("CustomKeyStoreNotFoundException", f"Custom key store '{store_id}' does not exist")
    return doc


def _invalid_state(message: str) -> KmsApiError:
    return KmsApiError("CustomKeyStoreInvalidStateException", message)


def _endpoint(local: Local, doc: dict[str, Any], secret: str | None = None) -> XksEndpoint:
    secret = secret if secret is not None else local.unseal(doc["secret"], _secret_context(doc["id"])).decode()
    return XksEndpoint(doc["endpoint"], doc["path"], doc["access_key_id"], secret, local.region, local.ca_bundle)


def client(local: Local, doc: dict[str, Any]) -> XksClient:
    """The store's XKS client, made on first use with its current endpoint and credential."""
    found = local.clients.get(doc["id"])
    if found is None:
        found = local.clients[doc["id"]] = XksClient(_endpoint(local, doc))
    return found


async def drop_client(local: Local, store_id: str) -> None:
    old = local.clients.pop(store_id, None)
    if old is not None:
        await old.close()


def meta(local: Local, caller: Caller, operation: str, key_arn: str | None = None) -> RequestMeta:
    """requestMetadata as KMS fills it: only fields KMS would send."""
    return RequestMeta(caller.arn, operation, caller.request_id, key_arn, caller.via_service)


async def _health(local: Local, caller: Caller, endpoint: XksEndpoint, operation: str) -> None:
    """A one-off GetHealthStatus with `endpoint` (a store being created or given a new credential)."""
    probe = XksClient(endpoint)
    try:
        await probe.health(meta(local, caller, operation), operation)
    finally:
        await probe.close()


def _unique(local: Local, store_id: str | None, name: str | None, endpoint: str | None, path: str | None) -> None:
    for other in local.state.all("store"):
        if other["id"] == store_id:
            continue
        if name is not None and other["name"] == name:
            raise KmsApiError("CustomKeyStoreNameInUseException", f"Custom key store name '{name}' is already in use")
        if endpoint is not None and (other["endpoint"], other["path"]) == (endpoint, path):
            raise KmsApiError("XksProxyUriInUseException", "this XKS proxy endpoint and path are used by another external key store")


def _check_connectivity(req: dict[str, Any]) -> None:
    if req.get("XksProxyConnectivity", "PUBLIC_ENDPOINT") != "PUBLIC_ENDPOINT" or req.get("XksProxyVpcEndpointServiceName"):
        raise unsupported("VPC endpoint service connectivity is not supported by this local KMS; use PUBLIC_ENDPOINT")


_Handler = Callable[[Local, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]


def _one_at_a_time(handler: _Handler) -> _Handler:
    """A store's changes and the proxy calls they make never interleave with another on that store."""

    @functools.wraps(handler)
    async def locked(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        async with local.lock(req["CustomKeyStoreId"]):
            return await handler(local, caller, req)

    return locked


async def create_custom_key_store(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    if req.get("CustomKeyStoreType", "AWS_CLOUDHSM") != XKS:
        raise unsupported("AWS CloudHSM key stores are not supported by this local KMS; use CustomKeyStoreType EXTERNAL_KEY_STORE")
    missing = [n for n in ("XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyAuthenticationCredential", "XksProxyConnectivity") if n not in req]
    if missing:
        raise validation(f"an external key store requires {', '.join(missing)}")
    _check_connectivity(req)
    _unique(local, None, req["CustomKeyStoreName"], req["XksProxyUriEndpoint"], req["XksProxyUriPath"])
    credential = req["XksProxyAuthenticationCredential"]
    store_id = "cks-" + secrets.token_hex(9)[:17]
    doc: dict[str, Any] = {
        "id": store_id, "name": req["CustomKeyStoreName"], "created": now(), "endpoint": req["XksProxyUriEndpoint"],
        "path": req["XksProxyUriPath"], "connectivity": "PUBLIC_ENDPOINT", "access_key_id": credential["AccessKeyId"],
        "state": "DISCONNECTED", "error_code": None,
    }
    await _health(local, caller, _endpoint(local, doc, credential["RawSecretAccessKey"]), "CreateCustomKeyStore")
    doc["secret"] = local.seal(credential["RawSecretAccessKey"].encode(), _secret_context(store_id))
    local.state.insert("store", store_id, doc, doc["created"])
    return {"CustomKeyStoreId": store_id}


def _describe(doc: dict[str, Any]) -> dict[str, Any]:
    out = {
        "CustomKeyStoreId": doc["id"], "CustomKeyStoreName": doc["name"], "ConnectionState": doc["state"],
        "CreationDate": doc["created"], "CustomKeyStoreType": XKS,
        "XksProxyConfiguration": {
            "Connectivity": doc["connectivity"], "AccessKeyId": doc["access_key_id"], "UriEndpoint": doc["endpoint"], "UriPath": doc["path"],
        },
    }
    if doc["state"] == "FAILED" and doc.get("error_code"):
        out["ConnectionErrorCode"] = doc["error_code"]
    return out


async def describe_custom_key_stores(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    found = list(local.state.all("store"))
    if "CustomKeyStoreId" in req:
        found = [_find(local, req["CustomKeyStoreId"])]
    elif "CustomKeyStoreName" in req:
        found = [d for d in found if d["name"] == req["CustomKeyStoreName"]]
        if not found:
            raise KmsApiError("CustomKeyStoreNotFoundException", f"Custom key store name '{req['CustomKeyStoreName']}' does not exist")
    shown, more = page(found, req.get("Limit"), req.get("Marker"))
    return {"CustomKeyStores": [_describe(d) for d in shown], **more}


@_one_at_a_time
async def connect_custom_key_store(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _find(local, req["CustomKeyStoreId"])
    if doc["state"] == "CONNECTED":
        return {}
    if doc["state"] == "FAILED":
        raise _invalid_state(f"Custom key store '{doc['id']}' is FAILED: disconnect it before connecting it again")
    try:
        await client(local, doc).health(meta(local, caller, "ConnectCustomKeyStore"), "ConnectCustomKeyStore")
        doc.update(state="CONNECTED", error_code=None)
    except KmsError as exc:
        doc.update(state="FAILED", error_code=exc.connection_error_code or "INTERNAL_ERROR")
        await drop_client(local, doc["id"])
    local.state.put("store", doc["id"], doc)
    return {}


@_one_at_a_time
async def disconnect_custom_key_store(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _find(local, req["CustomKeyStoreId"])
    doc.update(state="DISCONNECTED", error_code=None)
    local.state.put("store", doc["id"], doc)
    await drop_client(local, doc["id"])
    return {}


@_one_at_a_time
async def update_custom_key_store(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _find(local, req["CustomKeyStoreId"])
    if any(n in req for n in ("KeyStorePassword", "CloudHsmClusterId")):
        raise validation("KeyStorePassword and CloudHsmClusterId apply to AWS CloudHSM key stores only")
    moving = [n for n in ("XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyConnectivity", "XksProxyVpcEndpointServiceName") if n in req]
    if moving and doc["state"] != "DISCONNECTED":
        raise _invalid_state(f"Custom key store '{doc['id']}' must be disconnected to change {', '.join(moving)}")
    _check_connectivity(req)
    endpoint, path = req.get("XksProxyUriEndpoint", doc["endpoint"]), req.get("XksProxyUriPath", doc["path"])
    _unique(local, doc["id"], req.get("NewCustomKeyStoreName"), endpoint, path)
    new = dict(doc, name=req.get("NewCustomKeyStoreName", doc["name"]), endpoint=endpoint, path=path)
    credential = req.get("XksProxyAuthenticationCredential")
    if credential:
        new["access_key_id"] = credential["AccessKeyId"]
        if doc["state"] == "CONNECTED":
            await _health(local, caller, _endpoint(local, new, credential["RawSecretAccessKey"]), "UpdateCustomKeyStore")
        new["secret"] = local.seal(credential["RawSecretAccessKey"].encode(), _secret_context(doc["id"]))
    local.state.put("store", doc["id"], new)
    await drop_client(local, doc["id"])
    return {}


@_one_at_a_time
async def delete_custom_key_store(local: Local, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
    doc = _find(local, req["CustomKeyStoreId"])
    if doc["state"] != "DISCONNECTED":
        raise _invalid_state(f"Custom key store '{doc['id']}' must be disconnected before it is deleted")
    if any(k.get("store_id") == doc["id"] for k in local.state.all("key")):
        raise KmsApiError("CustomKeyStoreHasCMKsException", f"Custom key store '{doc['id']}' still has KMS keys; delete them first")
    local.state.delete("store", doc["id"])
    await drop_client(local, doc["id"])
    return {}


async def check_xks_key(local: Local, caller: Caller, store_id: str, xks_key_id: str, key_arn: str) -> None:
    """CreateKey's checks of an external key: a CONNECTED store, a key not in use, GetKeyMetadata as KMS reads it."""
    doc = _find(local, store_id)
    if doc["state"] != "CONNECTED":
        raise _invalid_state(f"Custom key store '{store_id}' is not connected (its ConnectionState is {doc['state']})")
    if any(k.get("store_id") == store_id and k.get("xks_key_id") == xks_key_id for k in local.state.all("key")):
        raise KmsApiError("XksKeyAlreadyInUseException", f"External key '{xks_key_id}' is already used by a KMS key in this key store")
    found = await client(local, doc).key_metadata(xks_key_id, meta(local, caller, "CreateKey", key_arn))
    usage = found.get("keyUsage") or []
    if found.get("keySpec") != "AES_256" or "ENCRYPT" not in usage or "DECRYPT" not in usage or found.get("keyStatus") != "ENABLED":
        raise KmsApiError(
            "XksKeyInvalidConfigurationException",
            f"External key '{xks_key_id}' must be an ENABLED AES_256 key whose usage includes ENCRYPT and DECRYPT",
        )
