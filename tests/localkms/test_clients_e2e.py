"""Real AWS clients through the whole chain: boto3 / the AWS CLI / the AWS Encryption SDK → `xks-proxy
local-kms` → an XKS proxy (ours, and tiny_xks: any spec-compliant one) → its keys.

Every error path asserts what the caller sees as the shared outcome table (`xks_proxy.kms_outcomes`)
predicts it, never a hard-coded name, so the conformance tester's predictions and the local KMS's
behaviour are checked against the same words. Waits are bounded polls, never timed assertions.
No secret and no plaintext is ever printed: clients get credentials through their environment.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.localkms import (
    Chain, chain, connect, create_store, create_xks_key, error_code, outcomes, proxy_config, store_state, wait_until, xks_cli,
)  # fmt: skip
from tests.support.proxy import edit_config

AWS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "aws"
pytestmark = pytest.mark.vault_only


def _encrypt(c: Chain, data: bytes = b"some data", **kw: Any) -> bytes:
    return c.client.encrypt(KeyId=c.key_arn, Plaintext=data, **kw)["CiphertextBlob"]


def _round_trips(c: Chain) -> None:
    context = {"purpose": "e2e"}
    blob = _encrypt(c, b"hello through the chain", EncryptionContext=context)
    out = c.client.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    assert out["Plaintext"] == b"hello through the chain" and out["KeyId"] == c.key_arn
    assert error_code(lambda: c.client.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "other"})) == \
        "InvalidCiphertextException"  # fmt: skip
    data_key = c.client.generate_data_key(KeyId=c.key_arn, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert c.client.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    sealed = c.client.generate_data_key_without_plaintext(KeyId=c.key_arn, NumberOfBytes=16)["CiphertextBlob"]
    assert len(c.client.decrypt(CiphertextBlob=sealed)["Plaintext"]) == 16


def _works(c: Chain) -> bool:
    from botocore.exceptions import ClientError

    try:
        return bool(_encrypt(c))
    except ClientError:
        return False


def _fails_with(c: Chain, expected: str, deadline: float = 10) -> None:
    """Encrypt until it raises (the proxy sees a change within a second); then it must raise `expected`."""
    from botocore.exceptions import ClientError

    def raised() -> str | None:
        try:
            _encrypt(c)
        except ClientError as exc:
            return exc.response["Error"]["Code"]
        return None

    assert wait_until(raised, deadline, f"Encrypt failing ({expected} expected)") == expected


# --- our proxy, the happy path with three real clients ---------------------------------------------------


def test_boto3_through_local_kms_and_our_proxy(kms_chain: Chain) -> None:
    c = kms_chain
    state = store_state(c.client, c.store_id)
    assert state["ConnectionState"] == "CONNECTED" and state["CustomKeyStoreType"] == "EXTERNAL_KEY_STORE"
    assert state["XksProxyConfiguration"]["UriEndpoint"] == c.proxy.endpoint
    meta = c.client.describe_key(KeyId=c.key_arn)["KeyMetadata"]
    assert meta["Origin"] == "EXTERNAL_KEY_STORE" and meta["XksKeyConfiguration"]["Id"] == "foo"
    assert meta["CustomKeyStoreId"] == c.store_id and meta["KeyState"] == "Enabled"
    _round_trips(c)

    # The proxy's audit log has what the local KMS sent, as AWS KMS sends it.
    def encrypt_records() -> list[dict[str, Any]]:
        return [r for r in c.proxy.audit() if r.get("event") == "xks.request" and r.get("kmsOperation") == "Encrypt"]

    record = wait_until(encrypt_records, 10, "an Encrypt record in the proxy's audit log")[0]
    assert (record["kmsKeyArn"], record["awsPrincipalArn"], record["keyId"], record["outcome"]) == \
        (c.key_arn, c.kms.principal, "foo", "OK")  # fmt: skip
    assert record["kmsRequestId"]
    wanted = {"CreateCustomKeyStore", "ConnectCustomKeyStore", "CreateKey", "Decrypt", "GenerateDataKey"}
    wait_until(lambda: wanted <= {r.get("kmsOperation") for r in c.proxy.audit()}, 10, f"audit records of {sorted(wanted)}")


def test_aws_cli_encrypts_and_decrypts(kms_chain: Chain, tmp_path: Path) -> None:
    c = kms_chain
    env = {**c.kms.env(), "AWS_PAGER": ""}
    env.pop("AWS_ENDPOINT_URL_KMS")  # the CLI gets --endpoint-url, as the README prints it
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(200))

    def aws(*args: str) -> str:
        done = subprocess.run([str(AWS), "kms", *args, "--endpoint-url", c.kms.endpoint, "--output", "text"],
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, f"aws kms {args[0]} failed: {done.stderr[-2000:]}"
        return done.stdout.strip()

    blob = tmp_path / "cipher.bin"
    blob.write_bytes(base64.b64decode(aws("encrypt", "--key-id", c.key_arn, "--plaintext", f"fileb://{plain}",
                                          "--query", "CiphertextBlob")))  # fmt: skip
    out = aws("decrypt", "--ciphertext-blob", f"fileb://{blob}", "--query", "Plaintext")
    assert base64.b64decode(out) == plain.read_bytes()
    assert aws("describe-key", "--key-id", c.key_arn, "--query", "KeyMetadata.XksKeyConfiguration.Id") == "foo"


def test_encryption_sdk_encrypts_and_decrypts_a_file(kms_chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_encryption_sdk
    import botocore.session
    from aws_encryption_sdk import CommitmentPolicy, StrictAwsKmsMasterKeyProvider

    c = kms_chain
    for name, value in c.kms.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # AWS_ENDPOINT_URL_KMS points botocore's KMS client at the local KMS
    provider = StrictAwsKmsMasterKeyProvider(key_ids=[c.key_arn], botocore_session=botocore.session.Session())
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    source = tmp_path / "report.txt"
    source.write_bytes(os.urandom(100_000))
    sealed = tmp_path / "report.txt.encrypted"
    with source.open("rb") as src, sealed.open("wb") as dst:
        with client.stream(mode="e", source=src, key_provider=provider, encryption_context={"file": "report.txt"}) as enc:
            for chunk in enc:
                dst.write(chunk)
    assert source.read_bytes() not in sealed.read_bytes()
    out = io.BytesIO()
    with sealed.open("rb") as src, client.stream(mode="d", source=src, key_provider=provider) as dec:
        for chunk in dec:
            out.write(chunk)
        header = dec.header
    assert out.getvalue() == source.read_bytes()
    assert header.encryption_context["file"] == "report.txt"
    assert [k.key_provider.key_info.decode() for k in header.encrypted_data_keys] == [c.key_arn]


# --- our proxy, error paths ---------------------------------------------------------------------------------


def test_key_disabled_in_the_proxy(kms_chain: Chain) -> None:
    xks_cli(kms_chain.proxy.home, "keys", "disable", "foo")
    _fails_with(kms_chain, outcomes().crypto_exception("InvalidStateException", "Encrypt"))
    xks_cli(kms_chain.proxy.home, "keys", "enable", "foo")
    wait_until(lambda: _works(kms_chain), 10, "Encrypt working again after keys enable")


def test_proxy_stopped(kms_chain: Chain) -> None:
    kms_chain.proxy.stop()
    expected = outcomes().crypto_exception(outcomes().UNREACHABLE, "Encrypt")
    assert error_code(lambda: _encrypt(kms_chain)) == expected


def test_policy_denial_in_the_proxy(kms_chain: Chain) -> None:
    c = kms_chain
    rule = {"name": "no-local-admin", "effect": "deny", "awsPrincipalArn": [c.kms.principal]}
    edit_config(c.proxy.home, lambda raw: raw["stores"][0].setdefault("policy", []).append(rule))
    _fails_with(c, outcomes().crypto_exception("AccessDeniedException", "Encrypt"))
    wait_until(lambda: any(r.get("deniedBy") == "no-local-admin" for r in c.proxy.audit()), 10, "an audit record naming the rule")


def test_wrong_credential_and_wrong_path(home: Any, served_proxy: Any, local_kms: Any) -> None:
    table = outcomes()
    kms = local_kms(served_proxy.ca).client()
    config = proxy_config(home.path)
    wrong_secret = {**config, "XksProxyAuthenticationCredential": {
        **config["XksProxyAuthenticationCredential"], "RawSecretAccessKey": "A" * 43 + "wrongSecret"}}  # fmt: skip
    assert error_code(lambda: create_store(kms, "bad-secret", served_proxy.endpoint, wrong_secret)) == \
        table.create_store_exception("AuthenticationFailedException")  # fmt: skip
    wrong_path = {**config, "XksProxyUriPath": "/nowhere/kms/xks/v1"}
    assert error_code(lambda: create_store(kms, "bad-path", served_proxy.endpoint, wrong_path)) == \
        table.create_store_exception("InvalidUriPathException")  # fmt: skip

    # A store created with the right credential; the proxy then rotates it away: Connect fails.
    store_id = create_store(kms, "rotated", served_proxy.endpoint, config)
    old = config["XksProxyAuthenticationCredential"]["AccessKeyId"]
    xks_cli(home.path, "credentials", "add")
    xks_cli(home.path, "credentials", "remove", old)

    def failed() -> dict[str, Any] | None:
        state = connect(kms, store_id)
        if state["ConnectionState"] == "CONNECTED":  # the running proxy has not seen the change yet
            kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
            wait_until(lambda: store_state(kms, store_id)["ConnectionState"] == "DISCONNECTED", 10, "disconnect")
            return None
        return state

    state = wait_until(failed, 15, "Connect failing after the credential was removed")
    assert state["ConnectionState"] == "FAILED"
    assert state["ConnectionErrorCode"] == table.connection_code("AuthenticationFailedException") == "INVALID_CREDENTIALS"


# --- any spec-compliant proxy: tiny_xks ---------------------------------------------------------------------


def test_any_spec_compliant_proxy_tiny_xks(tiny_xks: Any, local_kms: Any) -> None:
    c = chain(local_kms(tiny_xks.ca_path), tiny_xks, tiny_xks.endpoint, tiny_xks.proxy_config())
    _round_trips(c)
    sent = [m for m in tiny_xks.seen if m["operation"] == "encrypt"]
    assert sent and all(m["kmsKeyArn"] == c.key_arn and m["awsPrincipalArn"] == c.kms.principal for m in sent)
    assert {m["kmsOperation"] for m in tiny_xks.seen if m["operation"] == "health"} & {"CreateCustomKeyStore", "ConnectCustomKeyStore"}
    assert any(m["kmsOperation"] == "CreateKey" for m in tiny_xks.seen if m["operation"] == "metadata")


def test_tiny_xks_error_paths(tiny_xks: Any, local_kms: Any) -> None:
    table = outcomes()
    c = chain(local_kms(tiny_xks.ca_path), tiny_xks, tiny_xks.endpoint, tiny_xks.proxy_config())

    tiny_xks.disabled.add("foo")
    assert error_code(lambda: _encrypt(c)) == table.crypto_exception("InvalidStateException", "Encrypt")
    tiny_xks.disabled.clear()

    tiny_xks.delay = 0.4  # more than KMS's 250 ms
    assert error_code(lambda: _encrypt(c)) == table.crypto_exception(table.TIMEOUT, "Encrypt") == "DependencyTimeoutException"
    tiny_xks.delay = 0.0

    tiny_xks.fail_with = "ThrottlingException"
    assert error_code(lambda: _encrypt(c)) == table.crypto_exception("ThrottlingException", "Encrypt")
    tiny_xks.fail_with = "AccessDeniedException"
    assert error_code(lambda: _encrypt(c)) == table.crypto_exception("AccessDeniedException", "Encrypt")
    tiny_xks.fail_with = None
    _encrypt(c)

    # Connect after the proxy changed under the store: a new secret, then a new path.
    def reconnect() -> tuple[str, str | None]:
        c.client.disconnect_custom_key_store(CustomKeyStoreId=c.store_id)
        wait_until(lambda: store_state(c.client, c.store_id)["ConnectionState"] == "DISCONNECTED", 10, "disconnect")
        state = connect(c.client, c.store_id)
        return state["ConnectionState"], state.get("ConnectionErrorCode")

    good_secret = tiny_xks.secret
    tiny_xks.secret = "B" * 43 + "rotatedAway"
    assert reconnect() == ("FAILED", table.connection_code("AuthenticationFailedException"))
    tiny_xks.secret, tiny_xks.prefix = good_secret, "moved"
    assert reconnect() == ("FAILED", table.connection_code("InvalidUriPathException"))
    tiny_xks.prefix = "tiny"
    assert reconnect() == ("CONNECTED", None)
    _encrypt(c)
