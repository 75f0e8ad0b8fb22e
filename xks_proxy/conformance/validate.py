"""Strict readings of every proxy response, as KMS reads them.

Each function returns the list of problems found (empty when KMS would accept the response), in
words an operator can act on. `classify` turns one reply into the single observation the
outcome table understands: OK, a transport failure, TIMEOUT past KMS's budget, a well-formed
errorName, or INVALID_RESPONSE when KMS could not interpret what came back.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from keymanager.crypto import cdiv as compute_cdiv
from xks_proxy.conformance import outcomes
from xks_proxy.conformance.client import Reply
from xks_proxy.errors import ALL_ERRORS

ERROR_STATUS: dict[str, int] = {error.name: error.status for error in ALL_ERRORS}
HEALTH_STATES = ("ACTIVE", "DEGRADED", "UNAVAILABLE")
KEY_STATES = ("ENABLED", "DISABLED")
_B64 = re.compile(r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_MAX_MESSAGE = 511


def show(value: Any, limit: int = 60) -> str:
    """A value for a report line: short, and JSON-ish so types are visible."""
    text = "absent" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def timing(reply: Reply) -> str:
    if reply.first_try_ms is not None:
        return f"{reply.first_try_ms:.0f} ms, retried: {reply.elapsed_ms:.0f} ms"
    return f"{reply.elapsed_ms:.0f} ms"


def classify(reply: Reply, budget_ms: float) -> tuple[str, str]:
    """(kind, what came back). A well-formed error's kind is its errorName."""
    if reply.failure:
        return reply.failure, reply.detail
    if reply.elapsed_ms > budget_ms:
        return outcomes.TIMEOUT, f"HTTP {reply.status} after {timing(reply)}; KMS gives up after {budget_ms:.0f} ms"
    if reply.status == 200:
        return outcomes.OK, f"HTTP 200 ({timing(reply)})"
    body = reply.json()
    name = body.get("errorName") if isinstance(body, dict) else None
    problems = error_body_problems(reply)
    if problems:
        return outcomes.INVALID_RESPONSE, f"HTTP {reply.status} {name or ''}: {'; '.join(problems)}".replace("  ", " ")
    return str(name), f"HTTP {reply.status} {name}"


def error_body_problems(reply: Reply) -> list[str]:
    """One line of JSON, a known errorName with its own HTTP status, a printable short message."""
    problems = []
    if b"\n" in reply.body.rstrip(b"\r\n") or b"\r" in reply.body.rstrip(b"\r\n"):
        problems.append("error body spans several lines (expected one line of JSON)")
    body = reply.json()
    if not isinstance(body, dict):
        return problems + [f"error body is not a JSON object: {show(reply.body[:40])}"]
    name = body.get("errorName")
    if not isinstance(name, str) or name not in ERROR_STATUS:
        problems.append(f"errorName {show(name)} is not an XKS error name")
    elif ERROR_STATUS[name] != reply.status:
        problems.append(f"{name} must come with HTTP {ERROR_STATUS[name]}, came with {reply.status}")
    message = body.get("errorMessage")
    if message is not None:
        if not isinstance(message, str):
            problems.append("errorMessage is not a string")
        else:
            if len(message) > _MAX_MESSAGE:
                problems.append(f"errorMessage is {len(message)} characters (must be under 512)")
            if any(not 32 <= ord(ch) < 127 for ch in message):
                problems.append("errorMessage has characters outside printable ASCII")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def health_problems(body: Any) -> list[str]:
    """GetHealthStatus: types, ranges, 1-10 fleet entries with known states."""
    if not isinstance(body, dict):
        return ["response is not a JSON object"]
    problems = []
    size = body.get("xksProxyFleetSize")
    if not _is_int(size) or size < 1:
        problems.append(f"xksProxyFleetSize must be an integer > 0, got {show(size)}")
    for name in ("xksProxyVendor", "xksProxyModel", "ekmVendor"):
        if not isinstance(body.get(name), str):
            problems.append(f"{name} must be a string, got {show(body.get(name))}")
    fleet = body.get("ekmFleetDetails")
    if not isinstance(fleet, list):
        return problems + [f"ekmFleetDetails must be a list, got {show(fleet)}"]
    if not 1 <= len(fleet) <= 10:
        problems.append(f"ekmFleetDetails must have 1 to 10 entries, has {len(fleet)}")
    for index, entry in enumerate(fleet):
        problems.extend(_fleet_entry_problems(index, entry))
    return problems


def _fleet_entry_problems(index: int, entry: Any) -> list[str]:
    where = f"ekmFleetDetails[{index}]"
    if not isinstance(entry, dict):
        return [f"{where} is not an object"]
    problems = [f"{where}.{name} must be a string, got {show(entry.get(name))}"
                for name in ("id", "model") if not isinstance(entry.get(name), str)]
    if entry.get("healthStatus") not in HEALTH_STATES:
        problems.append(f"{where}.healthStatus must be one of {', '.join(HEALTH_STATES)}, got {show(entry.get('healthStatus'))}")
    return problems


def fleet_states(body: Any) -> list[str]:
    fleet = body.get("ekmFleetDetails") if isinstance(body, dict) else None
    return [entry.get("healthStatus") for entry in fleet or [] if isinstance(entry, dict)]


def health_verdict(body: Any) -> tuple[str, str]:
    """The kind of a 200 GetHealthStatus answer: OK, INVALID_RESPONSE, or ALL_UNAVAILABLE (KMS will not connect)."""
    problems = health_problems(body)
    if problems:
        return outcomes.INVALID_RESPONSE, "; ".join(problems)
    states = fleet_states(body)
    if all(state == "UNAVAILABLE" for state in states):
        return outcomes.ALL_UNAVAILABLE, f"all {len(states)} ekmFleetDetails entries are UNAVAILABLE"
    return outcomes.OK, f"fleet size {body['xksProxyFleetSize']}, vendor {body['xksProxyVendor']!r}, ekm {', '.join(states)}"


def metadata_verdict(body: Any) -> tuple[str, str]:
    """The kind of a 200 GetKeyMetadata answer: OK, INVALID_RESPONSE, or KEY_CONFIG (CreateKey refuses the key)."""
    malformed, unusable = metadata_problems(body)
    if malformed:
        return outcomes.INVALID_RESPONSE, "; ".join(malformed)
    if unusable:
        return outcomes.KEY_CONFIG, "; ".join(unusable)
    return outcomes.OK, f"{body['keySpec']}, keyUsage {body['keyUsage']}, {body['keyStatus']}"


def metadata_problems(body: Any) -> tuple[list[str], list[str]]:
    """(malformed, unusable): shape errors KMS cannot read, and a key CreateKey refuses."""
    if not isinstance(body, dict):
        return ["response is not a JSON object"], []
    malformed, unusable = [], []
    spec, usage, status = body.get("keySpec"), body.get("keyUsage"), body.get("keyStatus")
    if not isinstance(spec, str):
        malformed.append(f"keySpec must be a string, got {show(spec)}")
    elif spec != "AES_256":
        unusable.append(f"keySpec is {spec}, KMS needs AES_256")
    if not isinstance(usage, list) or not all(isinstance(u, str) for u in usage):
        malformed.append(f"keyUsage must be a list of strings, got {show(usage)}")
    else:
        if len(usage) > 10:
            malformed.append(f"keyUsage has {len(usage)} values, at most 10 allowed")
        missing = [u for u in ("ENCRYPT", "DECRYPT") if u not in usage]
        if missing:
            unusable.append(f"keyUsage {usage} lacks {' and '.join(missing)}")
    if status not in KEY_STATES:
        malformed.append(f"keyStatus must be ENABLED or DISABLED, got {show(status)}")
    elif status != "ENABLED":
        unusable.append(f"keyStatus is {status}")
    return malformed, unusable


@dataclass(frozen=True)
class Sealed:
    """A decoded Encrypt response, ready to be sent back to Decrypt."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    metadata: bytes | None
    cdiv: bytes | None

    def decrypt_fields(self, aad: bytes | None) -> dict[str, bytes | None]:
        return {"ciphertext": self.ciphertext, "initializationVector": self.iv, "authenticationTag": self.tag,
                "additionalAuthenticatedData": aad, "ciphertextMetadata": self.metadata}


ENCRYPT_ASPECTS = ("encoding", "ciphertext", "iv", "tag", "metadata", "cdiv")


def decode_b64(body: dict, name: str, required: bool) -> tuple[bytes | None, str | None]:
    """Standard RFC 4648 base64, padded; URL-safe or unpadded text is a problem KMS would hit."""
    value = body.get(name)
    if value is None:
        return None, (f"{name} is missing" if required else None)
    if not isinstance(value, str):
        return None, f"{name} is not a string"
    if not _B64.match(value):
        return None, f"{name} is not standard padded base64"
    return base64.b64decode(value), None


def encrypt_problems(body: Any, plaintext: bytes, aad: bytes | None, want_cdiv: bool) -> tuple[Sealed | None, dict[str, list[str]]]:
    """Decode and judge an Encrypt response field by field. Sealed is None if it cannot be decrypted."""
    problems: dict[str, list[str]] = {aspect: [] for aspect in ENCRYPT_ASPECTS}
    if not isinstance(body, dict):
        problems["encoding"].append("response is not a JSON object")
        return None, problems
    decoded = {}
    for field, aspect, required in (("ciphertext", "ciphertext", True), ("initializationVector", "iv", True),
                                    ("authenticationTag", "tag", True), ("ciphertextMetadata", "metadata", False),
                                    ("ciphertextDataIntegrityValue", "cdiv", want_cdiv)):
        decoded[aspect], problem = decode_b64(body, field, required)
        if problem:
            problems["encoding" if "base64" in problem or "string" in problem else aspect].append(problem)
    _judge_fields(decoded, plaintext, problems)
    if want_cdiv and None not in (decoded["cdiv"], decoded["iv"], decoded["ciphertext"], decoded["tag"]):
        expected = compute_cdiv(aad, decoded["metadata"], decoded["iv"], decoded["ciphertext"], decoded["tag"])
        if decoded["cdiv"] != expected:
            problems["cdiv"].append("ciphertextDataIntegrityValue is not SHA-256(AAD || metadata || IV || ciphertext || tag)")
    if None in (decoded["ciphertext"], decoded["iv"], decoded["tag"]):
        return None, problems
    sealed = Sealed(decoded["ciphertext"], decoded["iv"], decoded["tag"], decoded["metadata"], decoded["cdiv"])
    return sealed, problems


def _judge_fields(decoded: dict[str, bytes | None], plaintext: bytes, problems: dict[str, list[str]]) -> None:
    ciphertext, iv, tag, metadata = decoded["ciphertext"], decoded["iv"], decoded["tag"], decoded["metadata"]
    if ciphertext is not None and len(ciphertext) != len(plaintext):
        problems["ciphertext"].append(f"ciphertext is {len(ciphertext)} bytes for {len(plaintext)} bytes of plaintext")
    elif ciphertext is not None and len(plaintext) >= 16 and ciphertext == plaintext:
        problems["ciphertext"].append("ciphertext equals the plaintext")
    if iv is not None and len(iv) not in (12, 16):
        problems["iv"].append(f"initializationVector is {len(iv)} bytes (must be 12 or 16)")
    if iv is not None and not any(iv):
        problems["iv"].append("initializationVector is all zeros")
    if tag is not None and len(tag) != 16:
        problems["tag"].append(f"authenticationTag is {len(tag)} bytes (must be 16)")
    if metadata is not None and len(metadata) > 20:
        problems["metadata"].append(f"ciphertextMetadata is {len(metadata)} bytes (at most 20)")
