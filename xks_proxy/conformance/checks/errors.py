"""Error behaviour: authentication, unknown keys and paths, malformed bodies, error body shape.

KMS tells its users what went wrong from the errorName and HTTP status alone, so a proxy that
answers a bad signature with 403, or an unknown key with 400, sends operators chasing the wrong
problem. Every error response seen during the whole run is also checked for shape at the end.
"""

from __future__ import annotations

import secrets
from typing import Any

from xks_proxy import kms_outcomes
from xks_proxy.conformance import outcomes
from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.client import b64
from xks_proxy.conformance.results import Outcome
from xks_proxy.conformance.validate import error_body_problems

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SKEW_SECONDS = 900  # three times the 5 minutes the spec allows


async def check(run: Run) -> None:
    await _authentication(run)
    await _unknown_key(run)
    await _bad_paths(run)
    await _malformed(run)


# --- authentication ------------------------------------------------------------------------------


def _wrong_signers(run: Run) -> list[tuple[str, str, Any]]:
    signer = run.api.signer
    other_secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(64))
    other_akid = "XKSCONF" + "".join(secrets.choice(_BASE32) for _ in range(13))
    return [
        ("wrong-secret", "a wrong secret access key", signer.but(secret=other_secret)),
        ("unknown-access-key", "an access key id the store does not know", signer.but(access_key_id=other_akid)),
        ("clock-skew", f"a request time {SKEW_SECONDS // 60} minutes in the past", signer.but(skew_seconds=-SKEW_SECONDS)),
        ("wrong-region", "a region the store does not serve", signer.but(region="xx-conformance-1")),
        ("wrong-service", "service name 'kms' instead of 'kms-xks-proxy'", signer.but(service="kms")),
    ]


async def _authentication(run: Run) -> None:
    for name, what, signer in _wrong_signers(run):
        reply = await run.api.health("ConnectCustomKeyStore", signer=signer)
        run.expect_error(f"errors/{name}", f"signed with {what}", reply, "AuthenticationFailedException",
                         _auth_outcome, outcomes.forged_accepted(what))


def _auth_outcome(kind: str) -> Outcome:
    code = outcomes.connection_code(kind)
    if kind == "AuthenticationFailedException":
        return Outcome(code, "with a credential like this KMS reports INVALID_CREDENTIALS "
                             "(CreateCustomKeyStore: XksProxyIncorrectAuthenticationCredentialException)")
    return Outcome(code, f"a wrong credential would show as {code} instead of INVALID_CREDENTIALS, misleading the operator")


# --- unknown key and paths -----------------------------------------------------------------------


async def _unknown_key(run: Run) -> None:
    missing = f"xks-conformance-no-such-key-{secrets.token_hex(6)}"
    reply = await run.api.metadata(missing)
    run.expect_error("errors/unknown-key", "GetKeyMetadata for a key that does not exist", reply, "KeyNotFoundException",
                     outcomes.create_key, Outcome("OK", "CreateKey would accept an XksKeyId that names no key"))


async def _bad_paths(run: Run) -> None:
    api = run.api
    for name, title, path in (
        ("unknown-prefix", "a URI path prefix the proxy does not serve", "/xks-conformance-no-such-prefix" + api.api_path("health")),
        ("unknown-operation", "an unknown operation under the key path", api.api_path("keys", run.settings.key_id, "frobnicate")),
    ):
        body = {"requestMetadata": api.request_metadata("KmsHealthCheck", for_key=True)}
        reply = await api.post(path, body, label=f"POST {path}")
        run.expect_error(f"errors/{name}", title, reply, "InvalidUriPathException", _path_outcome,
                         Outcome("CONNECTED", "a wrong XksProxyUriPath would still get answers, so KMS cannot report it"))


def _path_outcome(kind: str) -> Outcome:
    code = outcomes.connection_code(kind)
    if kind == "InvalidUriPathException":
        return Outcome(code, "with a wrong XksProxyUriPath KMS reports XKS_PROXY_INVALID_CONFIGURATION")
    return Outcome(code, f"a wrong XksProxyUriPath would show as {code} instead of XKS_PROXY_INVALID_CONFIGURATION")


# --- malformed bodies ----------------------------------------------------------------------------


def _malformed_cases(run: Run) -> list[tuple[str, str, str, Any, str, bool]]:
    """(name, title, path, body, content type, advisory)."""
    api, key = run.api, run.settings.key_id
    health, encrypt, decrypt = api.api_path("health"), api.api_path("keys", key, "encrypt"), api.api_path("keys", key, "decrypt")
    good = {"requestMetadata": api.request_metadata("Encrypt", for_key=True), "plaintext": b64(b"x" * 32),
            "encryptionAlgorithm": "AES_GCM"}
    dec = {"requestMetadata": api.request_metadata("Decrypt", for_key=True), "ciphertext": b64(b"x" * 32),
           "authenticationTag": b64(b"t" * 16), "encryptionAlgorithm": "AES_GCM"}
    json_ct = "application/json"
    return [
        ("not-json", "a body that is not JSON", health, b'{"requestMetadata": ', json_ct, False),
        ("not-object", "a JSON body that is not an object", health, b'["requestMetadata"]', json_ct, False),
        ("no-request-metadata", "health without requestMetadata", health, {}, json_ct, False),
        ("empty-request-metadata", "health with empty requestMetadata", health, {"requestMetadata": {}}, json_ct, False),
        ("missing-plaintext", "Encrypt without plaintext", encrypt, _without(good, "plaintext"), json_ct, False),
        ("bad-base64", "Encrypt with plaintext that is not base64", encrypt, {**good, "plaintext": "%% not base64 %%"}, json_ct, False),
        ("wrong-type", "Encrypt with a number as plaintext", encrypt, {**good, "plaintext": 12345}, json_ct, False),
        ("bad-algorithm", "Encrypt with encryptionAlgorithm AES_CBC", encrypt, {**good, "encryptionAlgorithm": "AES_CBC"}, json_ct, False),
        ("bad-cdiv-algorithm", "Encrypt asking for a MD5 integrity value", encrypt,
         {**good, "ciphertextDataIntegrityValueAlgorithm": "MD5"}, json_ct, False),
        ("missing-iv", "Decrypt without initializationVector", decrypt, dec, json_ct, False),
        ("content-type", "a valid body sent as text/plain", health,
         {"requestMetadata": api.request_metadata("KmsHealthCheck", for_key=False)}, "text/plain", True),
    ]


def _without(body: dict, name: str) -> dict:
    return {k: v for k, v in body.items() if k != name}


async def _malformed(run: Run) -> None:
    for name, title, path, body, content_type, advisory in _malformed_cases(run):
        reply = await run.api.post(path, body, label=f"malformed: {title}", content_type=content_type)
        run.expect_error(f"errors/malformed-{name}", f"malformed: {title}", reply, "ValidationException",
                         _malformed_outcome, Outcome("ACCEPTS_MALFORMED_REQUESTS",
                                                     "the proxy acts on a request it should refuse as malformed"),
                         advisory=advisory)


def _malformed_outcome(kind: str) -> Outcome:
    if kind == "ValidationException":
        return Outcome(kind, "refused as KMS expects (KMS itself never sends this)")
    code = kind if kind.endswith("Exception") else outcomes.connection_code(kind)
    return Outcome(code, f"the proxy answers {code} where the spec requires ValidationException; "
                         "KMS would misreport a malformed request")


# --- error body shape ----------------------------------------------------------------------------


def check_error_bodies(run: Run) -> None:
    """Every non-200 answer of the whole run: one JSON line, known name, its status, short ASCII message."""
    errors = [r for r in run.api.replies if r.status is not None and r.status != 200]
    if not errors:
        run.skip("errors/error-bodies", "every error body well-formed", "no error responses seen")
        return
    problems = [f"{r.label}: {p}" for r in errors for p in error_body_problems(r)]
    unique = list(dict.fromkeys(problems))
    run.check("errors/error-bodies", "every error body well-formed", ok=not unique,
              expected="one line of JSON; errorName from the spec with its HTTP status; errorMessage printable ASCII < 512",
              actual=f"{len(errors)} error responses well-formed" if not unique else
              f"{len(unique)} problems, e.g. " + "; ".join(unique[:3]),
              kms=Outcome("OK", "KMS can interpret every error") if not unique else _uninterpretable())


def _uninterpretable() -> Outcome:
    invalid = outcomes.INVALID_RESPONSE
    code, crypto = outcomes.connection_code(invalid), outcomes.crypto(invalid, "Encrypt").code
    store = kms_outcomes.create_store_exception(invalid)
    return Outcome(code, f"KMS cannot interpret these errors: {code} on connect ({store}), {crypto} for Encrypt/Decrypt")
