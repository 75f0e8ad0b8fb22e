"""Secondary authorization: rules over requestMetadata, per store and per key, through real HTTP."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.conftest import Home, metadata
from tests.support.proxy import client_for, edit_config, running
from xks_proxy.access.policy import IMPLICIT_KEY, IMPLICIT_STORE, compile_policy
from xks_proxy.protocol import RequestMetadata

# Policy is decided before any backend is called: run once, on the vault.
pytestmark = pytest.mark.vault_only

ALICE = "arn:aws:iam::123456789012:user/alice"
MALLORY = "arn:aws:iam::999999999999:user/mallory"
BATCH = "arn:aws:iam::123456789012:role/batch"

POLICY: list[dict[str, Any]] = [
    {"name": "account-only", "effect": "allow", "awsPrincipalArn": "arn:aws:iam::123456789012:*"},
    {"name": "no-lab-vpc", "effect": "deny", "awsSourceVpc": ["vpc-lab*", "vpc-test*"]},
    {"name": "ebs-only", "effect": "allow", "keys": ["ebs-*"], "kmsViaService": "ec2.*.amazonaws.com"},
    {"name": "one-endpoint", "effect": "allow", "keys": "pay", "awsSourceVpce": "vpce-0a1b2c3d"},
    {"name": "batch-no-decrypt", "effect": "deny", "keys": "pay", "awsPrincipalArn": BATCH, "kmsOperation": "Decrypt"},
]

# (key, operation, requestMetadata changes, the rule that denies or None)
CASES = [
    ("foo", "encrypt", {}, None),
    ("foo", "encrypt", {"awsPrincipalArn": MALLORY}, IMPLICIT_STORE),
    ("foo", "metadata", {"awsPrincipalArn": MALLORY}, IMPLICIT_STORE),
    ("foo", "encrypt", {"awsSourceVpc": "vpc-lab7"}, "no-lab-vpc"),
    ("foo", "encrypt", {"awsSourceVpc": "vpc-prod1"}, None),
    ("ebs-vol", "encrypt", {}, IMPLICIT_KEY),
    ("ebs-vol", "encrypt", {"kmsViaService": "ec2.eu-west-1.amazonaws.com"}, None),
    ("ebs-vol", "encrypt", {"kmsViaService": "EC2.eu-west-1.amazonaws.com"}, IMPLICIT_KEY),  # case-sensitive
    ("ebs-vol", "encrypt", {"kmsViaService": "ec2.eu-west-1.amazonaws.com", "awsPrincipalArn": MALLORY}, IMPLICIT_STORE),
    ("ebs-vol", "encrypt", {"kmsViaService": "ec2.eu-west-1.amazonaws.com", "awsSourceVpc": "vpc-test2"}, "no-lab-vpc"),
    ("pay", "encrypt", {"awsSourceVpce": "vpce-0a1b2c3d"}, None),
    ("pay", "encrypt", {"awsSourceVpce": "vpce-ffffffff"}, IMPLICIT_KEY),
    ("pay", "decrypt", {"awsSourceVpce": "vpce-0a1b2c3d"}, None),
    ("pay", "decrypt", {"awsSourceVpce": "vpce-0a1b2c3d", "awsPrincipalArn": BATCH}, "batch-no-decrypt"),
    ("pay", "encrypt", {"awsSourceVpce": "vpce-0a1b2c3d", "awsPrincipalArn": BATCH}, None),
]


@pytest.fixture
def policy_home(home: Home) -> Home:
    home.create_key("ebs-vol")
    home.create_key("pay")

    def configure(raw: dict[str, Any]) -> None:
        raw["stores"][0]["policy"] = POLICY

    edit_config(home.path, configure)
    return home


async def test_policy_decisions_over_http(policy_home: Home, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    home = policy_home
    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as client:
        ciphertexts = {}
        for key in ("foo", "ebs-vol", "pay"):
            meta = metadata("Encrypt", kmsViaService="ec2.eu-west-1.amazonaws.com", awsSourceVpce="vpce-0a1b2c3d")
            status, enc = await client.call("encrypt", key, requestMetadata=meta, plaintext="AAAA", encryptionAlgorithm="AES_GCM")
            assert status == 200, enc
            ciphertexts[key] = enc
        for number, (key, operation, changes, rule) in enumerate(CASES):
            kms_operation = {"encrypt": "Encrypt", "decrypt": "Decrypt", "metadata": "CreateKey"}[operation]
            meta = metadata(kms_operation, kmsRequestId=f"case-{number}", **changes)
            body: dict[str, Any] = {"requestMetadata": meta}
            if operation == "encrypt":
                body.update(plaintext="AAAA", encryptionAlgorithm="AES_GCM")
            elif operation == "decrypt":
                enc = ciphertexts[key]
                body.update(
                    encryptionAlgorithm="AES_GCM",
                    ciphertext=enc["ciphertext"],
                    initializationVector=enc["initializationVector"],
                    authenticationTag=enc["authenticationTag"],
                    ciphertextMetadata=enc["ciphertextMetadata"],
                )
            status, answer = await client.call(operation, key, **body)
            if rule is None:
                assert status == 200, (number, answer)
                continue
            assert status == 403, (number, answer)
            assert answer["errorName"] == "AccessDeniedException"
            assert rule in answer["errorMessage"]
            records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "xks_proxy.access"]
            record = next(r for r in records if r["kmsRequestId"] == f"case-{number}")
            assert record["deniedBy"] == rule and record["outcome"] == "AccessDeniedException"
            assert any(f"'case-{number}' denied by policy rule {rule}" in r.getMessage() for r in caplog.records)


async def test_health_is_never_subject_to_policy(home: Home) -> None:
    edit_config(home.path, lambda raw: raw["stores"][0].update(policy=[{"name": "freeze", "effect": "deny"}]))
    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as client:
        status, body = await client.encrypt("foo", b"x")
        assert (status, body["errorName"]) == (403, "AccessDeniedException") and "freeze" in body["errorMessage"]
        status, body = await client.call("metadata", "foo", requestMetadata=metadata("CreateKey"))
        assert status == 403
        status, body = await client.call("health", requestMetadata={"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"})
        assert status == 200, body


def _meta(**fields: str) -> RequestMetadata:
    base = {"kms_request_id": "r", "kms_operation": "Encrypt", "aws_principal_arn": ALICE}
    base.update(fields)
    return RequestMetadata(**base)  # type: ignore[arg-type]


def test_rule_semantics() -> None:
    policy = compile_policy(
        [
            {"name": "both", "effect": "allow", "awsPrincipalArn": "*:user/*", "kmsOperation": ["Encrypt", "Decrypt"]},
            {"name": "late-deny", "effect": "deny", "kmsKeyArn": "arn:aws:kms:*:key/blocked"},
        ],
        "p",
    )
    assert policy.denial("k", _meta()) is None
    # every condition of a rule must match (AND); any pattern of a condition may (OR)
    assert policy.denial("k", _meta(kms_operation="GenerateDataKey")) == IMPLICIT_STORE
    assert policy.denial("k", _meta(aws_principal_arn="arn:aws:iam::1:role/r")) == IMPLICIT_STORE
    # a deny listed after the allow still wins
    assert policy.denial("k", _meta(kms_key_arn="arn:aws:kms:us-east-1:1:key/blocked")) == "late-deny"
    # a condition on a field the request lacks never matches
    assert policy.denial("k", _meta(kms_key_arn=None)) is None
    # no rules: everything signed is allowed
    assert compile_policy([], "p").denial("k", _meta(aws_principal_arn=MALLORY)) is None
    # key-scoped allows bind only their keys; the store has no allow, so other keys are open
    scoped = compile_policy([{"name": "vpce", "effect": "allow", "keys": ["a*"], "awsSourceVpce": "vpce-1"}], "p")
    assert scoped.denial("abc", _meta()) == IMPLICIT_KEY
    assert scoped.denial("abc", _meta(aws_source_vpce="vpce-1")) is None
    assert scoped.denial("xyz", _meta()) is None


@pytest.mark.parametrize(
    "rules, field",
    [
        ([{"name": "x", "effect": "allow", "awsPrincipalARN": "*"}], "policy[0].awsPrincipalARN: unknown field"),
        ([{"name": "x", "effect": "permit"}], "policy[0].effect"),
        ([{"effect": "allow"}], "policy[0].name"),
        ([{"name": "has space", "effect": "allow"}], "policy[0].name"),
        ([{"name": "x", "effect": "allow", "kmsOperation": []}], "policy[0].kmsOperation"),
        ([{"name": "x", "effect": "allow", "kmsViaService": 5}], "policy[0].kmsViaService"),
        ([{"name": "x", "effect": "deny", "keys": [""]}], "policy[0].keys"),
        ([{"name": "x", "effect": "deny"}, {"name": "x", "effect": "allow"}], "policy[1].name"),
        ("deny everything", "stores[0].policy: must be a list"),
    ],
)
def test_policy_typos_are_config_errors(home: Home, rules: Any, field: str) -> None:
    from xks_proxy.config import ConfigError

    edit_config(home.path, lambda raw: raw["stores"][0].update(policy=rules))
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        _ = home.config
