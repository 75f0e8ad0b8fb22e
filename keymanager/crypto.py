"""The dangerous parts, in one small module: raw key bytes, IVs, AES-GCM, sealing under the master key.

Nothing else in the project touches raw key material or chooses an IV. Backends that keep keys
in memory hold `DataKey` objects (which never print their bytes); an HSM backend uses only
`bind_aad` and `checked_iv` (the HSM makes the IV; we refuse a bad one). Sealing wraps secrets (key material, credentials) under the master key
with AES-256-GCM and a context string bound as AAD, so a sealed blob cannot be moved to another
key id, version or purpose.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from xks_proxy.errors import InternalException, InvalidCiphertextException

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
_SEAL_VERSION = b"\x01"


def bind_aad(aad: bytes | None, metadata: bytes | None) -> bytes:
    """The AAD handed to AES-GCM, exactly as the AWS sample proxy builds it.

    uint16_be(len(aad)) || SHA-256(aad) [only if the aad field is present, even empty]
    || uint8(len(metadata)) || metadata. Binding lengths keeps the caller's AAD and our
    metadata from shifting into each other. Changing this breaks every old ciphertext.
    """
    parts = []
    if aad is None:
        parts.append(b"\x00\x00")
    else:
        parts.append(struct.pack(">H", len(aad) & 0xFFFF))
        parts.append(hashlib.sha256(aad).digest())
    meta = metadata or b""
    parts.append(struct.pack(">B", len(meta)))
    parts.append(meta)
    return b"".join(parts)


def cdiv(aad: bytes | None, metadata: bytes | None, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """Ciphertext data integrity value: SHA-256(AAD || metadata || IV || ciphertext || tag)."""
    digest = hashlib.sha256()
    for part in (aad or b"", metadata or b"", iv, ciphertext, tag):
        digest.update(part)
    return digest.digest()


def new_iv() -> bytes:
    """A fresh random 96-bit IV. Never all zeros (a broken RNG must not pass silently)."""
    return checked_iv(os.urandom(IV_BYTES), "the random number generator")


def checked_iv(iv: bytes, source: str) -> bytes:
    """An IV made elsewhere (our RNG, an HSM's C_GenerateRandom, an HSM's own GCM): 12 bytes, never all zeros.

    An all-zero IV means a generator that did nothing (e.g. an HSM that leaves the zero IV buffer
    untouched): answering with it would reuse one IV for every ciphertext under the key.
    """
    if len(iv) != IV_BYTES:
        raise InternalException(f"{source} produced a {len(iv)}-byte IV; AES-GCM here uses {IV_BYTES} bytes")
    if not any(iv):
        raise InternalException(f"{source} produced an all-zero IV; refusing to use it")
    return bytes(iv)


def new_key_bytes() -> bytes:
    return os.urandom(KEY_BYTES)


class DataKey:
    """An AES-256 key ready for GCM. Holds the bytes only inside the cipher object."""

    __slots__ = ("_gcm", "fingerprint")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise InternalException("key material has the wrong length")
        self._gcm = AESGCM(material)
        # Identifies material without revealing it (used to tell "same material" on import).
        self.fingerprint = hashlib.sha256(b"xks-proxy key fingerprint" + material).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"DataKey(fingerprint={self.fingerprint})"

    def encrypt(self, plaintext: bytes, aad: bytes | None, metadata: bytes) -> tuple[bytes, bytes, bytes]:
        """Returns (iv, ciphertext, tag)."""
        iv = new_iv()
        sealed = self._gcm.encrypt(iv, plaintext, bind_aad(aad, metadata))
        return iv, sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]

    def decrypt(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes | None, metadata: bytes | None) -> bytes:
        try:
            return self._gcm.decrypt(iv, ciphertext + tag, bind_aad(aad, metadata))
        except InvalidTag:
            raise InvalidCiphertextException("authentication failed: ciphertext, IV, tag, AAD or metadata do not match") from None


class MasterKey:
    """The key every secret at rest is sealed under. Loaded from a 0600 file or the environment."""

    __slots__ = ("_gcm",)

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError("the master key must be 32 bytes (base64 of 32 random bytes)")
        self._gcm = AESGCM(material)

    def __repr__(self) -> str:
        return "MasterKey(<hidden>)"

    @classmethod
    def from_text(cls, text: str) -> "MasterKey":
        try:
            material = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ValueError("the master key is not valid base64") from None
        return cls(material)

    @staticmethod
    def generate_text() -> str:
        return base64.b64encode(new_key_bytes()).decode() + "\n"

    def seal(self, secret: bytes, context: str) -> bytes:
        """version || iv || AES-GCM(secret, aad=context). `context` names what is sealed."""
        iv = new_iv()
        return _SEAL_VERSION + iv + self._gcm.encrypt(iv, secret, context.encode())

    def unseal(self, blob: bytes, context: str) -> bytes:
        if len(blob) < 1 + IV_BYTES + TAG_BYTES or blob[:1] != _SEAL_VERSION:
            raise ValueError(f"sealed value for {context} is malformed")
        try:
            return self._gcm.decrypt(blob[1 : 1 + IV_BYTES], blob[1 + IV_BYTES :], context.encode())
        except InvalidTag:
            raise ValueError(f"sealed value for {context} does not open under this master key") from None

    def seal_text(self, secret: str, context: str) -> str:
        return base64.b64encode(self.seal(secret.encode(), context)).decode()

    def unseal_text(self, sealed: str, context: str) -> str:
        try:
            blob = base64.b64decode(sealed, validate=True)
        except ValueError:
            raise ValueError(f"sealed value for {context} is not base64") from None
        return self.unseal(blob, context).decode()

    def data_key(self, sealed: bytes, context: str) -> DataKey:
        return DataKey(self.unseal(sealed, context))

    def seal_new_key(self, context: str, material: bytes | None = None) -> tuple[bytes, DataKey]:
        """Generate (or take) key material, returning it sealed and as a ready DataKey."""
        material = material if material is not None else new_key_bytes()
        return self.seal(material, context), DataKey(material)
