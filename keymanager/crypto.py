"""The dangerous parts: raw key bytes, IVs, AES-GCM, the master key and what it is sealed under.

Over 400 lines because it is one cohesive thing on purpose: the wall around raw key material
(pyca/cryptography's hazmat idea), the key hierarchy from a seal's KEK down to data keys. Its one
sibling, `keymanager.crypto_transfer`, holds what moves key material in or out (BYOK wrapping
keys, import tokens, backups) and touches raw bytes only through this module's classes.

Nothing else in the project touches raw key material or chooses an IV. Backends that keep keys
in memory hold `DataKey` objects (which never print their bytes); an HSM backend uses only
`bind_aad` and `checked_iv` (the HSM makes the IV; we refuse a bad one). Sealing wraps secrets (key material, credentials) under the master key
with AES-256-GCM and a context string bound as AAD, so a sealed blob cannot be moved to another
key id, version or purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from xks_proxy.errors import InternalException, InvalidCiphertextException

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
_SEAL_VERSION = b"\x01"
_LINK_CONTEXT = "xks-proxy next master key "


def bind_aad(aad: bytes | None, metadata: bytes | None) -> bytes:
    """The AAD handed to AES-GCM, exactly as the AWS sample proxy builds it.

    uint16_be(len(aad)) || SHA-256(aad) [only if the aad field is present, even empty]
    || uint8(len(metadata)) || metadata. Binding lengths keeps the caller's AAD and our
    metadata from shifting into each other. Changing this breaks every old ciphertext.
    (Runs on every request: the digest copies a ready SHA-256 context, as sigv4 does.)
    """
    meta = metadata or b""
    if aad is None:
        return b"\x00\x00" + _LENGTH_BYTE[len(meta)] + meta
    digest = _SHA256.copy()
    digest.update(aad)
    return (len(aad) & 0xFFFF).to_bytes(2, "big") + digest.digest() + _LENGTH_BYTE[len(meta)] + meta


#: OpenSSL 3 looks a digest up by name each time hashlib.sha256() makes a context; copying one is cheaper.
_SHA256 = hashlib.sha256()
#: uint8(n) for the metadata's length (our metadata is at most 20 bytes; 256 or more raises IndexError).
_LENGTH_BYTE = [bytes([n]) for n in range(256)]


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
    iv = bytes(iv)  # the same object when it is bytes already
    if len(iv) != IV_BYTES:
        raise InternalException(f"{source} produced a {len(iv)}-byte IV; AES-GCM here uses {IV_BYTES} bytes")
    if iv == _ZERO_IV:
        raise InternalException(f"{source} produced an all-zero IV; refusing to use it")
    return iv


_ZERO_IV = bytes(IV_BYTES)


def new_key_bytes() -> bytes:
    return os.urandom(KEY_BYTES)


def new_plaintext_data_key(length: int) -> bytes:
    """Random bytes a caller asked for as a data key (the local KMS's GenerateDataKey).

    Unlike every other key here these bytes leave the wall on purpose: returning the plaintext
    data key to the caller is what KMS's GenerateDataKey API does.
    """
    if not 1 <= length <= 1024:
        raise ValueError("a data key is 1 to 1024 bytes")
    return os.urandom(length)


class DataKey:
    """An AES-256 key ready for GCM. Holds the bytes only inside the cipher object."""

    __slots__ = ("_gcm", "_digest", "fingerprint")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise InternalException("key material has the wrong length")
        self._gcm = AESGCM(material)
        # Identifies material without revealing it (used to tell "same material" on import).
        self._digest = hashlib.sha256(b"xks-proxy key fingerprint" + material).digest()
        self.fingerprint = self._digest.hex()[:16]

    def same_material(self, other: "DataKey") -> bool:
        """True when both hold the same bytes (compared by full digest, in constant time)."""
        return hmac.compare_digest(self._digest, other._digest)

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


class _Sealing:
    """What a master key and a keyring both offer on top of `seal`/`unseal`: text forms and data keys."""

    __slots__ = ()

    def seal(self, secret: bytes, context: str) -> bytes:
        raise NotImplementedError

    def unseal(self, blob: bytes, context: str) -> bytes:
        raise NotImplementedError

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


class MasterKey(_Sealing):
    """The key every secret at rest is sealed under. Opened by the home's seal (`keymanager.seal`).

    `key_id` names it without revealing it (the seal's keyring and a rotation refer to it).
    """

    __slots__ = ("_gcm", "_material", "key_id")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError("the master key must be 32 bytes (base64 of 32 random bytes)")
        self._gcm = AESGCM(material)
        self._material = bytes(material)
        self.key_id = hashlib.sha256(b"xks-proxy master key id" + material).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"MasterKey(id={self.key_id})"

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(new_key_bytes())

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

    def seal_new_key(self, context: str, material: bytes | None = None) -> tuple[bytes, DataKey]:
        """Generate (or take) key material, returning it sealed and as a ready DataKey."""
        material = material if material is not None else new_key_bytes()
        return self.seal(material, context), DataKey(material)


# --- seals: the key-encryption key (KEK) the master key is wrapped under ----------------------

ARGON2_DEFAULTS = {"memory_kib": 65536, "iterations": 3, "lanes": 4}


class ShareError(ValueError):
    """A refused unseal share. The message never quotes the share (SLIP-39's own errors do)."""


class Kek:
    """A seal's key-encryption key: the master key rests only wrapped under it (AES-256-GCM).

    Where it comes from is the seal's business (`keymanager.seal`): SLIP-39 shares, Argon2id of a
    passphrase, a file; the HSM seal keeps its KEK in the HSM and has its own class with the same
    `wrap`/`unwrap`. The bytes stay inside the cipher object, as a DataKey's do.
    """

    __slots__ = ("_gcm",)

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_BYTES:
            raise ValueError("a key-encryption key is 32 bytes")
        self._gcm = AESGCM(material)

    def __repr__(self) -> str:
        return "Kek(<hidden>)"

    # where a KEK comes from

    @classmethod
    def generate_shares(cls, threshold: int, count: int) -> tuple["Kek", list[str], int]:
        """A new random KEK, split with SLIP-39 (`shamir-mnemonic`): (kek, mnemonics, identifier)."""
        import shamir_mnemonic

        material = new_key_bytes()
        mnemonics = shamir_mnemonic.generate_mnemonics(1, [(threshold, count)], material)[0]
        return cls(material), mnemonics, share_identifier(mnemonics[0])

    @classmethod
    def from_shares(cls, mnemonics: list[str]) -> "Kek":
        import shamir_mnemonic

        try:
            return cls(shamir_mnemonic.combine_mnemonics(mnemonics))
        except (shamir_mnemonic.MnemonicError, ValueError):
            raise ShareError("these shares do not combine (shares of different vaults or sets?)") from None

    @classmethod
    def from_passphrase(cls, passphrase: bytes, salt: bytes, memory_kib: int, iterations: int, lanes: int) -> "Kek":
        """Argon2id (RFC 9106) of the passphrase; parameters are stored beside the wrapped key."""
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        if not (8 * lanes <= memory_kib <= 4 * 1024 * 1024 and 1 <= iterations <= 64 and 1 <= lanes <= 64 and len(salt) >= 16):
            raise ValueError("the seal's Argon2id parameters are out of range")
        return cls(Argon2id(salt=salt, length=KEY_BYTES, iterations=iterations, lanes=lanes, memory_cost=memory_kib).derive(passphrase))

    @classmethod
    def from_text(cls, text: str) -> "Kek":
        """A KEK kept in a file (the `file` seal): base64 of 32 bytes, as master.key always was."""
        try:
            material = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ValueError("the key file is not valid base64") from None
        if len(material) != KEY_BYTES:
            raise ValueError("the key file must hold base64 of 32 random bytes")
        return cls(material)

    @classmethod
    def of_master(cls, master: MasterKey) -> "Kek":
        """A home from before seals: its master.key is the master key, and also the KEK of its keyring."""
        return cls(master._material)

    # what a KEK does

    def wrap(self, master: MasterKey) -> bytes:
        return self.seal(master._material, "xks-proxy master key " + master.key_id)

    def unwrap(self, blob: bytes, key_id: str) -> MasterKey:
        """The master key `key_id` from its wrapped form. ValueError: another KEK, or altered."""
        master = MasterKey(self.open(blob, "xks-proxy master key " + key_id))
        if master.key_id != key_id:
            raise ValueError("the unwrapped master key is not the one the keyring names")
        return master

    def seal(self, secret: bytes, context: str) -> bytes:
        iv = new_iv()
        return _SEAL_VERSION + iv + self._gcm.encrypt(iv, secret, context.encode())

    def open(self, blob: bytes, context: str) -> bytes:
        if len(blob) < 1 + IV_BYTES + TAG_BYTES or blob[:1] != _SEAL_VERSION:
            raise ValueError("the wrapped master key is malformed")
        try:
            return self._gcm.decrypt(blob[1 : 1 + IV_BYTES], blob[1 + IV_BYTES :], context.encode())
        except InvalidTag:
            raise ValueError("the wrapped master key does not open with this seal (wrong shares or passphrase)") from None


def hsm_wrap(master: MasterKey, encrypt: "Callable[[bytes, bytes, bytes], bytes]") -> bytes:
    """The master key wrapped by an HSM's AES key (the pkcs11 seal): version || iv || ciphertext || tag.

    `encrypt(iv, plaintext, aad)` is AES-256-GCM done by the HSM (`keymanager.seal.hsm`): the
    master key's bytes go to it and nowhere else. The IV is ours, the AAD names the key as `Kek.wrap` does.
    """
    iv = new_iv()
    out = encrypt(iv, master._material, ("xks-proxy master key " + master.key_id).encode())
    if len(out) != KEY_BYTES + TAG_BYTES:
        raise ValueError(f"the HSM returned {len(out)} bytes for the wrapped master key, not {KEY_BYTES + TAG_BYTES}")
    return _SEAL_VERSION + iv + out


def hsm_unwrap(blob: bytes, key_id: str, decrypt: "Callable[[bytes, bytes, bytes], bytes]") -> MasterKey:
    """The master key `key_id` from `hsm_wrap`'s blob; `decrypt(iv, ciphertext || tag, aad)` raises ValueError if it does not open."""
    if len(blob) != 1 + IV_BYTES + KEY_BYTES + TAG_BYTES or blob[:1] != _SEAL_VERSION:
        raise ValueError("the wrapped master key is malformed")
    master = MasterKey(decrypt(blob[1 : 1 + IV_BYTES], blob[1 + IV_BYTES :], ("xks-proxy master key " + key_id).encode()))
    if master.key_id != key_id:
        raise ValueError("the unwrapped master key is not the one the keyring names")
    return master


class Keyring(_Sealing):
    """The opened master keys of a home: the current one seals, every one it holds opens.

    Used wherever a `MasterKey` is (same `seal`/`unseal`/... methods), so the vault, the store
    credentials and backups need not know a rotation exists. Mid-rotation (`keymanager.seal`) it
    holds the new key and the one being retired; a blob that opens under none of them makes it
    re-read the seal record once (another process rotated) through `refresh`, which returns the
    (key id -> wrapped key) map the KEK unwraps. Every new seal first re-reads the record (new
    seals are rare: a key, a version, a credential), so a rotation's new key is what every
    process seals under from the moment the record names it: nothing new is sealed under a key
    being retired after the rotation has re-sealed the vault.
    """

    __slots__ = ("_kek", "_masters", "current", "_refresh", "_refreshed_at", "_lock", "seal_kind")

    def __init__(
        self, kek: "Kek | Any", current: MasterKey, others: tuple[MasterKey, ...] = (), refresh: "Any" = None, seal: str = "file"
    ) -> None:
        self.seal_kind = seal  # the kind of seal that opened it (keymanager.seal)
        self._kek = kek
        self.current = current
        self._masters = {m.key_id: m for m in (current, *others)}
        self._refresh = refresh
        self._refreshed_at = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Keyring(current={self.current.key_id}, keys={len(self._masters)})"

    @property
    def kek(self) -> "Kek | Any":
        return self._kek

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._masters)

    def master(self, key_id: str) -> MasterKey:
        return self._masters[key_id]

    def adopt(self, current_id: str, wrapped: dict[str, bytes], links: dict[str, bytes] | None = None) -> None:
        """Take the record's keys: unwrap those not held yet; drop those it no longer names.

        A new key opens with the KEK, or (a process whose KEK a rekey replaced) through its link:
        the key sealed under the key it succeeded (`link`), which this process still holds.
        """
        masters = {kid: self._masters.get(kid) or self._open_new(kid, blob, (links or {}).get(kid)) for kid, blob in wrapped.items()}
        self._masters = masters
        self.current = masters[current_id]

    def _open_new(self, key_id: str, blob: bytes, link: bytes | None) -> MasterKey:
        try:
            return self._kek.unwrap(blob, key_id)
        except ValueError:
            if link is None:
                raise
        for held in self._masters.values():
            try:
                master = MasterKey(held.unseal(link, _LINK_CONTEXT + key_id))
            except ValueError:
                continue
            if master.key_id == key_id:
                return master
        raise ValueError("a new master key opens neither with this seal nor through a key held")

    def link(self, new: MasterKey) -> bytes:
        """`new` sealed under the current key: how a process whose KEK changed since it opened adopts it."""
        return self.current.seal(new._material, _LINK_CONTEXT + new.key_id)

    def _try_refresh(self, throttle: bool = True) -> bool:
        """Re-read the record; True if the keys held are now as new as it makes them (worth a retry).

        One thread reads at a time, the others wait for it (a vault reload and a stores reload
        meet a rotation together); a read within 0.2 s of the last one is skipped, as the keys
        are as new as that one made them: a blob that opens under no key costs one read.
        """
        import time

        if self._refresh is None:
            return False
        with self._lock:
            if throttle and time.monotonic() - self._refreshed_at < 0.2:
                return True
            try:
                current_id, wrapped, *links = self._refresh()
                self.adopt(current_id, wrapped, links[0] if links else None)
            except Exception:  # an unreadable record: keep the keys held (the caller's error says the rest)
                return False
            finally:
                self._refreshed_at = time.monotonic()
            return True

    # the MasterKey interface

    def seal(self, secret: bytes, context: str) -> bytes:
        self._try_refresh(throttle=False)
        return self.current.seal(secret, context)

    def unseal(self, blob: bytes, context: str) -> bytes:
        for attempt in (0, 1):
            for master in (self.current, *[m for m in self._masters.values() if m is not self.current]):
                try:
                    return master.unseal(blob, context)
                except ValueError as exc:
                    error = exc
            if attempt == 0 and not self._try_refresh():
                break
        raise error

    def seal_new_key(self, context: str, material: bytes | None = None) -> tuple[bytes, DataKey]:
        self._try_refresh(throttle=False)
        return self.current.seal_new_key(context, material)

    def reseal(self, blob: bytes, context: str) -> bytes | None:
        """`blob` sealed under the current key, or None if it already is (a rotation's step)."""
        try:
            self.current.unseal(blob, context)
            return None
        except ValueError:
            return self.current.seal(self.unseal(blob, context), context)


def share_identifier(mnemonic: str) -> int:
    """The SLIP-39 set identifier of one share (checksum checked). ShareError never quotes the words."""
    import shamir_mnemonic

    try:
        return int(shamir_mnemonic.Share.from_mnemonic(" ".join(mnemonic.split())).identifier)
    except (shamir_mnemonic.MnemonicError, ValueError, IndexError):
        raise ShareError("not a valid share: a word is not in the SLIP-39 word list, or its checksum fails") from None


def share_threshold(mnemonic: str) -> int:
    import shamir_mnemonic

    return int(shamir_mnemonic.Share.from_mnemonic(" ".join(mnemonic.split())).member_threshold)
