"""What the control socket answers: the serving process's seal, opened and closed while it runs.

One JSON line in, one JSON line out (`control_socket.py` carries them; `xks-proxy unseal|seal`
sends them):

    {"op": "status"}                      -> {"sealed": bool, "seal": kind, "given": n, "threshold": k, "serving": bool}
    {"op": "unseal", "share": "..."}      -> the same progress, or {"sealed": false, "unsealed": true, ...}
    {"op": "unseal", "passphrase": "..."} (passphrase seal); {"op": "unseal"} (pkcs11, configured passphrase)
    {"op": "reset"}                       -> the shares given so far are discarded
    {"op": "seal"}                        -> {"sealed": true, ...}: the process drops its master keys
    any refusal                           -> {"error": "one line"}

`Gate` holds the state for the life of the serving process (the supervisor): the `Unsealer`'s
progress while sealed, the keyring once opened. It never logs or answers a share or passphrase:
refusals are ShareError/SealError messages, which never quote one. Opening a keyring here is
all it does; the supervisor sees `keyring` change and loads the configuration with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from keymanager.base import StorageUnavailable
from keymanager.crypto import Keyring, ShareError
from keymanager.seal import home as sealhome
from keymanager.seal.kinds import Unsealer, passphrase_kek
from keymanager.seal.record import SealError, SealRecord
from xks_proxy import config as configmod
from xks_proxy.config import Config

log = logging.getLogger("xks_proxy.seal")
#: The longest request line read; a share is about 230 characters, a passphrase a few dozen.
MAX_REQUEST = 4096


class Gate:
    """The seal of one serving process: sealed with an unseal in progress, or open with a keyring."""

    def __init__(self, home: Path, dsn: str | None, seal: str, seal_table: dict[str, Any], keyring: Keyring | None) -> None:
        self.home, self.dsn, self.kind, self.seal_table = home, dsn, seal, seal_table
        self.keyring = keyring
        self.serving = False  # set by the supervisor once a worker serves
        self._unsealer: Unsealer | None = None

    @property
    def sealed(self) -> bool:
        return self.keyring is None

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line. Never raises for anything a client can send."""
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
        except (ValueError, UnicodeDecodeError):
            return {"error": "the request is not one line of JSON"}
        try:
            if op == "status":
                return self.status()
            if op == "unseal":
                return self._unseal(request)
            if op == "reset":
                if self._unsealer is not None and self._unsealer.given:
                    log.warning("unseal: the shares given so far were discarded (reset)")
                    self._unsealer.reset()
                return self.status()
            if op == "seal":
                return self.seal()
        except (ShareError, SealError, StorageUnavailable) as exc:
            log.warning("unseal refused: %s", exc)
            return {"error": str(exc)}
        return {"error": "unknown request (expected op status, unseal, reset or seal)"}

    def status(self) -> dict[str, Any]:
        if self.sealed and self._unsealer is None:
            try:
                self._record()  # the threshold, before the first share
            except (SealError, StorageUnavailable):
                pass
        unsealer = self._unsealer if self.sealed else None
        return {
            "sealed": self.sealed,
            "seal": self.kind,
            "given": unsealer.given if unsealer else 0,
            "threshold": unsealer.threshold if unsealer else 0,
            "serving": self.serving and not self.sealed,
        }

    def seal(self) -> dict[str, Any]:
        """Drop the master keys now; the supervisor stops the workers and answers sealed."""
        if not self.sealed:
            log.warning("sealed by `xks-proxy seal`: the master keys are dropped, key operations answer 503")
        self.keyring = None
        self.serving = False
        self._unsealer = None
        return self.status()

    def _unseal(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.sealed:
            return {**self.status(), "unsealed": True}
        record = self._record()
        keyring = self._open(record, request)
        if keyring is None:
            return self.status()
        self.keyring, self._unsealer = keyring, None
        log.warning("unsealed (%s seal): starting the workers", record.kind)
        return {**self.status(), "unsealed": True}

    def _record(self) -> SealRecord:
        record = sealhome.read_record(self.home, self.dsn)
        if record is None:
            raise SealError("the home has no seal record (seal.json) any more; restart the proxy")
        self.kind = record.kind
        if self._unsealer is None or self._unsealer.record != record:
            self._unsealer = Unsealer(record)  # a rekey meanwhile: shares of the old seal no longer count
        return record

    def _open(self, record: SealRecord, request: dict[str, Any]) -> Keyring | None:
        """The keyring this request opens; None while shamir needs more shares. ShareError/SealError refuse."""
        share, passphrase = request.get("share"), request.get("passphrase")
        if record.kind == "shamir":
            if not isinstance(share, str) or not share.strip():
                raise SealError("the shamir seal needs a share (one SLIP-39 mnemonic)")
            assert self._unsealer is not None
            kek = self._unsealer.add_share(share)
            if kek is None:
                log.info("unseal: share %d of %d accepted", self._unsealer.given, self._unsealer.threshold)
                return None
            return sealhome.open_with(self.home, self.dsn, record, kek)
        if record.kind == "passphrase" and isinstance(passphrase, str) and passphrase:
            try:
                kek = passphrase_kek(record.params, passphrase.encode())
                return sealhome.open_with(self.home, self.dsn, record, kek)
            except SealError:
                raise SealError("wrong passphrase: it does not open this home's master key") from None
        keyring = sealhome.auto_open(self.home, self.dsn, record, self.seal_table)
        if keyring is None:
            raise SealError("the passphrase seal needs the passphrase")
        return keyring


def sealed_copy(config: Config) -> Config:
    """`config` without its master keys and credential secrets: what a sealed responder may hold."""
    stores = tuple(
        replace(store, credentials=tuple(replace(cred, secret=None) for cred in store.credentials)) for store in config.stores
    )
    return replace(config, keyring=None, stores=stores)


def open_config(home: Path, keyring: Keyring) -> Config:
    """config.toml (and a fleet's stores, waiting for its database) read again with the keyring an unseal opened."""
    config = configmod.load(home, shared=False, keyring=keyring)
    if config.vault.dsn is not None:
        from xks_proxy.fleet.member import wait_for_stores

        config = wait_for_stores(config)
    return config


def encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"
