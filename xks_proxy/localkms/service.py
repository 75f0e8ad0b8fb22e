"""The local KMS's HTTP side: KMS's JSON 1.1 wire protocol, SigV4 authentication, dispatch.

A request is `POST /` with `X-Amz-Target: TrentService.<Operation>` and a JSON body, signed with
SigV4 for service `kms` by a principal's access key (`principals`). Failures are answered as KMS
answers them, so SDKs raise the exception class they know: an unknown access key is
UnrecognizedClientException, a signature that does not verify InvalidSignatureException, an
operation KMS does not have UnknownOperationException, a body the model refuses
ValidationException (`model`). Blobs travel base64 and timestamps as epoch seconds.

One log line per request names the operation, the principal, the outcome and the request id:
never a body, a plaintext, a key or a secret.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any, Awaitable, Callable

from aiohttp import web

from xks_proxy import sigv4
from xks_proxy.errors import AuthenticationFailedException
from xks_proxy.localkms import aliases, cryptoops, imports, keys, model, principals, stores
from xks_proxy.localkms.context import Caller, Local
from xks_proxy.localkms.errors import KmsApiError, unsupported
from xks_proxy.localkms.xks import KmsError

log = logging.getLogger("xks_proxy.localkms")

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_BODY = 1024 * 1024
#: The header a caller may set to have kmsViaService passed on to the proxy (KMS sets it for AWS services).
VIA_SERVICE_HEADER = "x-local-kms-via-service"

Operation = Callable[[Local, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]

OPERATIONS: dict[str, Operation] = {
    "CreateKey": keys.create_key,
    "DescribeKey": keys.describe_key,
    "ListKeys": keys.list_keys,
    "EnableKey": keys.enable_key,
    "DisableKey": keys.disable_key,
    "ScheduleKeyDeletion": keys.schedule_key_deletion,
    "CancelKeyDeletion": keys.cancel_key_deletion,
    "CreateAlias": aliases.create_alias,
    "UpdateAlias": aliases.update_alias,
    "DeleteAlias": aliases.delete_alias,
    "ListAliases": aliases.list_aliases,
    "GetParametersForImport": imports.get_parameters_for_import,
    "ImportKeyMaterial": imports.import_key_material,
    "DeleteImportedKeyMaterial": imports.delete_imported_key_material,
    "Encrypt": cryptoops.encrypt,
    "Decrypt": cryptoops.decrypt,
    "GenerateDataKey": cryptoops.generate_data_key,
    "GenerateDataKeyWithoutPlaintext": cryptoops.generate_data_key_without_plaintext,
    "ReEncrypt": cryptoops.re_encrypt,
    "CreateCustomKeyStore": stores.create_custom_key_store,
    "DescribeCustomKeyStores": stores.describe_custom_key_stores,
    "ConnectCustomKeyStore": stores.connect_custom_key_store,
    "DisconnectCustomKeyStore": stores.disconnect_custom_key_store,
    "UpdateCustomKeyStore": stores.update_custom_key_store,
    "DeleteCustomKeyStore": stores.delete_custom_key_store,
}

_BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def authenticate(local: Local, request: web.Request, body: bytes, request_id: str) -> Caller:
    """The principal who signed the request, or the KMS exception its SDK expects."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    header = request.headers.get("Authorization")
    if not header:
        raise KmsApiError("MissingAuthenticationTokenException", "Missing Authentication Token")
    try:
        auth = sigv4.parse_authorization(header)
    except AuthenticationFailedException as exc:
        raise KmsApiError("IncompleteSignatureException", exc.message) from None
    arn = principals.arn_of(local, auth.access_key_id)
    if arn is None or "x-amz-security-token" in headers:
        raise KmsApiError("UnrecognizedClientException", "The security token included in the request is invalid.")
    try:
        sigv4.verify(
            method=request.method, path=request.raw_path.split("?", 1)[0], query=list(request.query.items()), headers=headers,
            body=body, lookup_secret=lambda akid: principals.secret_for(local, akid), regions=frozenset({local.region}), service="kms",
        )
    except AuthenticationFailedException as exc:
        detail = exc.message if "signature does not match" not in exc.message else _BAD_SIGNATURE
        raise KmsApiError("InvalidSignatureException", detail) from None
    return Caller(auth.access_key_id, arn, request_id, request.headers.get(VIA_SERVICE_HEADER))


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _answer(status: int, doc: dict[str, Any], request_id: str, error: str | None = None) -> web.Response:
    headers = {"x-amzn-RequestId": request_id}
    if error:
        headers["x-amzn-ErrorType"] = error
    return web.Response(status=status, body=json.dumps(doc, default=_json_default).encode(), content_type=CONTENT_TYPE, headers=headers)


async def _dispatch(local: Local, request: web.Request, request_id: str, seen: dict[str, str]) -> dict[str, Any]:
    """The operation's answer; `seen` learns the operation and the caller as soon as they are known (for the log)."""
    body = await request.read()
    target = request.headers.get("X-Amz-Target", "")
    if request.method != "POST" or not target.startswith(TARGET_PREFIX):
        raise KmsApiError("UnknownOperationException", "")
    name = seen["op"] = target[len(TARGET_PREFIX):]
    caller = authenticate(local, request, body, request_id)
    seen["who"] = caller.arn
    operation = model.operation(name)
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise KmsApiError("SerializationException", "the request body is not valid JSON") from None
    handler = OPERATIONS.get(name)
    if handler is None:
        raise unsupported(f"{name} is not implemented by this local KMS")
    try:
        return await handler(local, caller, model.parse(operation, doc))
    except KmsError as exc:  # a proxy call failed: the exception KMS raises for it (xks_proxy.kms_outcomes)
        raise KmsApiError(exc.name, exc.message) from None


def app(local: Local) -> web.Application:
    """The aiohttp application; its cleanup closes the XKS clients and the state database."""

    async def handle(request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        seen = {"op": "-", "who": "-"}
        try:
            result = await _dispatch(local, request, request_id, seen)
        except KmsApiError as exc:
            log.info("%s by %s: %s (request %s)", seen["op"], seen["who"], exc.name, request_id)
            return _answer(exc.status, exc.body(), request_id, exc.name)
        except Exception:  # a bug: answer as KMS does, keep the traceback for the operator
            log.exception("%s by %s failed (request %s)", seen["op"], seen["who"], request_id)
            failure = KmsApiError("KMSInternalException", "internal error")
            return _answer(failure.status, failure.body(), request_id, failure.name)
        log.info("%s by %s: OK (request %s)", seen["op"], seen["who"], request_id)
        return _answer(200, result, request_id)

    async def cleanup(_: web.Application) -> None:
        for store_id in list(local.clients):
            await stores.drop_client(local, store_id)
        local.state.close()

    application = web.Application(client_max_size=MAX_BODY)
    application.router.add_route("*", "/{tail:.*}", handle)
    application.on_cleanup.append(cleanup)
    return application


async def run(local: Local, host: str, port: int, ssl_context: Any, ready: Callable[[], None]) -> None:
    """Serve until SIGINT or SIGTERM; `ready` is called once the port accepts connections."""
    import asyncio
    import signal

    runner = web.AppRunner(app(local), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        ready()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
