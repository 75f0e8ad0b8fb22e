"""Key material in transit: BYOK wrapping keys, import tokens, and whole-vault backups.

The sibling of `keymanager.crypto` (the rule "only crypto modules touch raw key bytes" covers
both): imported material is unwrapped here and sealed at once under the master key, never
returned; the import-token signer and the wrapping keys' private halves rest only sealed; a
backup is encrypted as a whole under the master key or an operator passphrase (scrypt).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from keymanager.crypto import IV_BYTES, KEY_BYTES, TAG_BYTES, DataKey, Keyring, MasterKey, new_iv


# --- importing key material (bring your own key) --------------------------------------------

WRAPPING_KEY_SPECS: dict[str, int] = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
#: What the vault's BYOK offers. `WrappingKey` also unwraps RSA_AES_KEY_WRAP_SHA_1, which KMS offers
#: too (the local KMS's GetParametersForImport, `xks_proxy/localkms/imports.py`).
WRAPPING_ALGORITHMS = ("RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256")


class UnwrapError(ValueError):
    """Imported key material that does not open, or is not an AES-256 key. Message is safe to show."""


def _oaep(algorithm: hashes.HashAlgorithm) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=algorithm), algorithm=algorithm, label=None)


class WrappingKey:
    """An RSA key pair that customers wrap key material to, as KMS's GetParametersForImport gives.

    The private half lives only here and, at rest, sealed under the master key.
    """

    __slots__ = ("_private",)

    def __init__(self, private: rsa.RSAPrivateKey) -> None:
        self._private = private

    def __repr__(self) -> str:
        return f"WrappingKey(RSA-{self._private.key_size}, fingerprint={self.fingerprint[:16]})"

    @classmethod
    def generate(cls, spec: str) -> "WrappingKey":
        if spec not in WRAPPING_KEY_SPECS:
            raise ValueError(f"wrapping key spec must be one of {', '.join(WRAPPING_KEY_SPECS)}")
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=WRAPPING_KEY_SPECS[spec]))

    def seal(self, master: "MasterKey", context: str) -> bytes:
        return _seal_private_key(master, self._private, context)

    @classmethod
    def unseal(cls, master: "MasterKey", sealed: bytes, context: str) -> "WrappingKey":
        return cls(_unseal_private_key(master, sealed, context, rsa.RSAPrivateKey))

    def public_der(self) -> bytes:
        """X.509 SubjectPublicKeyInfo, DER: the format of KMS's WrappingPublicKey."""
        return self._private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public key DER: what an import token is bound to."""
        return hashlib.sha256(self.public_der()).hexdigest()

    def unwrap_and_seal(self, algorithm: str, blob: bytes, master: "MasterKey", context: str) -> tuple[bytes, DataKey]:
        """Open imported key material and seal it under the master key for `context` at once.

        Returns (sealed material, DataKey): the raw bytes never leave this module.
        """
        return master.seal_new_key(context, self._unwrap(algorithm, blob))

    def _unwrap(self, algorithm: str, blob: bytes) -> bytes:
        """Open encrypted key material wrapped as KMS's ImportKeyMaterial expects it.

        RSAES_OAEP_SHA_256 / _SHA_1: RSA-OAEP (MGF1 with the same hash) of the material.
        RSA_AES_KEY_WRAP_SHA_256 / _SHA_1: RSA-OAEP (that hash) of a fresh 256-bit AES key, followed
        by the material wrapped under that key with AES key wrap with padding (RFC 5649).
        """
        modulus = self._private.key_size // 8
        try:
            if algorithm == "RSAES_OAEP_SHA_256":
                material = self._private.decrypt(blob, _oaep(hashes.SHA256()))
            elif algorithm == "RSAES_OAEP_SHA_1":
                material = self._private.decrypt(blob, _oaep(hashes.SHA1()))
            elif algorithm in ("RSA_AES_KEY_WRAP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1"):
                if len(blob) <= modulus:
                    raise UnwrapError(
                        f"{algorithm} material must be the {modulus}-byte RSA-wrapped AES key "
                        "followed by the AES-wrapped key material"
                    )
                digest = hashes.SHA256() if algorithm.endswith("256") else hashes.SHA1()
                kek = self._private.decrypt(blob[:modulus], _oaep(digest))
                if len(kek) != KEY_BYTES:
                    raise UnwrapError("the RSA-wrapped AES key must be 32 bytes (AES-256)")
                material = aes_key_unwrap_with_padding(kek, blob[modulus:])
            else:
                raise UnwrapError(f"wrapping algorithm must be one of {', '.join(WRAPPING_ALGORITHMS)}")
        except (ValueError, InvalidUnwrap) as exc:
            if isinstance(exc, UnwrapError):
                raise
            raise UnwrapError(
                f"the encrypted key material does not open with this import token's wrapping key and {algorithm} "
                "(wrong public key, wrong algorithm or a damaged file)"
            ) from None
        if len(material) != KEY_BYTES:
            raise UnwrapError(f"imported key material must be 32 bytes (AES-256), not {len(material)} bytes")
        return material


class TokenError(ValueError):
    """An import token that is refused. The message says why, for the operator."""


class TokenSigner:
    """The vault's ES256 key for import tokens. Its private half is sealed under the master key."""

    __slots__ = ("_private", "key_id")

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        self._private = private
        public = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = hashlib.sha256(public).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"TokenSigner(kid={self.key_id})"

    @classmethod
    def generate(cls) -> "TokenSigner":
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def seal(self, master: "MasterKey", context: str) -> bytes:
        return _seal_private_key(master, self._private, context)

    @classmethod
    def unseal(cls, master: "MasterKey", sealed: bytes, context: str) -> "TokenSigner":
        return cls(_unseal_private_key(master, sealed, context, ec.EllipticCurvePrivateKey))

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._private, algorithm="ES256", headers={"kid": self.key_id})

    def verify(self, token: str, *, audience: str, issuer: str) -> dict[str, Any]:
        """The claims of a token this key signed, with exp, aud and iss checked. Else TokenError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("the import token is not a token (wrong or damaged file?)") from None
        if header.get("kid") != self.key_id or header.get("alg") != "ES256":
            raise TokenError("the import token was issued by another vault; get import parameters from this one")
        try:
            return jwt.decode(
                token,
                self._private.public_key(),
                algorithms=["ES256"],
                audience=audience,
                issuer=issuer,
                options={"require": ["exp", "iat", "aud", "iss", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the import token has expired (they are valid for 24 hours); get new import parameters") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError):
            raise TokenError("the token is not an import token of this vault") from None
        except jwt.PyJWTError:
            raise TokenError("the import token's signature does not verify: it was altered") from None


# --- backups ----------------------------------------------------------------------------------

BACKUP_MAGIC = b"XKS-PROXY-BACKUP"
_BACKUP_VERSION = 1
BACKUP_MASTER, BACKUP_PASSPHRASE, BACKUP_SEALED = 1, 2, 3
_RECORD_LENGTH = struct.Struct(">I")
_SCRYPT = struct.Struct(">16sBBB")  # salt, log2(n), r, p
_SCRYPT_LOG2N, _SCRYPT_R, _SCRYPT_P = 17, 8, 1
MIN_PASSPHRASE_CHARS = 16


class BackupError(ValueError):
    """A backup that cannot be opened. Message is safe to show."""


def _passphrase_key(passphrase: bytes, salt: bytes, log2n: int, r: int, p: int) -> AESGCM:
    if not 10 <= log2n <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise BackupError("backup header has unreasonable scrypt parameters")
    return AESGCM(Scrypt(salt=salt, length=KEY_BYTES, n=1 << log2n, r=r, p=p).derive(passphrase))


def seal_backup(
    payload: bytes, *, master: "MasterKey | Keyring | None" = None, passphrase: bytes | None = None, record: bytes | None = None
) -> bytes:
    """Encrypt a whole backup with AES-256-GCM. The clear header says which key, and is bound as AAD.

    magic || version || kind || [salt, scrypt parameters | uint32 length, seal record] || sealed payload.
    kind 1: under the master key. kind 2: under scrypt(passphrase). kind 3: under the master key,
    with the home's seal record (public: the master keys in it are wrapped under the seal's KEK)
    in clear, so that the shares or passphrase of the day the backup was made open it.
    """
    if (master is None) == (passphrase is None):
        raise ValueError("a backup is sealed under exactly one of the master key or a passphrase")
    if record is not None and master is not None:
        header = BACKUP_MAGIC + bytes([_BACKUP_VERSION, BACKUP_SEALED]) + _RECORD_LENGTH.pack(len(record)) + record
        return header + master.seal(payload, "xks-proxy backup " + hashlib.sha256(header).hexdigest())
    if passphrase is not None:
        params = _SCRYPT.pack(os.urandom(16), _SCRYPT_LOG2N, _SCRYPT_R, _SCRYPT_P)
        header = BACKUP_MAGIC + bytes([_BACKUP_VERSION, BACKUP_PASSPHRASE]) + params
        iv = new_iv()
        gcm = _passphrase_key(passphrase, *_SCRYPT.unpack(params))
        return header + iv + gcm.encrypt(iv, payload, header)
    assert master is not None
    header = BACKUP_MAGIC + bytes([_BACKUP_VERSION, BACKUP_MASTER])
    return header + master.seal(payload, "xks-proxy backup " + header.hex())


def backup_kind(blob: bytes) -> int:
    """BACKUP_MASTER or BACKUP_PASSPHRASE, from the clear header."""
    head = len(BACKUP_MAGIC)
    if len(blob) < head + 2 or not blob.startswith(BACKUP_MAGIC):
        raise BackupError("not an xks-proxy backup file")
    if blob[head] != _BACKUP_VERSION:
        raise BackupError(f"backup format {blob[head]} is not supported by this xks-proxy")
    if blob[head + 1] not in (BACKUP_MASTER, BACKUP_PASSPHRASE, BACKUP_SEALED):
        raise BackupError("backup header names an unknown key kind")
    return blob[head + 1]


def _sealed_header(blob: bytes) -> bytes:
    head = len(BACKUP_MAGIC) + 2
    if len(blob) < head + _RECORD_LENGTH.size:
        raise BackupError("backup file is truncated")
    (length,) = _RECORD_LENGTH.unpack(blob[head : head + _RECORD_LENGTH.size])
    end = head + _RECORD_LENGTH.size + length
    if len(blob) < end + 1 + IV_BYTES + TAG_BYTES:
        raise BackupError("backup file is truncated")
    return blob[:end]


def backup_record(blob: bytes) -> bytes | None:
    """The seal record in a BACKUP_SEALED backup's clear header (None for the other kinds)."""
    if backup_kind(blob) != BACKUP_SEALED:
        return None
    return _sealed_header(blob)[len(BACKUP_MAGIC) + 2 + _RECORD_LENGTH.size :]


def open_backup(blob: bytes, *, master: "MasterKey | Keyring | None" = None, passphrase: bytes | None = None) -> bytes:
    kind = backup_kind(blob)
    head = len(BACKUP_MAGIC) + 2
    if kind == BACKUP_PASSPHRASE:
        if passphrase is None:
            raise BackupError("this backup is encrypted under a passphrase: give --passphrase-file")
        header, rest = blob[: head + _SCRYPT.size], blob[head + _SCRYPT.size :]
        if len(header) < head + _SCRYPT.size or len(rest) < IV_BYTES + TAG_BYTES:
            raise BackupError("backup file is truncated")
        gcm = _passphrase_key(passphrase, *_SCRYPT.unpack(header[head:]))
        try:
            return gcm.decrypt(rest[:IV_BYTES], rest[IV_BYTES:], header)
        except InvalidTag:
            raise BackupError("backup does not open with this passphrase (wrong passphrase, or the file was altered)") from None
    if master is None:
        raise BackupError("this backup is encrypted under the master key: supply it (--master-key-file or the environment)")
    if kind == BACKUP_SEALED:
        header = _sealed_header(blob)
        try:
            return master.unseal(blob[len(header) :], "xks-proxy backup " + hashlib.sha256(header).hexdigest())
        except ValueError:
            raise BackupError("backup does not open under the master key its seal record gives (the file was altered)") from None
    header = blob[:head]
    try:
        return master.unseal(blob[head:], "xks-proxy backup " + header.hex())
    except ValueError:
        raise BackupError("backup does not open under this master key (another key, or the file was altered)") from None


def _seal_private_key(master: "MasterKey", private: Any, context: str) -> bytes:
    """A private key (wrapping key, token signer) at rest: PKCS#8 DER sealed like key material."""
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return master.seal(der, context)


def _unseal_private_key(master: "MasterKey", sealed: bytes, context: str, kind: type) -> Any:
    key = serialization.load_der_private_key(master.unseal(sealed, context), password=None)
    if not isinstance(key, kind):
        raise ValueError(f"sealed value for {context} is not the expected kind of key")
    return key
