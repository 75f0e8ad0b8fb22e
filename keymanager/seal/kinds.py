"""The four seals: how each makes its key-encryption key (KEK) at `init`/`rekey`, and opens it again.

- shamir: a random KEK split with SLIP-39 into N shares, K of which open it (`Unsealer` collects
  them one at a time, from different people). Nothing in the home opens it.
- passphrase: KEK = Argon2id(passphrase, salt) with the parameters kept in the record
  (`keymanager.crypto.ARGON2_DEFAULTS`: 64 MiB, 3 passes, 4 lanes).
- pkcs11: the KEK is an AES key inside an HSM that never leaves it (`keymanager.seal.hsm`):
  auto-unseal at start, as HashiCorp Vault's PKCS#11 seal.
- file: the KEK in a 0600 file of the home (development and `demo`; `serve` warns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keymanager.crypto import ARGON2_DEFAULTS, Kek, MasterKey, ShareError, share_identifier, share_threshold
from keymanager.seal.record import SealError, SealRecord

MIN_PASSPHRASE_CHARS = 12
MAX_SHARES = 16


@dataclass
class NewSeal:
    """A seal just made: its record parameters, its KEK, and what to hand out (shamir's shares)."""

    kind: str
    params: dict[str, Any]
    kek: Any
    shares: list[str] = field(default_factory=list, repr=False)


def make(kind: str, *, shares: int = 5, threshold: int = 3, passphrase: bytes | None = None,
         hsm: dict[str, Any] | None = None, key_file: Path | None = None, pin: str | None = None) -> NewSeal:
    """A new seal of `kind`. Raises SealError for parameters that cannot make one."""
    if kind == "shamir":
        if not 1 <= threshold <= shares <= MAX_SHARES or (threshold == 1 and shares > 1):
            raise SealError(f"--threshold K and --shares N: need 2 <= K <= N <= {MAX_SHARES} (or 1 of 1)")
        kek, mnemonics, identifier = Kek.generate_shares(threshold, shares)
        return NewSeal(kind, {"threshold": threshold, "shares": shares, "identifier": identifier}, kek, mnemonics)
    if kind == "passphrase":
        check_passphrase(passphrase)
        assert passphrase is not None
        params = {"kdf": "argon2id", "salt": os.urandom(16).hex(), **ARGON2_DEFAULTS}
        return NewSeal(kind, params, passphrase_kek(params, passphrase))
    if kind == "file":
        if key_file is None:
            raise SealError("the file seal needs a key file")
        text = _new_key_text()
        _write_private(key_file, text)
        return NewSeal(kind, {"file": key_file.name}, Kek.from_text(text))
    if kind == "pkcs11":
        from keymanager.seal.hsm import make_hsm_kek

        params, kek = make_hsm_kek(hsm_params(hsm), pin)
        return NewSeal(kind, params, kek)
    raise SealError(f"unknown seal {kind!r} (expected shamir, passphrase, pkcs11 or file)")


def hsm_params(given: dict[str, Any] | None) -> dict[str, Any]:
    if not given or not given.get("module") or not given.get("token_label"):
        raise SealError("the pkcs11 seal needs --pkcs11-module and --pkcs11-token (and the PIN from --pin-file)")
    return dict(given)


def check_passphrase(passphrase: bytes | None) -> None:
    if passphrase is None or len(passphrase.decode("utf-8", "replace")) < MIN_PASSPHRASE_CHARS:
        raise SealError(f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")


def passphrase_kek(params: dict[str, Any], passphrase: bytes) -> Kek:
    try:
        return Kek.from_passphrase(
            passphrase, bytes.fromhex(params["salt"]), int(params["memory_kib"]), int(params["iterations"]), int(params["lanes"])
        )
    except (KeyError, ValueError, TypeError):
        raise SealError("the seal record's Argon2id parameters are malformed") from None


def file_kek(home: Path, record: SealRecord | None, fallback: str = "master.key") -> Kek:
    path = home / (record.params.get("file", fallback) if record else fallback)
    try:
        return Kek.from_text(path.read_text())
    except FileNotFoundError:
        raise SealError(f"{path}: the file seal's key file is missing") from None
    except (OSError, ValueError) as exc:
        raise SealError(f"{path}: {exc}") from None


def open_keyring(record: SealRecord, kek: Any, refresh: Any = None) -> Any:
    """The record's master keys unwrapped with `kek`. SealError if this KEK does not open them."""
    from keymanager.crypto import Keyring

    try:
        current = kek.unwrap(record.keys[record.current], record.current)
        others = tuple(kek.unwrap(blob, kid) for kid, blob in record.keys.items() if kid != record.current)
    except ValueError:
        raise SealError("the seal does not open this home's master key (wrong shares, passphrase or key)") from None
    return Keyring(kek, current, others, refresh, seal=record.kind)


class Unsealer:
    """Shares given one at a time until the threshold: the state behind `xks-proxy unseal`.

    Each share is checked on arrival (SLIP-39 checksum, the record's set identifier, not given
    twice); a refusal keeps the shares given so far. At the threshold they are combined; if they
    do not open the record's key, all are discarded. Never holds more than the threshold.
    """

    def __init__(self, record: SealRecord) -> None:
        self.record = record
        self.threshold = int(record.params.get("threshold", 0)) if record.kind == "shamir" else 1
        self._shares: list[str] = []
        self._seen: set[str] = set()

    @property
    def given(self) -> int:
        return len(self._shares)

    def reset(self) -> None:
        self._shares.clear()
        self._seen.clear()

    def add_share(self, mnemonic: str) -> Kek | None:
        """The KEK once `threshold` valid shares are in; None while more are needed. ShareError refuses."""
        words = " ".join(mnemonic.split()).lower()
        if share_identifier(words) != self.record.params.get("identifier"):
            raise ShareError("this share belongs to another vault (its SLIP-39 set identifier differs)")
        if share_threshold(words) != self.threshold:
            raise ShareError("this share belongs to another share set of this vault (its threshold differs)")
        if words in self._seen:
            raise ShareError("this share was given already")
        self._seen.add(words)
        self._shares.append(words)
        if len(self._shares) < self.threshold:
            return None
        shares, self._shares = self._shares, []
        self._seen.clear()
        try:
            kek = Kek.from_shares(shares)
            open_keyring(self.record, kek)
        except (ShareError, SealError):
            raise ShareError("these shares do not open this vault's master key; all shares given so far are discarded") from None
        return kek


def _new_key_text() -> str:
    return MasterKey.generate_text()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
