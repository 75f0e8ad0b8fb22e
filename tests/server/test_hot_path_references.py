"""The hot path's own versions of library functions, checked against the library on many inputs.

Each was rewritten for speed (issue 16); each must give exactly what the reference gives, for
valid and invalid input alike:
- `protocol._b64` decodes with binascii's strict mode and falls back to
  `base64.b64decode(validate=True)` for what strict mode refuses;
- `crypto.bind_aad` builds the AAD with a copied SHA-256 context and a length table instead of
  `hashlib.sha256()` and `struct.pack`;
- `crypto.checked_iv` compares with a zero IV instead of `any()`;
- `protocol.api_target` caches the API path's parse (short paths only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import string
import struct

import pytest

from keymanager import crypto
from xks_proxy import protocol
from xks_proxy.errors import InternalException, ValidationException

ALPHABET = string.ascii_letters + string.digits + "+/"
#: Characters that break base64 in every way we know of: padding, URL-safe, whitespace, non-ASCII.
NOISE = "=-_ \n\t.\x00é€"


def _reference_b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _ours_b64(value: str) -> bytes | None:
    try:
        return protocol._b64({"field": value}, "field", required=True)
    except ValidationException:
        return None


def _mutations(rng: random.Random) -> list[str]:
    raw = rng.randbytes(rng.choice([0, 1, 2, 3, 12, 16, 31, 256]))
    valid = base64.b64encode(raw).decode()
    out = [valid, valid.rstrip("="), valid + "=", valid + "==", "=" + valid, valid + "A", valid[:-1]]
    for _ in range(4):
        chars = list(valid)
        where = rng.randrange(len(chars) + 1)
        chars.insert(where, rng.choice(NOISE + ALPHABET))
        out.append("".join(chars))
    out.append("".join(rng.choice(ALPHABET + "=") for _ in range(rng.randrange(0, 12))))
    return out


def test_base64_fast_path_agrees_with_b64decode_validate_on_valid_and_invalid_input() -> None:
    rng = random.Random(16)
    cases = ["", "=", "==", "===", "A", "AA", "AA=", "AA==", "AAA=", "AAAA", "A===", "AA==AA", "AAAA====", "=AAA", "AA=A",
             " AAAA", "AAAA\n", "AB==", "AB=="]  # fmt: skip
    for _ in range(3000):
        cases.extend(_mutations(rng))
    decoded = refused = 0
    for value in cases:
        expected = _reference_b64(value)
        assert _ours_b64(value) == expected, repr(value)
        decoded += expected is not None
        refused += expected is None
    assert decoded > 3000 and refused > 3000  # both sides of the rule were exercised


def _reference_bind_aad(aad: bytes | None, metadata: bytes | None) -> bytes:
    """The AWS sample proxy's construction, as it was written here before (hashlib and struct)."""
    parts = [b"\x00\x00"] if aad is None else [struct.pack(">H", len(aad) & 0xFFFF), hashlib.sha256(aad).digest()]
    meta = metadata or b""
    return b"".join([*parts, struct.pack(">B", len(meta)), meta])


def test_bind_aad_agrees_with_the_hashlib_and_struct_construction() -> None:
    rng = random.Random(7)
    for i in range(3000):
        aad = None if i % 4 == 0 else rng.randbytes(rng.choice([0, 1, 64, 300, 8192, 65535, 65536, 70000]))
        metadata = rng.choice([None, b"", rng.randbytes(4), rng.randbytes(20), rng.randbytes(255)])
        assert crypto.bind_aad(aad, metadata) == _reference_bind_aad(aad, metadata)
    # The copied context is never changed: the same input gives the same bytes after many uses.
    assert crypto.bind_aad(b"x", b"\x01") == _reference_bind_aad(b"x", b"\x01")


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_checked_iv_refuses_zero_and_wrong_length_and_passes_others_as_bytes(kind: type) -> None:
    with pytest.raises(InternalException, match="all-zero"):
        crypto.checked_iv(kind(12), "test")
    for size in (0, 11, 13, 16):
        with pytest.raises(InternalException, match=f"{size}-byte IV"):
            crypto.checked_iv(kind(b"\x01" * size), "test")
    iv = kind(b"\x00" * 11 + b"\x01")
    out = crypto.checked_iv(iv, "test")
    assert out == bytes(iv) and type(out) is bytes
    fresh = {crypto.new_iv() for _ in range(1000)}
    assert len(fresh) == 1000 and all(len(v) == 12 for v in fresh)


def test_api_target_parses_like_the_regex_and_keeps_no_long_path() -> None:
    """The route's cache gives what the regex says, and a flood of long invented paths cannot grow it."""
    paths = ["/kms/xks/v1/health", "/a/b/kms/xks/v1/keys/k-1.x_y/encrypt", "/p/kms/xks/v1/keys/k/decrypt",
             "/p/kms/xks/v1/keys/k/metadata", "/p/kms/xks/v1/keys/bad key/encrypt", "/p/kms/xks/v1/keys/k/sign",
             "/p/kms/xks/v2/health", "/p/kms/xks/v1/keys/" + "k" * 129 + "/encrypt", ""]  # fmt: skip
    for path in paths:
        match = protocol.API_PATH.match(path)
        target = protocol.api_target(path)
        assert (target is None) == (match is None), path
        if match is not None and target is not None:
            assert target.prefix == (match["prefix"] or "") and target.key_id == match["key"]
            assert target.operation == ("health" if match["health"] else match["op"])
            assert target.key_id_ok == (match["key"] is None or _key_id_ok(match["key"]))
    before = protocol._api_target.cache_info().currsize
    for i in range(200):
        long_path = f"/{'x' * 600}{i}/kms/xks/v1/keys/k/encrypt"
        assert protocol.api_target(long_path) == protocol.api_target(long_path)  # parsed, every time
    assert protocol._api_target.cache_info().currsize == before


def _key_id_ok(key_id: str) -> bool:
    return 1 <= len(key_id) <= 128 and all(c.isascii() and (c.isalnum() or c in "._-") for c in key_id)
