"""`xks-proxy local-kms` as a real subprocess, called with boto3 over HTTP: the KMS API without a proxy.

Authentication, KMS keys of origin AWS_KMS and EXTERNAL (the import flow), aliases, the key
lifecycle, the cryptographic operations and their errors, validation from botocore's model,
persistence across a restart and secrets never in clear in the state directory. External key
stores through a proxy are the business of test_clients_e2e.py; here only what needs no proxy.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from tests.support import ROOT
from tests.support.localkms import LocalKms, error_code, free_port, start_local_kms
from xks_proxy import sigv4

pytestmark = pytest.mark.vault_only  # the local KMS has no key backend: run it once


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKms]:
    server = start_local_kms(tmp_path_factory.mktemp("lk") / "state")
    yield server
    server.stop()


def _conforms(shape: Any, value: Any, path: str) -> None:
    """A response value has exactly the output shape's members and JSON types (botocore's parser checks neither)."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(value, dict) and set(value) <= set(shape.members), f"{path}: {sorted(set(value) - set(shape.members))}"
        for name, item in value.items():
            _conforms(shape.members[name], item, f"{path}.{name}")
    elif kind == "list":
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            _conforms(shape.member, item, f"{path}[{i}]")
    elif kind == "map":
        assert isinstance(value, dict), path
    elif kind in ("string", "blob"):
        assert isinstance(value, str), path
        assert not getattr(shape, "enum", None) or value in shape.enum, f"{path}: {value} is not in the model's enum"
    elif kind == "timestamp":
        assert isinstance(value, (int, float)), path
    elif kind == "boolean":
        assert isinstance(value, bool), path
    elif kind == "integer":
        assert isinstance(value, int), path


#: Exceptions every AWS JSON service may answer, besides those the model lists per operation.
COMMON_ERRORS = {"ValidationException", "SerializationException", "UnrecognizedClientException", "InvalidSignatureException",
                 "IncompleteSignatureException", "MissingAuthenticationTokenException", "UnknownOperationException"}  # fmt: skip


def _check_response(http_response: Any, model: Any, **_: Any) -> None:
    """Answers as KMS gives them: the output shape on success; on failure an exception the model lists for the operation."""
    body = json.loads(http_response.content or b"{}")
    if http_response.status_code != 200:
        assert body["__type"] in COMMON_ERRORS | {e.name for e in model.error_shapes}, f"{model.name} cannot raise {body['__type']}"
    elif model.output_shape is not None:
        _conforms(model.output_shape, body, model.name)


@pytest.fixture(scope="module")
def client(kms: LocalKms) -> Any:
    """A boto3 client whose every successful answer is checked against the model's output shape."""
    made = kms.client()
    made.meta.events.register("after-call.kms", _check_response)
    return made


def _key(client: Any, **kw: Any) -> str:
    return client.create_key(**kw)["KeyMetadata"]["KeyId"]


def test_callers_must_sign_with_a_known_key(kms: LocalKms) -> None:
    import boto3

    stranger = boto3.client("kms", endpoint_url=kms.endpoint, region_name=kms.region,
                            aws_access_key_id="AKIAAAAAAAAAAAAAAAAA", aws_secret_access_key=kms.secret)  # fmt: skip
    assert error_code(stranger.list_keys) == "UnrecognizedClientException"
    forger = boto3.client("kms", endpoint_url=kms.endpoint, region_name=kms.region,
                          aws_access_key_id=kms.access_key_id, aws_secret_access_key="x" + kms.secret[1:])  # fmt: skip
    assert error_code(forger.list_keys) == "InvalidSignatureException"


def _raw(kms: LocalKms, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
    host = kms.endpoint.split("//", 1)[1]
    headers = sigv4.sign(method="POST", url_path="/", host=host, body=body, access_key_id=kms.access_key_id, secret=kms.secret,
                         region=kms.region, service="kms", extra_headers={"X-Amz-Target": target,
                                                                          "Content-Type": "application/x-amz-json-1.1"})  # fmt: skip
    request = urllib.request.Request(kms.endpoint + "/", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_wire_errors_unknown_operation_and_bad_json(kms: LocalKms) -> None:
    assert _raw(kms, "TrentService.NoSuchThing", b"{}") == (400, {"__type": "UnknownOperationException", "message": "Unknown operation NoSuchThing"})
    status, body = _raw(kms, "TrentService.ListKeys", b"{not json")
    assert (status, body["__type"]) == (400, "SerializationException")
    status, body = _raw(kms, "TrentService.ListKeys", b'{"Limit": "ten"}')
    assert (status, body["__type"]) == (400, "SerializationException")


def test_validation_comes_from_the_botocore_model(client: Any) -> None:
    from botocore.exceptions import ClientError

    key_id = _key(client)
    with pytest.raises(ClientError) as raised:
        client.create_alias(AliasName="alias/" + "a" * 300, TargetKeyId=key_id)
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert "'aliasName' failed to satisfy constraint: Member must have length less than or equal to 256" in str(raised.value)
    with pytest.raises(ClientError) as raised:
        client.create_key(KeySpec="AES_512")
    assert raised.value.response["Error"]["Code"] == "ValidationException" and "enum value set: [RSA_2048" in str(raised.value)
    assert error_code(lambda: client.create_alias(AliasName="alias/bad name!", TargetKeyId=key_id)) == "ValidationException"
    assert error_code(lambda: client.generate_data_key(KeyId=key_id, NumberOfBytes=2048)) == "ValidationException"
    assert error_code(lambda: client.generate_data_key(KeyId=key_id)) == "ValidationException"  # neither spec nor size
    assert error_code(lambda: client.create_key(KeySpec="RSA_2048")) == "UnsupportedOperationException"


def test_aws_kms_key_aliases_and_round_trips(client: Any, kms: LocalKms) -> None:
    meta = client.create_key(Description="first")["KeyMetadata"]
    assert (meta["Origin"], meta["KeyState"], meta["KeySpec"], meta["KeyManager"]) == ("AWS_KMS", "Enabled", "SYMMETRIC_DEFAULT", "CUSTOMER")
    assert meta["Arn"] == f"arn:aws:kms:{kms.region}:{kms.account}:key/{meta['KeyId']}"
    key_a, key_b = meta["KeyId"], _key(client)
    client.create_alias(AliasName="alias/first", TargetKeyId=key_a)
    assert client.describe_key(KeyId="alias/first")["KeyMetadata"]["KeyId"] == key_a
    assert {"AliasName": "alias/first", "TargetKeyId": key_a}.items() <= client.list_aliases(KeyId=key_a)["Aliases"][0].items()
    assert error_code(lambda: client.create_alias(AliasName="alias/first", TargetKeyId=key_b)) == "AlreadyExistsException"
    assert {key_a, key_b} <= {k["KeyId"] for k in client.list_keys()["Keys"]}

    context = {"tenant": "t1", "purpose": "test"}
    blob = client.encrypt(KeyId="alias/first", Plaintext=b"secret data", EncryptionContext=context)["CiphertextBlob"]
    for key_id in (None, key_a, meta["Arn"], "alias/first"):
        kw = {"KeyId": key_id} if key_id else {}
        out = client.decrypt(CiphertextBlob=blob, EncryptionContext=context, **kw)
        assert (out["Plaintext"], out["KeyId"]) == (b"secret data", meta["Arn"])
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "t2", "purpose": "test"})) == "InvalidCiphertextException"
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob)) == "InvalidCiphertextException"
    for at in (0, 5, 20, len(blob) - 1):
        tampered = blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]
        assert error_code(lambda: client.decrypt(CiphertextBlob=tampered, EncryptionContext=context)) == "InvalidCiphertextException"
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext=context, KeyId=key_b)) == "IncorrectKeyException"

    moved = client.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=context, DestinationKeyId=key_b,
                              DestinationEncryptionContext={"new": "ctx"})  # fmt: skip
    assert (moved["SourceKeyId"], moved["KeyId"]) == (meta["Arn"], f"arn:aws:kms:{kms.region}:{kms.account}:key/{key_b}")
    assert client.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"new": "ctx"})["Plaintext"] == b"secret data"

    client.delete_alias(AliasName="alias/first")
    assert error_code(lambda: client.describe_key(KeyId="alias/first")) == "NotFoundException"
    assert error_code(lambda: client.describe_key(KeyId="0" * 8 + "-0000-0000-0000-" + "0" * 12)) == "NotFoundException"


def test_data_keys(client: Any) -> None:
    key_id = _key(client)
    for kw, size in (({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16), ({"NumberOfBytes": 64}, 64)):
        made = client.generate_data_key(KeyId=key_id, EncryptionContext={"k": "v"}, **kw)
        assert len(made["Plaintext"]) == size
        assert client.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext={"k": "v"})["Plaintext"] == made["Plaintext"]
    sealed = client.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")
    assert "Plaintext" not in sealed and len(client.decrypt(CiphertextBlob=sealed["CiphertextBlob"])["Plaintext"]) == 32


def test_key_lifecycle(client: Any) -> None:
    key_id = _key(client)
    client.disable_key(KeyId=key_id)
    assert client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    assert error_code(lambda: client.encrypt(KeyId=key_id, Plaintext=b"x")) == "DisabledException"
    client.enable_key(KeyId=key_id)
    blob = client.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    assert error_code(lambda: client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=6)) == "ValidationException"
    scheduled = client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert (scheduled["KeyState"], scheduled["PendingWindowInDays"]) == ("PendingDeletion", 7)
    meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion" and 6.9 * 86400 < meta["DeletionDate"].timestamp() - time.time() <= 7 * 86400
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob)) == "KMSInvalidStateException"
    assert error_code(lambda: client.enable_key(KeyId=key_id)) == "KMSInvalidStateException"
    client.cancel_key_deletion(KeyId=key_id)
    assert client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    assert error_code(lambda: client.cancel_key_deletion(KeyId=key_id)) == "KMSInvalidStateException"


def _wrap(params: dict[str, Any], material: bytes, algorithm: str) -> bytes:
    public = serialization.load_der_public_key(params["PublicKey"])
    digest = hashes.SHA256() if algorithm.endswith("256") else hashes.SHA1()
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)  # type: ignore[union-attr]
    aes = os.urandom(32)
    return public.encrypt(aes, oaep) + aes_key_wrap_with_padding(aes, material)  # type: ignore[union-attr]


def _import(client: Any, key_id: str, material: bytes, algorithm: str = "RSAES_OAEP_SHA_256", **kw: Any) -> None:
    params = client.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048")
    client.import_key_material(KeyId=key_id, ImportToken=params["ImportToken"],
                               EncryptedKeyMaterial=_wrap(params, material, algorithm), **kw)  # fmt: skip


def test_imported_key_material(client: Any) -> None:
    meta = client.create_key(Origin="EXTERNAL")["KeyMetadata"]
    key_id = meta["KeyId"]
    assert (meta["Origin"], meta["KeyState"], meta["Enabled"]) == ("EXTERNAL", "PendingImport", False)
    assert error_code(lambda: client.encrypt(KeyId=key_id, Plaintext=b"x")) == "KMSInvalidStateException"
    material = os.urandom(32)

    first = client.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")
    second = client.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")
    assert error_code(lambda: client.import_key_material(KeyId=key_id, ImportToken=first["ImportToken"],  # superseded
                                                         EncryptedKeyMaterial=_wrap(first, material, "RSAES_OAEP_SHA_256"))) == \
        "InvalidImportTokenException"  # fmt: skip
    assert error_code(lambda: client.import_key_material(KeyId=key_id, ImportToken=second["ImportToken"],
                                                         EncryptedKeyMaterial=os.urandom(256))) == "InvalidCiphertextException"  # fmt: skip
    client.import_key_material(KeyId=key_id, ImportToken=second["ImportToken"],
                               EncryptedKeyMaterial=_wrap(second, material, "RSAES_OAEP_SHA_256"),
                               ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")  # fmt: skip
    meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
    assert (meta["KeyState"], meta["ExpirationModel"]) == ("Enabled", "KEY_MATERIAL_DOES_NOT_EXPIRE")
    blob = client.encrypt(KeyId=key_id, Plaintext=b"imported", EncryptionContext={"a": "b"})["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"imported"

    client.delete_imported_key_material(KeyId=key_id)
    assert client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})) == "KMSInvalidStateException"
    assert error_code(lambda: _import(client, key_id, os.urandom(32))) == "IncorrectKeyMaterialException"
    valid_to = int(time.time()) + 86400
    _import(client, key_id, material, "RSA_AES_KEY_WRAP_SHA_1", ValidTo=valid_to)  # the same material, another wrapping
    meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
    assert (meta["KeyState"], meta["ExpirationModel"], int(meta["ValidTo"].timestamp())) == ("Enabled", "KEY_MATERIAL_EXPIRES", valid_to)
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"imported"
    assert error_code(lambda: _import(client, key_id, material, ExpirationModel="KEY_MATERIAL_EXPIRES")) == "ValidationException"

    aws_key = _key(client)
    assert error_code(lambda: client.get_parameters_for_import(KeyId=aws_key, WrappingAlgorithm="RSAES_OAEP_SHA_1",
                                                               WrappingKeySpec="RSA_2048")) == "UnsupportedOperationException"  # fmt: skip


def test_external_key_store_keys_are_symmetric_only(client: Any) -> None:
    for spec in ("RSA_2048", "HMAC_256", "ECC_NIST_P256"):
        assert error_code(lambda: client.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId="cks-1234567890abcdef0",
                                                    XksKeyId="foo", KeySpec=spec)) == "UnsupportedOperationException"  # fmt: skip
    assert error_code(lambda: client.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId="cks-1234567890abcdef0",
                                                XksKeyId="foo")) == "CustomKeyStoreNotFoundException"  # fmt: skip
    assert error_code(lambda: client.create_key(Origin="EXTERNAL_KEY_STORE", XksKeyId="foo")) == "ValidationException"


def test_a_store_whose_proxy_is_unreachable_is_not_created(client: Any) -> None:
    credential = {"AccessKeyId": "A" * 20, "RawSecretAccessKey": "s" * 43}
    code = error_code(lambda: client.create_custom_key_store(
        CustomKeyStoreName="nowhere", CustomKeyStoreType="EXTERNAL_KEY_STORE", XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyUriEndpoint=f"https://127.0.0.1:{free_port()}", XksProxyUriPath="/kms/xks/v1",
        XksProxyAuthenticationCredential=credential))  # fmt: skip
    assert code == "XksProxyUriUnreachableException"
    assert client.describe_custom_key_stores()["CustomKeyStores"] == []
    assert error_code(lambda: client.connect_custom_key_store(CustomKeyStoreId="cks-1234567890abcdef0")) == "CustomKeyStoreNotFoundException"


def test_state_persists_sealed_and_principals_are_added_offline(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_local_kms(state)
    try:
        client = first.client()
        key_id = _key(client)
        blob = client.encrypt(KeyId=key_id, Plaintext=b"kept across restarts")["CiphertextBlob"]
        data_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    finally:
        first.stop()
    added = subprocess.run([sys.executable, "-m", "xks_proxy.cli", "local-kms", "principal", "add", "alice", "--state", str(state)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert lines[0] == f"principal arn:aws:iam::{first.account}:user/alice" and len(lines) == 3
    alice_akid, alice_secret = lines[1].split(" = ")[1], lines[2].split(" = ")[1]

    port = free_port()
    log = tmp_path / "again.log"
    with log.open("wb") as out:
        again = subprocess.Popen([sys.executable, "-m", "xks_proxy.cli", "local-kms", "--state", str(state), "--port", str(port), "--http"],
                                 cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "serving on" not in log.read_text() and again.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "serving on" in text and "aws_secret_access_key" not in text  # later starts print no credentials
        assert text.splitlines()[1] == f"principal arn:aws:iam::{first.account}:user/local-admin"
        alice = LocalKms(first.process, f"http://127.0.0.1:{port}", first.region, first.account, "", alice_akid, alice_secret).client()
        assert alice.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept across restarts"
        assert alice.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    finally:
        again.terminate()
        again.wait(timeout=15)

    assert json.loads((state / "seal.json").read_text())["seal"] == "file"
    for path in state.rglob("*"):
        if path.is_file() and path.name != "seal.key":
            raw = path.read_bytes()
            for secret in (first.secret, alice_secret):
                assert secret.encode() not in raw, f"{path.name} holds a principal's secret in clear"
            assert data_key["Plaintext"] not in raw and b"kept across restarts" not in raw


# --- external key stores, against the independent tiny_xks ---------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Any]:
    from tests.support.tiny_xks import BOTH, TinyXks

    with TinyXks(tls_dir=tmp_path / "tiny-tls", keys={"foo": BOTH, "bar": BOTH, "half": ("ENCRYPT",)}).running() as proxy:
        yield proxy


def _store_params(proxy: Any, name: str, **over: Any) -> dict[str, Any]:
    config = proxy.proxy_config()
    return {"CustomKeyStoreName": name, "CustomKeyStoreType": "EXTERNAL_KEY_STORE", "XksProxyConnectivity": "PUBLIC_ENDPOINT",
            "XksProxyUriEndpoint": proxy.endpoint, "XksProxyUriPath": config["XksProxyUriPath"],
            "XksProxyAuthenticationCredential": config["XksProxyAuthenticationCredential"], **over}  # fmt: skip


def test_external_key_store_state_machine_and_double_encryption(tiny: Any, local_kms: Any) -> None:
    from tests.support.localkms import store_state

    kms = local_kms(tiny.ca_path)
    client = kms.client()
    client.meta.events.register("after-call.kms", _check_response)
    store_id = client.create_custom_key_store(**_store_params(tiny, "s1"))["CustomKeyStoreId"]
    assert [m["kmsOperation"] for m in tiny.seen] == ["CreateCustomKeyStore"]
    state = store_state(client, store_id)
    assert (state["ConnectionState"], state["CustomKeyStoreType"], "ConnectionErrorCode" in state) == ("DISCONNECTED", "EXTERNAL_KEY_STORE", False)
    assert state["XksProxyConfiguration"] == {"Connectivity": "PUBLIC_ENDPOINT", "AccessKeyId": tiny.access_key_id,
                                              "UriEndpoint": tiny.endpoint, "UriPath": tiny.uri_path}  # fmt: skip
    assert error_code(lambda: client.create_custom_key_store(**_store_params(tiny, "s1"))) == "CustomKeyStoreNameInUseException"
    assert error_code(lambda: client.create_custom_key_store(**_store_params(tiny, "s2"))) == "XksProxyUriInUseException"
    xks = {"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": store_id}
    assert error_code(lambda: client.create_key(XksKeyId="foo", **xks)) == "CustomKeyStoreInvalidStateException"

    client.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert store_state(client, store_id)["ConnectionState"] == "CONNECTED"
    assert error_code(lambda: client.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyUriPath="/other/kms/xks/v1")) == \
        "CustomKeyStoreInvalidStateException"  # fmt: skip
    wrong = {"AccessKeyId": tiny.access_key_id, "RawSecretAccessKey": "W" * 43}
    assert error_code(lambda: client.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyAuthenticationCredential=wrong)) == \
        "XksProxyIncorrectAuthenticationCredentialException"  # fmt: skip

    meta = client.create_key(XksKeyId="foo", **xks)["KeyMetadata"]
    assert (meta["Origin"], meta["KeyState"], meta["CustomKeyStoreId"], meta["XksKeyConfiguration"]) == \
        ("EXTERNAL_KEY_STORE", "Enabled", store_id, {"Id": "foo"})  # fmt: skip
    created = [m for m in tiny.seen if m["operation"] == "metadata"][-1]
    assert (created["kmsOperation"], created["awsPrincipalArn"], created["kmsKeyArn"]) == ("CreateKey", kms.principal, meta["Arn"])
    assert error_code(lambda: client.create_key(XksKeyId="foo", **xks)) == "XksKeyAlreadyInUseException"
    assert error_code(lambda: client.create_key(XksKeyId="nothere", **xks)) == "XksKeyNotFoundException"
    assert error_code(lambda: client.create_key(XksKeyId="half", **xks)) == "XksKeyInvalidConfigurationException"

    def via(request: Any, **_: Any) -> None:
        request.headers["X-Local-KMS-Via-Service"] = "s3.us-east-1.amazonaws.com"

    client.meta.events.register("before-sign.kms.Decrypt", via)
    blob = client.encrypt(KeyId=meta["Arn"], Plaintext=b"double", EncryptionContext={"c": "1"})["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"c": "1"})["Plaintext"] == b"double"
    encrypted, decrypted = [m for m in tiny.seen if m["operation"] in ("encrypt", "decrypt")][-2:]
    assert set(encrypted) == {"kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn", "operation"}
    assert (encrypted["kmsOperation"], encrypted["kmsKeyArn"], encrypted["awsPrincipalArn"]) == ("Encrypt", meta["Arn"], kms.principal)
    assert (decrypted["kmsOperation"], decrypted["kmsViaService"]) == ("Decrypt", "s3.us-east-1.amazonaws.com")
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext={"c": "2"})) == "InvalidCiphertextException"
    tiny.disabled.add("foo")  # the proxy's half is needed to open a blob
    assert error_code(lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext={"c": "1"})) == "KMSInvalidStateException"
    tiny.disabled.clear()

    assert error_code(lambda: client.delete_custom_key_store(CustomKeyStoreId=store_id)) == "CustomKeyStoreInvalidStateException"
    client.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert client.describe_key(KeyId=meta["KeyId"])["KeyMetadata"]["KeyState"] == "Unavailable"
    assert error_code(lambda: client.encrypt(KeyId=meta["Arn"], Plaintext=b"x")) == "KMSInvalidStateException"
    assert error_code(lambda: client.delete_custom_key_store(CustomKeyStoreId=store_id)) == "CustomKeyStoreHasCMKsException"

    client.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyAuthenticationCredential=wrong, NewCustomKeyStoreName="renamed")
    client.connect_custom_key_store(CustomKeyStoreId=store_id)
    state = store_state(client, store_id)
    assert (state["CustomKeyStoreName"], state["ConnectionState"], state["ConnectionErrorCode"]) == ("renamed", "FAILED", "INVALID_CREDENTIALS")
    assert error_code(lambda: client.connect_custom_key_store(CustomKeyStoreId=store_id)) == "CustomKeyStoreInvalidStateException"
    client.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    client.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyAuthenticationCredential=tiny.proxy_config()["XksProxyAuthenticationCredential"])
    client.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert store_state(client, store_id)["ConnectionState"] == "CONNECTED"
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"c": "1"})["Plaintext"] == b"double"
    good = tiny.proxy_config()["XksProxyAuthenticationCredential"]
    client.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyAuthenticationCredential=good)  # tried while CONNECTED
    health = [m["kmsOperation"] for m in tiny.seen if m["operation"] == "health"]  # tiny records only signed calls it accepts
    assert health == ["CreateCustomKeyStore", "ConnectCustomKeyStore", "ConnectCustomKeyStore", "UpdateCustomKeyStore"]


def test_https_by_default_and_the_passphrase_seal(tmp_path: Path) -> None:
    import boto3

    from tests.support.localkms import STARTED, spawn, wait_until

    state, port = tmp_path / "state", free_port()
    args = ["xks_proxy.cli", "local-kms", "--state", str(state), "--port", str(port), "--seal", "passphrase", "--passphrase-env", "LK_TEST_PASS"]
    os.environ["LK_TEST_PASS"] = "a passphrase long enough"
    try:
        server = spawn(args, tmp_path / "https.log")
    finally:
        del os.environ["LK_TEST_PASS"]
    try:
        wait_until(lambda: "serving on" in server.text() or not server.alive(), 60, "the local KMS serving", server.shown)
        printed = re.search(STARTED.pattern.replace("http://", "https://"), server.text())
        assert printed is not None, server.shown()
        client = boto3.client("kms", endpoint_url=f"https://localhost:{port}", region_name="us-east-1", verify=str(state / "tls" / "ca.pem"),
                              aws_access_key_id=printed["akid"], aws_secret_access_key=printed["secret"])  # fmt: skip
        assert client.list_keys()["Keys"] == []
    finally:
        server.stop()
    assert json.loads((state / "seal.json").read_text())["seal"] == "passphrase" and not (state / "seal.key").exists()
    again = subprocess.run([sys.executable, "-m", *args[:-2]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "passphrase seal needs --passphrase-env" in again.stderr
