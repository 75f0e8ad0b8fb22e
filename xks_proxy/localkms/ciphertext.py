"""The local KMS's ciphertext blob: versioned, naming its key, authenticated by the key that made it.

    version (1) || kind (1) || key id (16, the UUID's bytes)                         = the header
    kind 1, a key whose material KMS holds (AWS_KMS, EXTERNAL):
        header || iv (12) || tag (16) || ciphertext
    kind 2, a key in an external key store (double encryption, as KMS does):
        header || u8 len || proxy IV || u8 len || proxy tag || u8 len || ciphertextMetadata || proxy ciphertext
        where the proxy ciphertext is the proxy's encryption of the inner blob iv || tag || ciphertext

The inner AES-GCM (the KMS-side key of the KMS key) binds header || encryption context as AAD,
so a blob moved to another key, another kind or another encryption context does not open. The
proxy is given SHA-256 of the same bytes as its AAD: a blob is useless without both keys. The
format is opaque to callers; a malformed one is InvalidCiphertextException.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

from xks_proxy.localkms.errors import invalid_ciphertext

VERSION = 1
LOCAL, DOUBLE = 1, 2
IV, TAG = 12, 16
_HEADER = 2 + 16


@dataclass(frozen=True)
class Blob:
    kind: int
    key_id: str
    header: bytes
    #: kind 1: iv || tag || ciphertext (the inner blob); kind 2: the proxy's ciphertext of it
    body: bytes
    proxy_iv: bytes = b""
    proxy_tag: bytes = b""
    proxy_metadata: bytes | None = None


def header(kind: int, key_id: str) -> bytes:
    return bytes([VERSION, kind]) + uuid.UUID(key_id).bytes


def context_bytes(context: dict[str, str] | None) -> bytes:
    """The encryption context, canonical: pairs sorted by key, each length-prefixed (order-free, unambiguous)."""
    out = bytearray()
    for key, value in sorted((context or {}).items()):
        for text in (key, value):
            raw = text.encode()
            out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def aad(head: bytes, context: dict[str, str] | None) -> bytes:
    return head + context_bytes(context)


def proxy_aad(head: bytes, context: dict[str, str] | None) -> bytes:
    return hashlib.sha256(aad(head, context)).digest()


def inner(iv: bytes, tag: bytes, ct: bytes) -> bytes:
    return iv + tag + ct


def split_inner(data: bytes) -> tuple[bytes, bytes, bytes]:
    if len(data) < IV + TAG:
        raise invalid_ciphertext("the ciphertext is malformed")
    return data[:IV], data[IV : IV + TAG], data[IV + TAG :]


def encode_local(head: bytes, iv: bytes, tag: bytes, ct: bytes) -> bytes:
    return head + inner(iv, tag, ct)


def encode_double(head: bytes, iv: bytes, tag: bytes, metadata: bytes | None, ct: bytes) -> bytes:
    meta = metadata or b""
    if len(iv) > 255 or len(tag) > 255 or len(meta) > 255:
        raise invalid_ciphertext("the proxy's IV, tag or metadata is too long to keep")
    return head + bytes([len(iv)]) + iv + bytes([len(tag)]) + tag + bytes([len(meta)]) + meta + ct


def decode(blob: bytes) -> Blob:
    """The parts of a blob. InvalidCiphertextException when it is not one of ours."""
    if len(blob) < _HEADER + 1 or blob[0] != VERSION or blob[1] not in (LOCAL, DOUBLE):
        raise invalid_ciphertext("the ciphertext is not a KMS ciphertext blob of this local KMS")
    head, rest = blob[:_HEADER], blob[_HEADER:]
    key_id = str(uuid.UUID(bytes=head[2:]))
    if blob[1] == LOCAL:
        split_inner(rest)
        return Blob(LOCAL, key_id, head, rest)
    parts: list[bytes] = []
    for _ in range(3):
        if not rest:
            raise invalid_ciphertext("the ciphertext is truncated")
        length, rest = rest[0], rest[1:]
        if len(rest) < length:
            raise invalid_ciphertext("the ciphertext is truncated")
        parts.append(rest[:length])
        rest = rest[length:]
    if not rest:
        raise invalid_ciphertext("the ciphertext is truncated")
    return Blob(DOUBLE, key_id, head, rest, parts[0], parts[1], parts[2] or None)
