"""The local KMS's XKS client against our real proxy and against small misbehaving proxies.

The client must meet a proxy exactly as KMS does: the requestMetadata fields KMS sends for each
operation and no others, 250 ms per attempt and one retry only where KMS retries, strict reading
of every answer, TLS verified, and each failure raised as the exception a KMS caller gets, from
the one table the conformance tester uses too (checked here against botocore's KMS model).
Attempts are counted by the servers; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import botocore.session
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from keymanager.crypto import cdiv
from tests.conftest import Home
from tests.support.certs import CA
from xks_proxy import kms_outcomes, sigv4
from xks_proxy.localkms.xks import KmsError, RequestMeta, XksCiphertext, XksClient, XksEndpoint

REGION = "us-east-1"
AKID = "LOCALKMSTESTKEY2345672"
SECRET = "l0calKmsTestSecretThatIsLongEnoughForTheSpec/+AbCdEfGhIjKlMnOp"
URI_PATH = "/fake/kms/xks/v1"
PRINCIPAL = "arn:aws:iam::111122223333:role/app"
KEY_ARN = f"arn:aws:kms:{REGION}:111122223333:key/{uuid.uuid4()}"
SLOW = 1.5  # seconds a slow answer takes: far past the 250 ms budget


def meta(operation: str = "Encrypt", via: str | None = None, key_arn: str | None = KEY_ARN) -> RequestMeta:
    return RequestMeta(aws_principal_arn=PRINCIPAL, kms_operation=operation, kms_request_id=str(uuid.uuid4()),
                       kms_key_arn=key_arn, kms_via_service=via)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the outcome table speaks KMS's language ---------------------------------------------------------


def test_every_name_in_the_table_is_one_kms_raises() -> None:
    model = botocore.session.get_session().get_service_model("kms")
    all_errors = {shape.name for shape in model.error_shapes}
    for operation, names in kms_outcomes.exception_names().items():
        assert names <= all_errors, f"not KMS exceptions: {names - all_errors}"
        raised_by = {shape.name for shape in model.operation_model(operation).error_shapes}
        assert names <= raised_by, f"{operation} never raises {names - raised_by}"
    codes = set(model.shape_for("ConnectionErrorCodeType").enum)
    assert kms_outcomes.connection_codes() <= codes


def test_table_answers_for_the_local_kms() -> None:
    crypto = kms_outcomes.crypto_exception
    assert crypto("InvalidStateException", "Encrypt") == "KMSInvalidStateException"
    assert crypto("KeyNotFoundException", "Decrypt") == "KMSInvalidStateException"
    assert crypto("InvalidCiphertextException", "Decrypt") == "InvalidCiphertextException"
    assert crypto("InvalidCiphertextException", "Encrypt") == "KMSInvalidStateException"
    assert crypto(kms_outcomes.TIMEOUT, "Encrypt") == "DependencyTimeoutException"
    assert crypto(kms_outcomes.UNREACHABLE, "Encrypt") == "KMSInvalidStateException"
    assert kms_outcomes.create_store_exception(kms_outcomes.UNREACHABLE) == "XksProxyUriUnreachableException"
    assert kms_outcomes.retried(kms_outcomes.TIMEOUT) and kms_outcomes.retried("ThrottlingException")
    assert not kms_outcomes.retried(kms_outcomes.TLS) and not kms_outcomes.retried("ValidationException")


# --- against our real proxy --------------------------------------------------------------------------


def endpoint_for(server: TestServer, home: Home, *, secret: str | None = None, prefix: str | None = None) -> XksEndpoint:
    return XksEndpoint(uri_endpoint=str(server.make_url("")).rstrip("/"),
                       uri_path=f"/{home.prefix if prefix is None else prefix}/kms/xks/v1",
                       access_key_id=home.access_key_id, secret=secret or home.secret, region=REGION)


@asynccontextmanager
async def real_client(server: TestServer, home: Home, **kw: Any) -> AsyncIterator[XksClient]:
    # A loaded test machine must not fail these for slowness: the 250 ms budget is tested below.
    client = XksClient(endpoint_for(server, home, **kw), timeout=5.0)
    try:
        yield client
    finally:
        await client.close()


async def test_real_proxy_round_trip(server: TestServer, home: Home) -> None:
    async with real_client(server, home) as client:
        for operation in kms_outcomes.HEALTH_OPERATIONS:
            await client.health(meta(operation), operation)
        described = await client.key_metadata("foo", meta("CreateKey"))
        assert described["keySpec"] == "AES_256" and described["keyStatus"] == "ENABLED"
        for aad in (None, b"", b"purpose=test"):
            plaintext = os.urandom(48)
            sealed = await client.encrypt("foo", plaintext, aad, meta("GenerateDataKey"))
            assert len(sealed.ciphertext) == 48 and len(sealed.tag) == 16
            assert await client.decrypt("foo", sealed, aad, meta("Decrypt")) == plaintext
        with pytest.raises(KmsError) as caught:
            await client.decrypt("foo", sealed, b"purpose=other", meta("Decrypt"))
        assert caught.value.name == "InvalidCiphertextException"
        with pytest.raises(KmsError) as caught:
            await client.key_metadata("no-such-key", meta("CreateKey"))
        assert caught.value.name == "XksKeyNotFoundException"
        with pytest.raises(KmsError) as caught:
            await client.encrypt("no-such-key", b"x" * 32, None, meta())
        assert caught.value.name == "KMSInvalidStateException"


@pytest.mark.vault_only
async def test_real_proxy_disabled_key(server: TestServer, home: Home) -> None:
    async with real_client(server, home) as client:
        sealed = await client.encrypt("foo", b"k" * 32, None, meta())
        home.set_state("foo", "DISABLED")
        failure = None
        for _ in range(40):  # the running proxy picks it up within its refresh interval
            try:
                await client.key_metadata("foo", meta("CreateKey"))
            except KmsError as refused:
                failure = refused
                break
            await asyncio.sleep(0.1)
        assert failure is not None, "the key never showed as DISABLED"
        assert (failure.name, failure.kind) == ("XksKeyInvalidConfigurationException", kms_outcomes.KEY_CONFIG)
        assert "DISABLED" in failure.message
        for call in (client.encrypt("foo", b"k" * 32, None, meta()), client.decrypt("foo", sealed, None, meta("Decrypt"))):
            with pytest.raises(KmsError) as caught:
                await call
            assert (caught.value.name, caught.value.kind) == ("KMSInvalidStateException", "InvalidStateException")


@pytest.mark.vault_only
async def test_real_proxy_wrong_credential_and_path(server: TestServer, home: Home) -> None:
    async with real_client(server, home, secret="W" * 43) as client:
        with pytest.raises(KmsError) as caught:
            await client.health(meta("ConnectCustomKeyStore"), "ConnectCustomKeyStore")
        assert caught.value.connection_error_code == "INVALID_CREDENTIALS"
        assert caught.value.name == "XksProxyIncorrectAuthenticationCredentialException"
        with pytest.raises(KmsError) as caught:
            await client.encrypt("foo", b"x", None, meta())
        assert caught.value.name == "KMSInvalidStateException"
    async with real_client(server, home, prefix="elsewhere") as client:
        with pytest.raises(KmsError) as caught:
            await client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore")
        assert caught.value.connection_error_code == "XKS_PROXY_INVALID_CONFIGURATION"
        assert caught.value.name == "XksProxyInvalidConfigurationException"


# --- small misbehaving proxies -------------------------------------------------------------------------

Handler = Callable[["Fake", str, dict[str, Any], int], Awaitable[web.Response]]


@dataclass
class Fake:
    """A proxy that checks KMS's signature, records what came, and answers as `handler` says."""

    handler: Handler
    attempts: dict[str, int] = field(default_factory=dict)
    metadata: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    drop_first: bool = False  # close the connection on each operation's first attempt, answering nothing

    async def serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        operation = request.path.rsplit("/", 1)[-1]
        self.attempts[operation] = self.attempts.get(operation, 0) + 1
        headers = {name.lower(): request.headers.getall(name) for name in request.headers.keys()}
        sigv4.verify(method=request.method, path=request.raw_path, query=(), headers=headers, body=raw,
                     lookup_secret={AKID: SECRET}.get, regions=frozenset({REGION}))
        assert request.method == "POST" and request.content_type == "application/json"
        body = json.loads(raw)
        self.bodies.append(body)
        self.metadata.append((operation, body["requestMetadata"]))
        if self.drop_first and self.attempts[operation] == 1 and request.transport is not None:
            request.transport.close()
        return await self.handler(self, operation, body, self.attempts[operation])

    async def slowly(self) -> None:
        """Take far longer than KMS waits (until the test ends)."""
        try:
            await asyncio.wait_for(self.stop.wait(), SLOW)
        except asyncio.TimeoutError:
            pass


def health_ok() -> web.Response:
    return web.json_response({"xksProxyFleetSize": 1, "xksProxyVendor": "fake", "xksProxyModel": "fake",
                              "ekmVendor": "fake", "ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "ACTIVE"}]})


def sealed_answer(body: dict[str, Any], *, tag_len: int = 16, bad_cdiv: bool = False) -> web.Response:
    """A well-formed Encrypt answer (random bytes: the client cannot check the tag, only the shape and CDIV)."""
    plaintext = base64.b64decode(body["plaintext"])
    aad = base64.b64decode(body["additionalAuthenticatedData"]) if "additionalAuthenticatedData" in body else None
    ciphertext, iv, tag, metadata = os.urandom(len(plaintext)), os.urandom(12), os.urandom(tag_len), b"v1"
    value = cdiv(None if bad_cdiv else aad, metadata, iv, ciphertext, tag)
    return web.json_response({"ciphertext": b64(ciphertext), "initializationVector": b64(iv), "authenticationTag": b64(tag),
                              "ciphertextMetadata": b64(metadata), "ciphertextDataIntegrityValue": b64(value)})


async def well_behaved(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
    if operation == "health":
        return health_ok()
    if operation == "metadata":
        return web.json_response({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
    if operation == "encrypt":
        return sealed_answer(body)
    return web.json_response({"plaintext": body["ciphertext"]})


def error(name: str, status: int) -> web.Response:
    return web.json_response({"errorName": name, "errorMessage": "fake"}, status=status)


@asynccontextmanager
async def fake_proxy(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Fake, str]]:
    fake = Fake(handler)
    app = web.Application()
    app.router.add_post(URI_PATH + "/{tail:.*}", fake.serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        fake.stop.set()
        await runner.cleanup()


@asynccontextmanager
async def client_of(url: str, ca_bundle: str | None = None) -> AsyncIterator[XksClient]:
    client = XksClient(XksEndpoint(url, URI_PATH, AKID, SECRET, REGION, ca_bundle))  # KMS's 250 ms, one retry
    try:
        yield client
    finally:
        await client.close()


async def raised(call: Awaitable[Any]) -> KmsError:
    with pytest.raises(KmsError) as caught:
        await call
    return caught.value


async def test_request_metadata_is_exactly_what_kms_sends() -> None:
    async with fake_proxy(well_behaved) as (fake, url), client_of(url) as client:
        await client.health(meta("KmsHealthCheck"), "KmsHealthCheck")
        await client.key_metadata("k1", meta("CreateKey", key_arn=None))
        await client.key_metadata("k1", meta("CreateKey"))
        sealed = await client.encrypt("k1", b"p" * 32, b"aad", meta("Encrypt"))
        await client.decrypt("k1", sealed, b"aad", meta("Decrypt", via="s3.us-east-1.amazonaws.com"))
    base = {"kmsRequestId", "kmsOperation"}
    key = base | {"awsPrincipalArn"}
    assert [(op, set(m)) for op, m in fake.metadata] == [
        ("health", base), ("metadata", key), ("metadata", key | {"kmsKeyArn"}), ("encrypt", key | {"kmsKeyArn"}),
        ("decrypt", key | {"kmsKeyArn", "kmsViaService"})]
    assert [m["kmsOperation"] for _, m in fake.metadata] == ["KmsHealthCheck", "CreateKey", "CreateKey", "Encrypt", "Decrypt"]
    assert fake.metadata[4][1]["kmsViaService"] == "s3.us-east-1.amazonaws.com"
    assert fake.metadata[3][1]["awsPrincipalArn"] == PRINCIPAL and fake.metadata[3][1]["kmsKeyArn"] == KEY_ARN
    encrypt, decrypt = fake.bodies[3], fake.bodies[4]
    assert encrypt["encryptionAlgorithm"] == "AES_GCM" and encrypt["ciphertextDataIntegrityValueAlgorithm"] == "SHA_256"
    assert decrypt["ciphertextMetadata"] == b64(b"v1") and decrypt["additionalAuthenticatedData"] == b64(b"aad")
    assert set(fake.attempts.values()) == {1, 2} and fake.attempts["metadata"] == 2  # one per call, no retries


async def test_a_slow_first_answer_is_retried_once() -> None:
    async def slow_once(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        if attempt == 1:
            await fake.slowly()
        return await well_behaved(fake, operation, body, attempt)

    async with fake_proxy(slow_once) as (fake, url), client_of(url) as client:
        sealed = await client.encrypt("k1", b"p" * 16, None, meta())
        assert isinstance(sealed, XksCiphertext)
        await client.health(meta("ConnectCustomKeyStore"), "ConnectCustomKeyStore")
    assert fake.attempts == {"encrypt": 2, "health": 2}


async def test_always_slow_is_a_timeout_after_exactly_two_attempts() -> None:
    async def slow(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        await fake.slowly()
        return await well_behaved(fake, operation, body, attempt)

    async with fake_proxy(slow) as (fake, url), client_of(url) as client:
        failure = await raised(client.encrypt("k1", b"p" * 16, None, meta()))
        assert (failure.name, failure.kind) == ("DependencyTimeoutException", kms_outcomes.TIMEOUT)
        failure = await raised(client.key_metadata("k1", meta("CreateKey")))
        assert failure.name == "DependencyTimeoutException"
        failure = await raised(client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore"))
        assert (failure.name, failure.connection_error_code) == ("XksProxyUriUnreachableException", "XKS_PROXY_TIMED_OUT")
    assert fake.attempts == {"encrypt": 2, "metadata": 2, "health": 2}


@pytest.mark.parametrize(("name", "status", "attempts", "exception", "code"), [
    ("InternalException", 500, 2, "KMSInternalException", "XKS_PROXY_NOT_REACHABLE"),
    ("ThrottlingException", 429, 2, "KMSInternalException", "XKS_PROXY_NOT_REACHABLE"),
    ("DependencyTimeoutException", 503, 2, "DependencyTimeoutException", "XKS_PROXY_NOT_REACHABLE"),
    ("ValidationException", 400, 1, "KMSInvalidStateException", "XKS_PROXY_INVALID_RESPONSE"),
    ("AccessDeniedException", 403, 1, "KMSInvalidStateException", "XKS_PROXY_ACCESS_DENIED"),
])
async def test_only_what_kms_retries_is_retried(name: str, status: int, attempts: int, exception: str, code: str) -> None:
    async def refuse(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        return error(name, status)

    async with fake_proxy(refuse) as (fake, url), client_of(url) as client:
        assert (await raised(client.encrypt("k1", b"p" * 16, None, meta()))).name == exception
        assert (await raised(client.health(meta("ConnectCustomKeyStore"), "ConnectCustomKeyStore"))).connection_error_code == code
    assert fake.attempts == {"encrypt": attempts, "health": attempts}


async def test_a_retry_that_succeeds_is_a_success() -> None:
    async def throttled_once(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        return error("ThrottlingException", 429) if attempt == 1 else await well_behaved(fake, operation, body, attempt)

    async with fake_proxy(throttled_once) as (fake, url), client_of(url) as client:
        await client.key_metadata("k1", meta("CreateKey"))
    assert fake.attempts == {"metadata": 2}


async def test_a_dropped_connection_is_a_network_error_and_retried() -> None:
    async with fake_proxy(well_behaved) as (fake, url), client_of(url) as client:
        fake.drop_first = True
        await client.encrypt("k1", b"p" * 16, None, meta())
    assert fake.attempts == {"encrypt": 2}


INVALID_ENCRYPT = {
    "not-json": lambda body: web.Response(body=b'{"ciphertext": ', content_type="application/json"),
    "short-tag": lambda body: sealed_answer(body, tag_len=15),
    "wrong-cdiv": lambda body: sealed_answer(body, bad_cdiv=True),
    "error-with-wrong-status": lambda body: error("KeyNotFoundException", 400),
}


@pytest.mark.parametrize("fault", sorted(INVALID_ENCRYPT))
async def test_a_malformed_encrypt_answer_is_an_invalid_response(fault: str) -> None:
    async def broken(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        return INVALID_ENCRYPT[fault](body) if operation == "encrypt" else await well_behaved(fake, operation, body, attempt)

    async with fake_proxy(broken) as (fake, url), client_of(url) as client:
        failure = await raised(client.encrypt("k1", b"p" * 32, b"aad", meta()))
    assert (failure.name, failure.kind) == ("KMSInvalidStateException", kms_outcomes.INVALID_RESPONSE)
    assert fake.attempts == {"encrypt": 1}


async def test_malformed_health_metadata_and_decrypt_answers() -> None:
    async def broken(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        if operation == "health":
            return web.json_response({"xksProxyFleetSize": 0})
        if operation == "metadata":
            return web.json_response({"keySpec": "AES_256", "keyUsage": "ENCRYPT", "keyStatus": "ENABLED"})
        return web.json_response({"plaintext": b64(b"too short")})

    async with fake_proxy(broken) as (fake, url), client_of(url) as client:
        failure = await raised(client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore"))
        assert (failure.name, failure.connection_error_code) == ("XksProxyInvalidResponseException", "XKS_PROXY_INVALID_RESPONSE")
        assert (await raised(client.key_metadata("k1", meta("CreateKey")))).kind == kms_outcomes.INVALID_RESPONSE
        sealed = XksCiphertext(b"c" * 32, b"i" * 12, b"t" * 16, None)
        failure = await raised(client.decrypt("k1", sealed, None, meta("Decrypt")))
        assert (failure.name, failure.kind) == ("KMSInvalidStateException", kms_outcomes.INVALID_RESPONSE)


@pytest.mark.parametrize(("answer", "why"), [
    ({"keySpec": "AES_128", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}, "AES_128"),
    ({"keySpec": "AES_256", "keyUsage": ["ENCRYPT"], "keyStatus": "ENABLED"}, "DECRYPT"),
    ({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "DISABLED"}, "DISABLED"),
])
async def test_create_key_refuses_an_unusable_key(answer: dict[str, Any], why: str) -> None:
    async def describe(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        return web.json_response(answer)

    async with fake_proxy(describe) as (_, url), client_of(url) as client:
        failure = await raised(client.key_metadata("k1", meta("CreateKey")))
    assert failure.name == "XksKeyInvalidConfigurationException" and why in failure.message


async def test_all_key_managers_unavailable_is_not_reachable() -> None:
    async def down(fake: Fake, operation: str, body: dict[str, Any], attempt: int) -> web.Response:
        return web.json_response({"xksProxyFleetSize": 1, "xksProxyVendor": "v", "xksProxyModel": "m", "ekmVendor": "e",
                                  "ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "UNAVAILABLE"}]})

    async with fake_proxy(down) as (_, url), client_of(url) as client:
        failure = await raised(client.health(meta("KmsHealthCheck"), "KmsHealthCheck"))
    assert (failure.name, failure.connection_error_code) == ("XksProxyUriUnreachableException", "XKS_PROXY_NOT_REACHABLE")


async def test_unreachable_proxy() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client_of(f"http://127.0.0.1:{port}") as client:
        failure = await raised(client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore"))
        assert (failure.name, failure.connection_error_code) == ("XksProxyUriUnreachableException", "XKS_PROXY_NOT_REACHABLE")
        failure = await raised(client.encrypt("k1", b"p", None, meta()))
        assert (failure.name, failure.kind) == ("KMSInvalidStateException", kms_outcomes.UNREACHABLE)


# --- TLS ---------------------------------------------------------------------------------------------


def server_tls(tmp_path: Path, ca: CA, **leaf: Any) -> ssl.SSLContext:
    cert, key = ca.leaf(client=False, **leaf).write(tmp_path, f"server-{uuid.uuid4().hex}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_tls_is_verified_as_kms_verifies_it(tmp_path: Path) -> None:
    trusted, stranger = CA("trusted"), CA("stranger")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(trusted.pem)
    async with fake_proxy(well_behaved, server_tls(tmp_path, trusted, ip=True)) as (fake, url):
        async with client_of(url, str(bundle)) as client:
            await client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore")
            await client.encrypt("k1", b"p" * 16, None, meta())
    assert fake.attempts == {"health": 1, "encrypt": 1}
    for name, ctx in (("untrusted", server_tls(tmp_path, stranger, ip=True)),
                      ("wrong name", server_tls(tmp_path, trusted, dns=("elsewhere.example",)))):
        async with fake_proxy(well_behaved, ctx) as (fake, url), client_of(url, str(bundle)) as client:
            failure = await raised(client.health(meta("CreateCustomKeyStore"), "CreateCustomKeyStore"))
            assert failure.connection_error_code == "XKS_PROXY_INVALID_TLS_CONFIGURATION", name
            assert failure.name == "XksProxyUriUnreachableException", name
            failure = await raised(client.decrypt("k1", XksCiphertext(b"c", b"i" * 12, b"t" * 16, None), None, meta("Decrypt")))
            assert (failure.name, failure.kind) == ("KMSInvalidStateException", kms_outcomes.TLS), name
        assert fake.attempts == {}, name  # refused in the handshake, never sent


def test_bad_arguments_are_refused_before_any_call() -> None:
    with pytest.raises(ValueError):
        XksClient(XksEndpoint("https://proxy.example/path", URI_PATH, AKID, SECRET, REGION))
    with pytest.raises(ValueError):
        XksClient(XksEndpoint("ftp://proxy.example", URI_PATH, AKID, SECRET, REGION))
    client = XksClient(XksEndpoint("https://proxy.example", URI_PATH, AKID, SECRET, REGION))
    with pytest.raises(ValueError):
        asyncio.run(client.encrypt("../../health", b"p", None, meta()))
    with pytest.raises(ValueError):
        asyncio.run(client.encrypt("k1", b"p", None, meta(key_arn=None)))
    with pytest.raises(ValueError):
        asyncio.run(client.health(meta(), "Encrypt"))
    assert SECRET not in repr(client.endpoint)
