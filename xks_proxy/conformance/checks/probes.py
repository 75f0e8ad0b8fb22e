"""Optional probes with keys the operator set up to be unusable in specific ways.

KMS relies on the proxy to enforce key usage and state: an encrypt-only key must not decrypt (and
so cannot answer an Encrypt that asks for a CDIV, which requires a verifying decrypt), a
decrypt-only key must not encrypt, and a disabled key must refuse all cryptography while its
metadata says DISABLED.
"""

from __future__ import annotations

import os

from xks_proxy.conformance import outcomes
from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.results import Outcome
from xks_proxy.conformance.validate import classify, encrypt_problems

_DUMMY = {"ciphertext": os.urandom(32), "initializationVector": os.urandom(12), "authenticationTag": os.urandom(16)}


def _forbidden(what: str) -> Outcome:
    return Outcome("ACCEPTS_FORBIDDEN_OPERATION", f"the proxy performs {what}, which the key's usage or state forbids")


def _predict(operation: str):
    return lambda kind: outcomes.crypto(kind, operation)


async def check(run: Run) -> None:
    probes = run.settings.probes
    if not any((probes.encrypt_only, probes.decrypt_only, probes.no_usage, probes.disabled)):
        run.skip("probes/none", "usage and state probes",
                 "no --encrypt-only-key, --decrypt-only-key, --no-usage-key or --disabled-key given")
        return
    if probes.encrypt_only:
        await _encrypt_only(run, probes.encrypt_only)
    if probes.decrypt_only:
        await _usage_refused(run, "decrypt-only", probes.decrypt_only, ("Encrypt",))
    if probes.no_usage:
        await _usage_refused(run, "no-usage", probes.no_usage, ("Encrypt", "Decrypt"))
    if probes.disabled:
        await _disabled(run, probes.disabled)


async def _encrypt_only(run: Run, key: str) -> None:
    api, plaintext = run.api, os.urandom(32)
    reply = await api.encrypt(key, plaintext, None, cdiv=False)
    kind, actual = classify(reply, run.settings.budget_ms)
    run.check("probes/encrypt-only-encrypt", f"encrypt-only key {key} encrypts", ok=kind == outcomes.OK,
              expected="HTTP 200", actual=actual, kms=outcomes.crypto(kind, "Encrypt"), reply=reply)
    sealed = encrypt_problems(reply.json(), plaintext, None, False)[0] if kind == outcomes.OK else None
    fields = sealed.decrypt_fields(None) if sealed else _DUMMY
    reply = await api.decrypt(key, fields)
    run.expect_error("probes/encrypt-only-decrypt", f"encrypt-only key {key} refuses Decrypt", reply,
                     "InvalidKeyUsageException", _predict("Decrypt"), _forbidden("Decrypt"))
    reply = await api.encrypt(key, plaintext, None, cdiv=True)
    run.expect_error("probes/encrypt-only-cdiv", f"encrypt-only key {key} refuses Encrypt with a CDIV", reply,
                     "InvalidKeyUsageException", _predict("Encrypt"), _forbidden("an Encrypt whose CDIV needs a verifying Decrypt"))


async def _usage_refused(run: Run, name: str, key: str, operations: tuple[str, ...]) -> None:
    for operation in operations:
        reply = await (run.api.encrypt(key, os.urandom(32), None, cdiv=False) if operation == "Encrypt"
                       else run.api.decrypt(key, _DUMMY))
        run.expect_error(f"probes/{name}-{operation.lower()}", f"{name} key {key} refuses {operation}", reply,
                         "InvalidKeyUsageException", _predict(operation), _forbidden(operation))


async def _disabled(run: Run, key: str) -> None:
    reply = await run.api.metadata(key)
    kind, actual = classify(reply, run.settings.budget_ms)
    body = reply.json() if kind == outcomes.OK else None
    status = body.get("keyStatus") if isinstance(body, dict) else None
    if kind == outcomes.OK:
        actual = f"keyStatus {status!r}"
    run.check("probes/disabled-metadata", f"disabled key {key} reports DISABLED", ok=status == "DISABLED",
              expected="HTTP 200 with keyStatus DISABLED", actual=actual,
              kms=outcomes.create_key(outcomes.KEY_CONFIG) if status == "DISABLED" else
              Outcome("MISREPORTED_KEY_STATE", "KMS cannot see that the external key is disabled"), reply=reply)
    for operation in ("Encrypt", "Decrypt"):
        reply = await (run.api.encrypt(key, os.urandom(32), None, cdiv=False) if operation == "Encrypt"
                       else run.api.decrypt(key, _DUMMY))
        run.expect_error(f"probes/disabled-{operation.lower()}", f"disabled key {key} refuses {operation}", reply,
                         "InvalidStateException", _predict(operation), _forbidden(f"{operation} with a disabled key"))
