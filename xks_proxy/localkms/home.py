"""The local KMS's state directory and its seal: DIR holds state.db and seal.json, never a key in clear.

DIR gets a seal of its own, exactly as a proxy home does (`keymanager.seal`): the default is the
file seal (its key-encryption key in DIR/seal.key, 0600: a laptop's local KMS starts unattended);
`--seal passphrase --passphrase-env NAME` keeps the KEK outside DIR. Every secret in state.db
(key material, principals' secrets, store credentials, wrapping keys) is sealed under the master
key that seal opens.
"""

from __future__ import annotations

import os
from pathlib import Path

from keymanager.crypto import Keyring, MasterKey
from keymanager.seal.home import auto_open, open_with
from keymanager.seal.kinds import make
from keymanager.seal.record import FileRecord, SealError, SealRecord, wrap_all

STATE_DB = "state.db"
DEFAULT_DIR = "~/.xks-proxy-local-kms"


def state_dir(given: str | None) -> Path:
    """--state, else $XKS_PROXY_LOCAL_KMS, else ~/.xks-proxy-local-kms."""
    return Path(given or os.environ.get("XKS_PROXY_LOCAL_KMS") or DEFAULT_DIR).expanduser()


def open_or_create(directory: Path, seal: str = "file", passphrase_env: str | None = None) -> Keyring:
    """The keyring of DIR's seal, making DIR and the seal on first use. SealError if it cannot open."""
    settings = {"passphrase_env": passphrase_env} if passphrase_env else {}
    record = FileRecord(directory).read()
    if record is not None:
        keyring = auto_open(directory, None, record, settings)
        if keyring is None:
            raise SealError(f"{directory}: its {record.kind} seal needs --passphrase-env NAME to open")
        return keyring
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if seal == "passphrase":
        value = os.environ.get(passphrase_env or "")
        if not passphrase_env or not value:
            raise SealError("--seal passphrase needs --passphrase-env NAME naming a set environment variable")
        new = make("passphrase", passphrase=value.encode())
    elif seal == "file":
        new = make("file", key_file=directory / "seal.key")
    else:
        raise SealError(f"--seal {seal}: the local KMS seals with file or passphrase")
    master = MasterKey.generate()
    made = SealRecord(new.kind, new.params, master.key_id, wrap_all(new.kek, [master]))
    FileRecord(directory).write(made)
    return open_with(directory, None, made, new.kek)
