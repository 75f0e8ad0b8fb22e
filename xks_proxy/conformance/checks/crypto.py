"""Cryptographic behaviour: round trips, every Encrypt response field, CDIV, IV uniqueness, and
refusal of tampered ciphertexts.

KMS cannot see inside the proxy, so these are the properties it silently depends on: a field of
the wrong length breaks KMS's parsing, a repeated or zero IV breaks AES-GCM, and a proxy that
decrypts a tampered ciphertext (or ignores the AAD or ciphertextMetadata) breaks the integrity
KMS promises its callers.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from dataclasses import dataclass, field

from xks_proxy.conformance import outcomes
from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.client import Reply
from xks_proxy.conformance.results import Outcome
from xks_proxy.conformance.validate import ENCRYPT_ASPECTS, Sealed, classify, encrypt_problems

SAMPLE_AAD = b"project=nile,department=marketing"
ROUND_TRIPS = (
    # (check name, title, AAD, plaintext sizes, ask for a CDIV)
    ("roundtrip-no-aad", "round trip without AAD", None, (1, 32, 4300), False),
    ("roundtrip-aad", "round trip with AAD and CDIV", SAMPLE_AAD, (1, 32, 4300), True),
    ("roundtrip-large-aad", "round trip with 8192-byte AAD and CDIV", b"A" * 8192, (32, 4300), True),
)
ASPECT_TEXT = {
    "encoding": ("response fields are standard base64", "every field standard padded base64 (RFC 4648)"),
    "ciphertext": ("ciphertext length", "ciphertext exactly as long as the plaintext"),
    "iv": ("initialization vector", "initializationVector of 12 or 16 bytes, never all zeros"),
    "tag": ("authentication tag", "authenticationTag of 16 bytes"),
    "metadata": ("ciphertext metadata", "ciphertextMetadata absent or at most 20 bytes"),
    "cdiv": ("ciphertext data integrity value", "when asked for, ciphertextDataIntegrityValue = "
             "SHA-256(AAD || metadata || IV || ciphertext || tag)"),
}


@dataclass
class Findings:
    """What the round trips saw, per Encrypt response aspect."""

    responses: int = 0
    problems: dict[str, Counter[str]] = field(default_factory=lambda: {a: Counter() for a in ENCRYPT_ASPECTS})
    sealed: list[Sealed] = field(default_factory=list)


async def check(run: Run) -> None:
    findings = Findings()
    for name, title, aad, sizes, cdiv in ROUND_TRIPS:
        await _round_trip(run, findings, name, title, aad, sizes, cdiv)
    _aspects(run, findings)
    await _tampering(run)


async def _round_trip(run: Run, findings: Findings, name: str, title: str, aad: bytes | None,
                      sizes: tuple[int, ...], cdiv: bool) -> None:
    failure: tuple[str, Outcome, Reply] | None = None
    for size in sizes:
        failure = await _one_round_trip(run, findings, os.urandom(size), aad, cdiv)
        if failure:
            break
    aad_text = "no AAD" if aad is None else f"{len(aad)}-byte AAD"
    expected = f"Encrypt then Decrypt of {', '.join(map(str, sizes))}-byte plaintexts ({aad_text}) gives the plaintext back"
    run.check(f"crypto/{name}", title, ok=failure is None, expected=expected,
              actual=failure[0] if failure else f"{len(sizes)} sizes round-tripped",
              kms=failure[1] if failure else Outcome("OK", "KMS Encrypt and Decrypt succeed"),
              reply=failure[2] if failure else None)


async def _one_round_trip(run: Run, findings: Findings, plaintext: bytes, aad: bytes | None,
                          cdiv: bool) -> tuple[str, Outcome, Reply] | None:
    """None on success, else (what went wrong, KMS outcome, the answer that went wrong)."""
    where = f"{len(plaintext)} bytes"
    reply = await run.api.encrypt(run.settings.key_id, plaintext, aad, cdiv)
    kind, actual = classify(reply, run.settings.budget_ms)
    if kind != outcomes.OK:
        return f"Encrypt ({where}): {actual}", outcomes.crypto(kind, "Encrypt"), reply
    sealed, problems = encrypt_problems(reply.json(), plaintext, aad, cdiv)
    findings.responses += 1
    for aspect, found in problems.items():
        findings.problems[aspect].update(found)
    if sealed is None:
        return f"Encrypt ({where}): response unusable: {'; '.join(sum(problems.values(), []))}", \
            outcomes.crypto(outcomes.INVALID_RESPONSE, "Encrypt"), reply
    findings.sealed.append(sealed)
    run.ivs.append(sealed.iv)
    reply = await run.api.decrypt(run.settings.key_id, sealed.decrypt_fields(aad))
    kind, actual = classify(reply, run.settings.budget_ms)
    if kind != outcomes.OK:
        return f"Decrypt ({where}): {actual}", outcomes.crypto(kind, "Decrypt"), reply
    body = reply.json()
    got = body.get("plaintext") if isinstance(body, dict) else None
    try:
        matches = isinstance(got, str) and base64.b64decode(got, validate=True) == plaintext
    except ValueError:
        matches = False
    if not matches:
        return f"Decrypt ({where}): plaintext missing or different from what was encrypted", \
            _unusable("Decrypt", "the proxy's plaintext is not KMS's inner ciphertext"), reply
    return None


def _unusable(operation: str, why: str) -> Outcome:
    """A 200 KMS cannot use is an invalid response: the table says what the caller gets."""
    exception = outcomes.crypto(outcomes.INVALID_RESPONSE, operation).code
    return Outcome(exception, f"{why}: KMS {operation} fails with {exception}")


def _aspects(run: Run, findings: Findings) -> None:
    for aspect in ENCRYPT_ASPECTS:
        title, expected = ASPECT_TEXT[aspect]
        if not findings.responses:
            run.skip(f"crypto/{aspect}", title, "no successful Encrypt response to inspect", expected)
            continue
        problems = findings.problems[aspect]
        shown = "; ".join(f"{problem} (in {n} of {findings.responses} responses)" for problem, n in problems.items())
        run.check(f"crypto/{aspect}", title, ok=not problems, expected=expected,
                  actual=shown[:400] if problems else _summary(aspect, findings),
                  kms=Outcome("OK", "KMS accepts the Encrypt response") if not problems else
                  _unusable("Encrypt", "KMS cannot use the Encrypt response"))


def _summary(aspect: str, findings: Findings) -> str:
    sealed = findings.sealed
    lengths = {
        "iv": sorted({len(s.iv) for s in sealed}), "tag": sorted({len(s.tag) for s in sealed}),
        "metadata": sorted({len(s.metadata) for s in sealed if s.metadata is not None}),
    }
    if aspect in ("iv", "tag"):
        return f"{len(sealed)} responses, {'/'.join(map(str, lengths[aspect]))}-byte values"
    if aspect == "metadata":
        return f"{'/'.join(map(str, lengths['metadata']))}-byte metadata" if lengths["metadata"] else "no metadata returned"
    if aspect == "cdiv":
        return f"{sum(1 for s in sealed if s.cdiv is not None)} values recomputed and equal"
    return f"{findings.responses} responses well-formed"


# --- tampering ---------------------------------------------------------------------------------


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0x01]) + data[1:]


async def _tampering(run: Run) -> None:
    api, key = run.api, run.settings.key_id
    plaintext = os.urandom(32)
    reply = await api.encrypt(key, plaintext, SAMPLE_AAD, cdiv=False)
    kind, actual = classify(reply, run.settings.budget_ms)
    sealed = encrypt_problems(reply.json(), plaintext, SAMPLE_AAD, False)[0] if kind == outcomes.OK else None
    baseline = await api.decrypt(key, sealed.decrypt_fields(SAMPLE_AAD)) if sealed else None
    if sealed is None or baseline is None or classify(baseline, run.settings.budget_ms)[0] != outcomes.OK:
        for name, title in TAMPER_TITLES.items():
            run.skip(f"crypto/tamper-{name}", title, "no Encrypt/Decrypt round trip succeeded to tamper with")
        return
    run.ivs.append(sealed.iv)
    for name, fields in _tampered(sealed):
        if fields is None:
            run.skip(f"crypto/tamper-{name}", TAMPER_TITLES[name], "the proxy returns no ciphertextMetadata to remove")
            continue
        reply = await api.decrypt(key, fields)
        run.expect_error(f"crypto/tamper-{name}", TAMPER_TITLES[name], reply, "InvalidCiphertextException",
                         lambda k: outcomes.crypto(k, "Decrypt"), outcomes.tampering_accepted(TAMPER_WHAT[name]))


TAMPER_TITLES = {
    "ciphertext": "tampered ciphertext refused", "iv": "tampered IV refused", "tag": "tampered tag refused",
    "aad": "changed AAD refused", "aad-removed": "missing AAD refused",
    "metadata": "tampered ciphertextMetadata refused", "metadata-removed": "removed ciphertextMetadata refused",
}
TAMPER_WHAT = {
    "ciphertext": "ciphertext with one bit flipped", "iv": "ciphertext with a changed IV",
    "tag": "ciphertext with a changed tag", "aad": "ciphertext with different AAD",
    "aad-removed": "ciphertext without its AAD", "metadata": "ciphertext with changed ciphertextMetadata",
    "metadata-removed": "ciphertext without its ciphertextMetadata",
}


def _tampered(sealed: Sealed) -> list[tuple[str, dict[str, bytes | None] | None]]:
    good = sealed.decrypt_fields(SAMPLE_AAD)
    changed_metadata = _flip(sealed.metadata) if sealed.metadata else b"\x00"
    return [
        ("ciphertext", {**good, "ciphertext": _flip(sealed.ciphertext)}),
        ("iv", {**good, "initializationVector": _flip(sealed.iv)}),
        ("tag", {**good, "authenticationTag": _flip(sealed.tag)}),
        ("aad", {**good, "additionalAuthenticatedData": _flip(SAMPLE_AAD)}),
        ("aad-removed", {**good, "additionalAuthenticatedData": None}),
        ("metadata", {**good, "ciphertextMetadata": changed_metadata}),
        ("metadata-removed", {**good, "ciphertextMetadata": None} if sealed.metadata else None),
    ]


def check_iv_uniqueness(run: Run) -> None:
    """Run last, after the latency burst has added its IVs."""
    ivs = run.ivs
    if len(ivs) < 2:
        run.skip("crypto/iv-unique", "IVs unique across calls", "fewer than two IVs collected")
        return
    repeats = {iv: n for iv, n in Counter(ivs).items() if n > 1}
    actual = (f"{len(ivs)} IVs, all distinct" if not repeats else
              f"{sum(repeats.values())} of {len(ivs)} IVs repeat (e.g. {next(iter(repeats)).hex()} x{max(repeats.values())})")
    run.check("crypto/iv-unique", "IVs unique across calls", ok=not repeats,
              expected=f"no IV repeated across {len(ivs)} encryptions", actual=actual,
              kms=Outcome("OK", "AES-GCM stays secure under this key") if not repeats else Outcome(
                  "IV_REUSE", "KMS cannot detect this: Encrypt succeeds, but a repeated AES-GCM IV under one key "
                              "exposes plaintexts and lets the authentication key be recovered"))
