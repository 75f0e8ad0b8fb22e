"""The XKS API through real HTTP with botocore-signed requests: operations, errors, limits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from typing import AsyncIterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymanager.crypto import cdiv
from tests.conftest import Client, Home, b64, metadata, unb64

SIZES = [0, 1, 16, 100, 4096, 4300]


async def test_health(client: Client) -> None:
    status, body = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert status == 200, body
    assert body["xksProxyFleetSize"] >= 1
    assert isinstance(body["xksProxyVendor"], str) and body["xksProxyVendor"]
    assert isinstance(body["xksProxyModel"], str) and body["xksProxyModel"]
    assert isinstance(body["ekmVendor"], str) and body["ekmVendor"]
    assert 1 <= len(body["ekmFleetDetails"]) <= 10
    assert body["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
    assert set(body["ekmFleetDetails"][0]) == {"id", "model", "healthStatus"}


@pytest.mark.parametrize("meta", [None, {}, {"kmsRequestId": "x"}, {"kmsOperation": "KmsHealthCheck"}, "str"])
async def test_health_needs_request_metadata(client: Client, meta: object) -> None:
    body = {} if meta is None else {"requestMetadata": meta}
    status, err = await client.call("health", **body)
    assert (status, err["errorName"]) == (400, "ValidationException")


@pytest.mark.vault_only
async def test_metadata(client: Client, home: Home) -> None:
    status, body = await client.call("metadata", "foo", requestMetadata=metadata("CreateKey"))
    assert status == 200
    assert body == {"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}
    home.set_state("foo", "DISABLED")
    await asyncio.sleep(0)  # the running server picks it up within refresh_seconds
    for _ in range(40):
        status, body = await client.call("metadata", "foo", requestMetadata=metadata("DescribeKey"))
        if body.get("keyStatus") == "DISABLED":
            break
        await asyncio.sleep(0.1)
    assert body["keyStatus"] == "DISABLED"


async def test_metadata_requires_principal(client: Client) -> None:
    meta = metadata("CreateKey")
    del meta["awsPrincipalArn"]
    status, err = await client.call("metadata", "foo", requestMetadata=meta)
    assert (status, err["errorName"]) == (400, "ValidationException")
    assert "awsPrincipalArn" in err["errorMessage"]


async def test_unknown_key(client: Client) -> None:
    status, err = await client.call("metadata", "nope", requestMetadata=metadata("CreateKey"))
    assert (status, err["errorName"]) == (404, "KeyNotFoundException")
    status, err = await client.encrypt("nope", b"x")
    assert (status, err["errorName"]) == (404, "KeyNotFoundException")


@pytest.mark.parametrize("size", SIZES)
async def test_roundtrip_sizes(client: Client, size: int) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    for aad in (None, b"", b"a" * 300, b"x" * 8192):
        status, enc = await client.encrypt("foo", plaintext, aad=aad)
        assert status == 200, enc
        assert len(unb64(enc["ciphertext"])) == len(plaintext)
        assert len(unb64(enc["initializationVector"])) == 12
        assert len(unb64(enc["authenticationTag"])) == 16
        assert len(unb64(enc["ciphertextMetadata"])) <= 20
        assert "ciphertextDataIntegrityValue" not in enc
        status, dec = await client.decrypt("foo", enc, aad=aad)
        assert status == 200, dec
        assert unb64(dec["plaintext"]) == plaintext


async def test_cdiv_is_returned_and_correct(client: Client) -> None:
    aad = b"project=nile"
    status, enc = await client.encrypt("foo", b"secret data", aad=aad, ciphertextDataIntegrityValueAlgorithm="SHA_256")
    assert status == 200, enc
    expected = hashlib.sha256(
        aad
        + unb64(enc["ciphertextMetadata"])
        + unb64(enc["initializationVector"])
        + unb64(enc["ciphertext"])
        + unb64(enc["authenticationTag"])
    ).digest()
    assert unb64(enc["ciphertextDataIntegrityValue"]) == expected


def test_cdiv_spec_vector() -> None:
    got = cdiv(
        b"project=nile,department=marketing",
        b"key_version=1",
        unb64("HMrlRw85cAJUd5Ax"),
        unb64("ghxkK1txeDNn3q8Y"),
        unb64("vBxN2ncH1oEkR8WVXpmyYQ=="),
    )
    assert b64(got) == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


async def test_ivs_are_unique(client: Client) -> None:
    results = await asyncio.gather(*(client.encrypt("foo", b"same") for _ in range(200)))
    ivs = {enc["initializationVector"] for status, enc in results if status == 200}
    assert len(ivs) == 200


def _material(home: Home, key_id: str, version: int = 1) -> bytes:
    """Read a key's raw material the way only a test may (see Home.material)."""
    return home.material(key_id, version)


def _independent_aad(aad: bytes | None, meta: bytes) -> bytes:
    """The AAD construction written out from the protocol notes, not from our module."""
    out = b""
    if aad is None:
        out += b"\x00\x00"
    else:
        out += struct.pack(">H", len(aad)) + hashlib.sha256(aad).digest()
    return out + struct.pack(">B", len(meta)) + meta


@pytest.mark.parametrize("aad", [None, b"", b"context=1"])
async def test_independent_ciphertext_decrypts(client: Client, home: Home, aad: bytes | None) -> None:
    """A ciphertext made with `cryptography` over the key's material decrypts through the proxy."""
    key = AESGCM(_material(home, "foo"))
    iv, meta = b"\x07" * 12, b"\x01\x00\x00\x00\x01"
    sealed = key.encrypt(iv, b"made elsewhere", _independent_aad(aad, meta))
    encrypted = {
        "ciphertext": b64(sealed[:-16]),
        "initializationVector": b64(iv),
        "authenticationTag": b64(sealed[-16:]),
        "ciphertextMetadata": b64(meta),
    }
    status, dec = await client.decrypt("foo", encrypted, aad=aad)
    assert status == 200, dec
    assert unb64(dec["plaintext"]) == b"made elsewhere"
    # And our ciphertexts open independently with the same construction.
    status, enc = await client.encrypt("foo", b"made here", aad=aad)
    plain = key.decrypt(
        unb64(enc["initializationVector"]),
        unb64(enc["ciphertext"]) + unb64(enc["authenticationTag"]),
        _independent_aad(aad, unb64(enc["ciphertextMetadata"])),
    )
    assert plain == b"made here"


async def test_shifted_aad_metadata_split_fails(client: Client, home: Home) -> None:
    """Moving bytes between AAD and metadata must not authenticate (the lengths are bound)."""
    key = AESGCM(_material(home, "foo"))
    iv = b"\x05" * 12
    # Naive concatenation would make ("ab", meta=M) and ("a", meta="b"+M) identical; ours must not.
    meta = b"\x01\x00\x00\x00\x01"
    sealed = key.encrypt(iv, b"payload", _independent_aad(b"ab", meta))
    shifted = {
        "ciphertext": b64(sealed[:-16]),
        "initializationVector": b64(iv),
        "authenticationTag": b64(sealed[-16:]),
        "ciphertextMetadata": b64(b"b" + meta),
    }
    status, err = await client.decrypt("foo", shifted, aad=b"a")
    assert (status, err["errorName"]) == (400, "InvalidCiphertextException")
    status, err = await client.decrypt("foo", shifted | {"ciphertextMetadata": b64(meta)}, aad=b"ab")
    assert status == 200


@pytest.mark.parametrize("field", ["ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata"])
async def test_tampering_is_detected(client: Client, field: str) -> None:
    status, enc = await client.encrypt("foo", b"attack at dawn", aad=b"ctx")
    raw = bytearray(unb64(enc[field]))
    raw[-1] ^= 0x01
    status, err = await client.decrypt("foo", enc | {field: b64(bytes(raw))}, aad=b"ctx")
    assert (status, err["errorName"]) == (400, "InvalidCiphertextException")


async def test_wrong_or_missing_aad_fails(client: Client) -> None:
    status, enc = await client.encrypt("foo", b"data", aad=b"ctx")
    for aad in (b"other", None, b""):
        status, err = await client.decrypt("foo", enc, aad=aad)
        assert (status, err["errorName"]) == (400, "InvalidCiphertextException")


async def test_empty_aad_differs_from_absent(client: Client) -> None:
    status, enc = await client.encrypt("foo", b"data", aad=b"")
    status, err = await client.decrypt("foo", enc, aad=None)
    assert err["errorName"] == "InvalidCiphertextException"


async def test_dropping_metadata_fails(client: Client) -> None:
    status, enc = await client.encrypt("foo", b"data")
    without = {k: v for k, v in enc.items() if k != "ciphertextMetadata"}
    status, err = await client.decrypt("foo", without)
    assert (status, err["errorName"]) == (400, "InvalidCiphertextException")


@pytest.mark.vault_only
async def test_rotation_keeps_old_ciphertexts(client: Client, home: Home) -> None:
    status, old = await client.encrypt("foo", b"old")
    db = home.vault()
    db.rotate(home.prefix, "foo")
    db.close()
    for _ in range(40):
        status, new = await client.encrypt("foo", b"new")
        if new["ciphertextMetadata"] != old["ciphertextMetadata"]:
            break
        await asyncio.sleep(0.1)
    assert unb64(new["ciphertextMetadata"]) == b"\x01\x00\x00\x00\x02"
    for enc, plain in ((old, b"old"), (new, b"new")):
        status, dec = await client.decrypt("foo", enc)
        assert unb64(dec["plaintext"]) == plain
    # Metadata naming the other version fails authentication (bound into the AAD and the key).
    status, err = await client.decrypt("foo", old | {"ciphertextMetadata": new["ciphertextMetadata"]})
    assert err["errorName"] == "InvalidCiphertextException"


@pytest.mark.vault_only
async def test_disabled_key_refuses_crypto(client: Client, home: Home) -> None:
    status, enc = await client.encrypt("foo", b"x")
    home.set_state("foo", "DISABLED")
    for _ in range(40):
        status, err = await client.encrypt("foo", b"x")
        if status != 200:
            break
        await asyncio.sleep(0.1)
    assert (status, err["errorName"]) == (400, "InvalidStateException")
    status, err = await client.decrypt("foo", enc)
    assert (status, err["errorName"]) == (400, "InvalidStateException")


@pytest.mark.parametrize(
    "usage,encrypt_ok,decrypt_ok",
    [("ENCRYPT", True, False), ("DECRYPT", False, True), ("", False, False), ("DECRYPT,ENCRYPT", True, True)],
)
async def test_key_usage(client: Client, home: Home, usage: str, encrypt_ok: bool, decrypt_ok: bool) -> None:
    home.create_key("limited", usage)
    await _wait_for_key(client, "limited")
    status, meta = await client.call("metadata", "limited", requestMetadata=metadata("CreateKey"))
    assert sorted(meta["keyUsage"]) == sorted(u for u in usage.split(",") if u)
    status, enc = await client.encrypt("limited", b"x")
    assert (status == 200) == encrypt_ok, enc
    if not encrypt_ok:
        assert (status, enc["errorName"]) == (400, "InvalidKeyUsageException")
        status, enc = await client.encrypt("foo", b"x")  # a ciphertext to try decrypting
        enc = enc | {"ciphertextMetadata": enc["ciphertextMetadata"]}
    status, dec = await client.decrypt("limited", enc)
    if decrypt_ok and encrypt_ok:
        assert status == 200
    elif not decrypt_ok:
        assert (status, dec["errorName"]) == (400, "InvalidKeyUsageException")
    else:  # decrypt-only key on a ciphertext of another key: usage allowed, authentication fails
        assert (status, dec["errorName"]) == (400, "InvalidCiphertextException")
    if encrypt_ok and not decrypt_ok:
        # Encrypt with a CDIV needs the verification decrypt, which the key refuses.
        status, err = await client.encrypt("limited", b"x", ciphertextDataIntegrityValueAlgorithm="SHA_256")
        assert (status, err["errorName"]) == (400, "InvalidKeyUsageException")


async def _wait_for_key(client: Client, key_id: str) -> None:
    for _ in range(40):
        status, _ = await client.call("metadata", key_id, requestMetadata=metadata("CreateKey"))
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"key {key_id} never became visible")


async def test_new_key_visible_within_two_seconds(client: Client, home: Home) -> None:
    home.create_key("fresh")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _wait_for_key(client, "fresh")
    assert loop.time() - start < 2.0 + 1.0  # deadline of the poll, not a performance claim


# --- validation ---------------------------------------------------------------------------------

ENCRYPT_CASES = [
    ({"plaintext": None}, "ValidationException", 400),
    ({"plaintext": "not base64!"}, "ValidationException", 400),
    ({"plaintext": "aGVsbG8"}, "ValidationException", 400),  # unpadded
    ({"plaintext": "aGVs-G8="}, "ValidationException", 400),  # URL-safe alphabet
    ({"plaintext": 12}, "ValidationException", 400),
    ({"encryptionAlgorithm": "AES_CBC"}, "ValidationException", 400),
    ({"encryptionAlgorithm": None}, "ValidationException", 400),
    ({"ciphertextDataIntegrityValueAlgorithm": "SHA_1"}, "ValidationException", 400),
    ({"additionalAuthenticatedData": "%%%"}, "ValidationException", 400),
    ({"plaintext": b64(b"x" * 8193)}, "UnsupportedOperationException", 501),
    ({"additionalAuthenticatedData": b64(b"x" * 8193)}, "UnsupportedOperationException", 501),
]


@pytest.mark.parametrize("change,name,status", ENCRYPT_CASES)
async def test_encrypt_validation(client: Client, change: dict, name: str, status: int) -> None:
    body = {"requestMetadata": metadata("Encrypt"), "plaintext": b64(b"hello"), "encryptionAlgorithm": "AES_GCM"}
    for key, value in change.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    got, err = await client.call("encrypt", "foo", **body)
    assert (got, err["errorName"]) == (status, name), err
    assert err["errorMessage"].isascii() and len(err["errorMessage"]) < 512
    assert "hello" not in err["errorMessage"] and b64(b"hello") not in err["errorMessage"]


DECRYPT_CASES = [
    ("initializationVector", b64(b"x" * 11), "InvalidCiphertextException"),
    ("initializationVector", b64(b"x" * 13), "InvalidCiphertextException"),
    ("authenticationTag", b64(b"x" * 15), "InvalidCiphertextException"),
    ("ciphertextMetadata", b64(b"x" * 21), "InvalidCiphertextException"),
    ("ciphertextMetadata", b64(b"junk"), "InvalidCiphertextException"),
    ("ciphertext", "@@@", "ValidationException"),
    ("ciphertext", None, "ValidationException"),
    ("initializationVector", None, "ValidationException"),
    ("authenticationTag", None, "ValidationException"),
    ("encryptionAlgorithm", "RSA", "ValidationException"),
]


@pytest.mark.parametrize("field,value,name", DECRYPT_CASES)
async def test_decrypt_validation(client: Client, field: str, value: str | None, name: str) -> None:
    status, enc = await client.encrypt("foo", b"hello")
    body = {
        "requestMetadata": metadata("Decrypt"),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": enc["ciphertext"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
    }
    if value is None:
        del body[field]
    else:
        body[field] = value
    status, err = await client.call("decrypt", "foo", **body)
    assert (status, err["errorName"]) == (400, name), err


async def test_sixteen_byte_iv_is_accepted_syntax(client: Client) -> None:
    """A 16-byte IV is a legal shape; for our 12-byte-IV keys it fails authentication, not validation."""
    status, enc = await client.encrypt("foo", b"hello")
    status, err = await client.decrypt("foo", enc | {"initializationVector": b64(b"\x01" * 16)})
    assert (status, err["errorName"]) == (400, "InvalidCiphertextException")


async def test_encrypt_requires_key_arn(client: Client) -> None:
    meta = metadata("Encrypt")
    del meta["kmsKeyArn"]
    status, err = await client.call("encrypt", "foo", requestMetadata=meta, plaintext=b64(b"x"), encryptionAlgorithm="AES_GCM")
    assert (status, err["errorName"]) == (400, "ValidationException")


async def test_unknown_fields_and_operations_are_ignored(client: Client) -> None:
    meta = metadata("SomeFutureOperation", brandNewField="x")
    status, enc = await client.call(
        "encrypt", "foo", requestMetadata=meta, plaintext=b64(b"x"), encryptionAlgorithm="AES_GCM", futureField=[1, 2]
    )
    assert status == 200, enc


@pytest.mark.parametrize(
    "body,content_type",
    [
        (b"{not json", "application/json"),
        (b"[1,2,3]", "application/json"),
        (b"", "application/json"),
        (b'{"requestMetadata": {"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"}}', "text/plain"),
        (b'{"requestMetadata": {"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"}}', None),
    ],
)
async def test_malformed_bodies(client: Client, body: bytes, content_type: str | None) -> None:
    status, text, _ = await client.post_raw(client.uri_path + "/health", body, content_type=content_type)
    assert status == 400
    assert json.loads(text)["errorName"] == "ValidationException"
    assert "\n" not in text


@pytest.mark.parametrize("size", [40_000, 200_000])  # just over the cap (~38 KB): whole when the handler runs; far over
async def test_oversized_body_is_refused_before_reading(client: Client, size: int) -> None:
    body = b'{"plaintext": "' + b"A" * size + b'"}'
    status, text, _ = await client.post_raw(client.uri_path + "/keys/foo/encrypt", body)
    assert (status, json.loads(text)["errorName"]) == (501, "UnsupportedOperationException")


async def test_oversized_chunked_body_is_refused(client: Client) -> None:
    """No Content-Length to refuse by: the cap holds on the body as read (whole or not yet)."""
    body = b'{"plaintext": "' + b"A" * 60_000 + b'"}'
    path = client.uri_path + "/keys/foo/encrypt"
    sent = client.signed_headers(path, body, "application/json")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    async with client.session.post(client.base_url + path, data=chunks(), headers=sent, skip_auto_headers=["Content-Type"]) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert (resp.status, (await resp.json())["errorName"]) == (501, "UnsupportedOperationException")


async def test_unknown_prefix_and_paths(client: Client) -> None:
    for path in ("/other/kms/xks/v1/health", "/kms/xks/v1/health", client.uri_path + "/keys/foo/sign", "/", client.uri_path + "/keys/a b/encrypt"):
        async with client.session.post(client.base_url + path, data=b"{}") as resp:  # unsigned on purpose
            assert resp.status == 404, path
            assert (await resp.json())["errorName"] == "InvalidUriPathException"


async def test_get_on_api_uri_is_405(client: Client) -> None:
    async with client.session.get(client.base_url + client.uri_path + "/health") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["errorName"]


async def test_liveness(client: Client) -> None:
    async with client.session.get(client.base_url + "/ping") as resp:
        assert resp.status == 200


@pytest.mark.vault_only
async def test_same_key_id_in_another_store_is_another_key(client: Client, home: Home) -> None:
    home.create_key("bar", store="elsewhere")  # a key id in a store the prefix does not name
    home.create_key("sentinel")  # written after it: once this is visible, so is "bar"
    await _wait_for_key(client, "sentinel")
    status, err = await client.call("metadata", "bar", requestMetadata=metadata("CreateKey"))
    assert (status, err["errorName"]) == (404, "KeyNotFoundException")


async def test_concurrent_requests(client: Client) -> None:
    async def one(i: int) -> None:
        plaintext = f"message {i}".encode() * (i % 7 + 1)
        status, enc = await client.encrypt("foo", plaintext, aad=str(i).encode())
        assert status == 200
        status, dec = await client.decrypt("foo", enc, aad=str(i).encode())
        assert unb64(dec["plaintext"]) == plaintext

    await asyncio.gather(*(one(i) for i in range(300)))


# --- authentication -------------------------------------------------------------------------------


async def test_wrong_secret(client: Client) -> None:
    client.secret = client.secret[:-1] + ("A" if client.secret[-1] != "A" else "B")
    status, err = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert (status, err["errorName"]) == (401, "AuthenticationFailedException")


async def test_unknown_access_key(client: Client) -> None:
    client.access_key_id = "AAAAAAAAAAAAAAAAAAAA"
    status, err = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert (status, err["errorName"]) == (401, "AuthenticationFailedException")


async def test_wrong_region_and_service(client: Client) -> None:
    client.region = "eu-west-1"
    status, err = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert (status, err["errorName"]) == (401, "AuthenticationFailedException")
    client.region, client.service = "us-east-1", "kms"
    status, err = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert (status, err["errorName"]) == (401, "AuthenticationFailedException")


async def test_missing_signature(client: Client) -> None:
    async with client.session.post(
        client.base_url + client.uri_path + "/health", json={"requestMetadata": metadata("KmsHealthCheck")}
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["errorName"] == "AuthenticationFailedException"


async def test_body_swapped_after_signing(client: Client) -> None:
    path = client.uri_path + "/keys/foo/encrypt"
    signed_for = json.dumps({"requestMetadata": metadata(), "plaintext": b64(b"a"), "encryptionAlgorithm": "AES_GCM"}).encode()
    sent = json.dumps({"requestMetadata": metadata(), "plaintext": b64(b"b"), "encryptionAlgorithm": "AES_GCM"}).encode()
    headers = client.signed_headers(path, signed_for)
    async with client.session.post(client.base_url + path, data=sent, headers=headers) as resp:
        assert resp.status == 401


async def test_credential_of_another_store_is_refused(tmp_path, home: Home) -> None:
    """The access key must belong to the store the path's prefix names."""
    import tomllib

    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from keymanager import create_key_manager
    from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential, write_config
    from xks_proxy.server import XksServer

    raw = tomllib.loads((home.path / "config.toml").read_text())
    other_akid, other_secret = new_access_key_id(), new_secret()
    raw["stores"].append(
        {"prefix": "second", "regions": ["us-east-1"], "credentials": [sealed_credential(home.config.master_key, other_akid, other_secret)]}
    )
    write_config(home.path, raw)
    cfg = home.config
    srv = TestServer(XksServer(cfg, create_key_manager(cfg)).app(), host="127.0.0.1")
    await srv.start_server()
    try:
        async with ClientSession() as session:
            base = str(srv.make_url("")).rstrip("/")
            cross = Client(session, base, "/test/kms/xks/v1", other_akid, other_secret)
            status, err = await cross.call("health", requestMetadata=metadata("KmsHealthCheck"))
            assert (status, err["errorName"]) == (401, "AuthenticationFailedException")
            own = Client(session, base, "/second/kms/xks/v1", other_akid, other_secret)
            status, body = await own.call("health", requestMetadata=metadata("KmsHealthCheck"))
            assert status == 200, body
            status, err = await own.call("metadata", "foo", requestMetadata=metadata("CreateKey"))
            if home.backend == "vault":  # the vault partitions keys by store
                assert (status, err["errorName"]) == (404, "KeyNotFoundException")
            else:  # an HSM token is shared by every store not narrowed by key_ids
                assert status == 200, err
    finally:
        await srv.close()


def test_error_bodies_are_in_the_spec_table() -> None:
    from xks_proxy import errors

    table = {
        "ValidationException": 400, "InvalidStateException": 400, "InvalidCiphertextException": 400,
        "InvalidKeyUsageException": 400, "AuthenticationFailedException": 401, "AccessDeniedException": 403,
        "KeyNotFoundException": 404, "InvalidUriPathException": 404, "ThrottlingException": 429,
        "InternalException": 500, "UnsupportedOperationException": 501, "DependencyTimeoutException": 503,
    }  # fmt: skip
    assert {cls.name: cls.status for cls in errors.ALL_ERRORS} == table
    long = errors.ValidationException("é" * 600)
    assert len(long.body()["errorMessage"]) < 512 and long.body()["errorMessage"].isascii()


def test_metadata_base64_is_standard() -> None:
    assert base64.b64encode(b"\xfb\xff").decode() == "+/8="  # the alphabet our responses use
