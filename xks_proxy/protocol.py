"""The XKS requests: the API path, and the bodies parsed and validated into typed objects,
before any key is touched.

Rules from the protocol notes: requestMetadata is required (also on health) and must not be
empty; the fields it needs depend on the operation; unknown fields anywhere are ignored;
base64 is standard and padded; algorithms are exact names. Limits from the configuration turn
over-large inputs into UnsupportedOperationException. Messages name the field, never its value.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from binascii import a2b_base64
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from xks_proxy.config import KEY_ID_RE, Limits
from xks_proxy.errors import InvalidCiphertextException, UnsupportedOperationException, ValidationException

API_PATH = re.compile(r"^(?:/(?P<prefix>.+?))?/kms/xks/v1/(?:(?P<health>health)|keys/(?P<key>[^/]+)/(?P<op>metadata|encrypt|decrypt))$")


class ApiTarget(NamedTuple):
    """What an XKS API path names: the store's prefix, the operation, and the key id (None for health)."""

    prefix: str
    operation: str
    key_id: str | None
    key_id_ok: bool


def api_target(path: str) -> ApiTarget | None:
    """The parse of an API path (None: not one), the same for every request to it.

    Cached: a proxy sees few distinct paths (store x key x operation). Only paths of up to
    _CACHED_PATH_CHARS are kept (every real one is shorter), so a flood of long invented paths
    cannot hold more than 4,096 x 512 characters."""
    return _api_target(path) if len(path) <= _CACHED_PATH_CHARS else _api_target.__wrapped__(path)


_CACHED_PATH_CHARS = 512


@lru_cache(maxsize=4096)
def _api_target(path: str) -> ApiTarget | None:
    match = API_PATH.match(path)
    if match is None:
        return None
    key_id = match["key"]
    operation = "health" if match["health"] else match["op"]
    return ApiTarget(match["prefix"] or "", operation, key_id, key_id is None or KEY_ID_RE.match(key_id) is not None)


MAX_METADATA_BYTES = 20
_OPTIONAL_METADATA = ("kmsKeyArn", "kmsViaService", "awsSourceVpc", "awsSourceVpce")
_REQUIRED_METADATA = {
    "health": ("kmsRequestId", "kmsOperation"),
    "metadata": ("kmsRequestId", "kmsOperation", "awsPrincipalArn"),
    "encrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
    "decrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
}


# The parsed bodies are NamedTuples: immutable like a frozen dataclass, and built in a third of
# the time (a frozen dataclass's __init__ sets each field through object.__setattr__).
class RequestMetadata(NamedTuple):
    kms_request_id: str
    kms_operation: str
    aws_principal_arn: str | None = None
    kms_key_arn: str | None = None
    kms_via_service: str | None = None
    aws_source_vpc: str | None = None
    aws_source_vpce: str | None = None


class EncryptRequest(NamedTuple):
    plaintext: bytes
    aad: bytes | None
    want_cdiv: bool


class DecryptRequest(NamedTuple):
    ciphertext: bytes
    iv: bytes
    tag: bytes
    aad: bytes | None
    metadata: bytes | None


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValidationException("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ValidationException("request body must be a JSON object")
    return doc


def request_metadata(doc: dict[str, Any], operation: str) -> RequestMetadata:
    meta = doc.get("requestMetadata")
    if meta is None:
        raise ValidationException("requestMetadata is required")
    if not isinstance(meta, dict) or not meta:
        raise ValidationException("requestMetadata must be a non-empty object")
    get = meta.get
    for name in _REQUIRED_METADATA[operation]:
        value = get(name)
        if not isinstance(value, str) or not value:
            raise ValidationException(f"requestMetadata.{name} is required and must be a non-empty string")
    key_arn, via, vpc, vpce = get("kmsKeyArn"), get("kmsViaService"), get("awsSourceVpc"), get("awsSourceVpce")
    for name, value in zip(_OPTIONAL_METADATA, (key_arn, via, vpc, vpce)):
        if value is not None and not isinstance(value, str):
            raise ValidationException(f"requestMetadata.{name} must be a string")
    principal = get("awsPrincipalArn")
    if isinstance(principal, str) and len(principal) > 2048:
        raise ValidationException("requestMetadata.awsPrincipalArn is longer than 2048 characters")
    return RequestMetadata(meta["kmsRequestId"], meta["kmsOperation"], principal, key_arn, via, vpc, vpce)


def _b64(doc: dict[str, Any], name: str, required: bool) -> bytes | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise ValidationException(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise ValidationException(f"{name} must be a base64 string")
    try:
        return a2b_base64(value, strict_mode=True)  # under half of b64decode(validate=True)'s time on short fields
    except (binascii.Error, ValueError):
        pass
    try:  # what strict mode refuses, the reference decides (tests/server/test_hot_path_references.py: they agree)
        return b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationException(f"{name} is not valid standard base64") from None


def _algorithm(doc: dict[str, Any], name: str, expected: str, required: bool) -> bool:
    value = doc.get(name)
    if value is None:
        if required:
            raise ValidationException(f"{name} is required")
        return False
    if value != expected:
        raise ValidationException(f"{name} must be {expected}")
    return True


def _aad(doc: dict[str, Any], limits: Limits) -> bytes | None:
    aad = _b64(doc, "additionalAuthenticatedData", required=False)
    if aad is not None and len(aad) > limits.max_aad_bytes:
        raise UnsupportedOperationException(
            f"additionalAuthenticatedData is {len(aad)} bytes; this proxy accepts up to {limits.max_aad_bytes}"
        )
    return aad


def encrypt_request(doc: dict[str, Any], limits: Limits) -> EncryptRequest:
    plaintext = _b64(doc, "plaintext", required=True)
    assert plaintext is not None
    if len(plaintext) > limits.max_plaintext_bytes:
        raise UnsupportedOperationException(
            f"plaintext is {len(plaintext)} bytes; this proxy accepts up to {limits.max_plaintext_bytes}"
        )
    _algorithm(doc, "encryptionAlgorithm", "AES_GCM", required=True)
    want_cdiv = _algorithm(doc, "ciphertextDataIntegrityValueAlgorithm", "SHA_256", required=False)
    return EncryptRequest(plaintext=plaintext, aad=_aad(doc, limits), want_cdiv=want_cdiv)


def decrypt_request(doc: dict[str, Any], limits: Limits) -> DecryptRequest:
    _algorithm(doc, "encryptionAlgorithm", "AES_GCM", required=True)
    ciphertext = _b64(doc, "ciphertext", required=True)
    iv = _b64(doc, "initializationVector", required=True)
    tag = _b64(doc, "authenticationTag", required=True)
    metadata = _b64(doc, "ciphertextMetadata", required=False)
    assert ciphertext is not None and iv is not None and tag is not None
    if len(ciphertext) > limits.max_plaintext_bytes:
        raise UnsupportedOperationException(
            f"ciphertext is {len(ciphertext)} bytes; this proxy accepts up to {limits.max_plaintext_bytes}"
        )
    if len(iv) not in (12, 16):
        raise InvalidCiphertextException(f"initializationVector is {len(iv)} bytes; it must be 12 or 16")
    if len(tag) != 16:
        raise InvalidCiphertextException(f"authenticationTag is {len(tag)} bytes; it must be 16")
    if metadata is not None and len(metadata) > MAX_METADATA_BYTES:
        raise InvalidCiphertextException(f"ciphertextMetadata is {len(metadata)} bytes; at most 20 are possible")
    return DecryptRequest(ciphertext=ciphertext, iv=iv, tag=tag, aad=_aad(doc, limits), metadata=metadata)


def dumps(doc: dict[str, Any]) -> bytes:
    """One line of JSON. Handlers leave absent fields out of `doc` rather than set them to None."""
    return orjson.dumps(doc)
