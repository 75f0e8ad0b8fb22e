"""`xks-proxy vault backup|restore`: an encrypted, consistent copy of a home, and its way back.

A backup holds the vault (a consistent snapshot taken with SQLite's online backup API, so it is
safe while servers run and write), config.toml (store credentials, sealed under the master
key), the home's tls/ files and its seal record. It is one file, AES-256-GCM encrypted as a
whole under the master key or under a key derived from an operator passphrase with scrypt; its
clear header says which (see `keymanager.crypto_transfer.seal_backup`). The master key itself is never in
a backup in clear. A sealed home's backup carries its seal record in the clear header (the master
keys in it are wrapped under the seal), so restoring asks for the shares or passphrase of the
day it was made, not for a key file; a home from before seals restores with its master.key.

Restore creates a NEW home (never overwrites one), checks that the master key opens the
restored vault and credentials, and only then leaves the home in place. `rekey` and
`rotate-master-key` live in `xks_proxy.cli.rotation` and are registered under `vault` here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymanager.crypto import MasterKey
from keymanager.crypto_transfer import (
    BACKUP_PASSPHRASE,
    BACKUP_SEALED,
    MIN_PASSPHRASE_CHARS,
    BackupError,
    backup_kind,
    backup_record,
    open_backup,
    seal_backup,
)
from keymanager.seal.record import SEAL_FILE, SealError
from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError
from xks_proxy.config import CONFIG_FILE, ConfigError

if TYPE_CHECKING:
    from keymanager.seal.record import SealRecord

_FORMAT = 1
_VAULT_NAME = "vault.db"
_SAFE_NAME = ("config.toml", "vault.db", SEAL_FILE)


class RestoreError(Exception):
    """A refused backup or restore, printed as one line."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vault = sub.add_parser("vault", help="back up and restore the key vault").add_subparsers(metavar="ACTION")
    backup = vault.add_parser("backup", parents=[common], help="write an encrypted, consistent backup (safe while serving)")
    backup.add_argument("file", help="backup file to create (refuses an existing file)")
    backup.add_argument(
        "--passphrase-file", help=f"encrypt under this passphrase (>= {MIN_PASSPHRASE_CHARS} characters) instead of the master key"
    )
    backup.set_defaults(func=cmd_backup)
    restore = vault.add_parser("restore", help="restore a backup into a new home")
    restore.add_argument("file", help="the backup file")
    restore.add_argument("--home", required=True, help="the new home to create (must not exist, or be empty)")
    restore.add_argument("--passphrase-file", help="the passphrase, for a backup made with --passphrase-file")
    restore.add_argument(
        "--master-key-file", help="the backed-up home's master key, copied into the new home (default: $XKS_PROXY_MASTER_KEY)"
    )
    restore.add_argument(
        "--cancel-pending-deletions",
        action="store_true",
        help="make keys that were pending deletion DISABLED instead (to rescue a key deleted by mistake)",
    )
    restore.add_argument("--seal-passphrase-file", help="a passphrase-sealed home's passphrase of the day of the backup (else stdin)")
    restore.set_defaults(func=cmd_restore)
    from xks_proxy.cli.rotation import add_parsers, current_seal_arguments

    current_seal_arguments(backup)
    add_parsers(vault, common)


def _passphrase(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise RestoreError(f"--passphrase-file: cannot read {path}: {exc}") from None
    if len(text) < MIN_PASSPHRASE_CHARS:
        raise RestoreError(f"--passphrase-file: the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")
    return text.encode()


def cmd_backup(args: argparse.Namespace) -> int:
    from keymanager.base import KeyRefused
    from keymanager.registry import backend
    from xks_proxy.cli.rotation import open_home

    home = configmod.home_dir(args.home)
    base = configmod.load(home, shared=False)
    out = Path(args.file)
    try:
        passphrase = _passphrase(args.passphrase_file)
        if out.exists():
            raise RestoreError(f"{out} exists; a backup never overwrites a file")
        before = _read_record(home, base.vault.dsn)
        config = configmod.load(home, keyring=open_home(home, base.vault.dsn, before, base.keyring, args))
        backup = backend(config.backend).backup
        if backup is None:
            raise RestoreError(f"vault backup is not supported on backend {config.backend}")
        snapshot = backup.snapshot(config)
        record = _backup_record(before, _read_record(home, base.vault.dsn))
    except (RestoreError, KeyRefused) as exc:
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return 1
    files = {_VAULT_NAME: snapshot, CONFIG_FILE: _config_for_backup(config)}
    if record is not None:
        files[SEAL_FILE] = record.to_bytes()
    tls = config.home / "tls"
    if tls.is_dir():
        files.update({f"tls/{p.name}": p.read_bytes() for p in sorted(tls.iterdir()) if p.is_file()})
    payload = json.dumps(
        {"format": _FORMAT, "created": time.time(), "files": {name: base64.b64encode(data).decode() for name, data in files.items()}}
    ).encode()
    if passphrase:
        sealed = seal_backup(payload, passphrase=passphrase)
    else:
        sealed = seal_backup(payload, master=config.master_key, record=record.to_bytes() if record is not None else None)
    _write_new(out, sealed)
    under = "passphrase" if passphrase else "master key" if record is None else f"master key, opened by the {record.kind} seal"
    print(json.dumps({"backup": str(out), "encryptedUnder": under, "files": sorted(files), "bytes": len(sealed)}, indent=2))
    return 0


def _read_record(home: Path, dsn: str | None) -> "SealRecord | None":
    from keymanager.seal.home import read_record

    try:
        return read_record(home, dsn)
    except SealError as exc:
        raise RestoreError(str(exc)) from None


def _backup_record(before: "SealRecord | None", after: "SealRecord | None") -> "SealRecord | None":
    """The record that opens everything in the snapshot: the one after it, with any key a rotation
    retired meanwhile (blobs under it may be in the snapshot) taken from the one before."""
    if before is None or after is None:
        return after if before is None else before
    missing = {k: v for k, v in before.keys.items() if k not in after.keys}
    if not missing:
        return after
    if (before.kind, before.params) != (after.kind, after.params):
        raise RestoreError("the seal changed while the backup was taken; run the backup again")
    return after.with_keys(after.current, {**after.keys, **missing})


def _config_for_backup(config: configmod.Config) -> bytes:
    """config.toml; for a fleet's shared vault, as a single-box home's: the stores in it, no DSN.

    (The vault in the backup is an SQLite file either way; `fleet init` puts a restored home
    back into a database.)
    """
    text = (config.home / CONFIG_FILE).read_bytes()
    if config.vault.dsn is None:
        return text
    import tomllib

    import tomli_w

    from xks_proxy.fleet import shared_settings

    raw = tomllib.loads(text.decode())
    for name in ("dsn", "dsn_file", "dsn_env"):
        raw.get("vault", {}).pop(name, None)
    raw.pop("fleet", None)
    raw["stores"] = shared_settings.stores_raw(config)
    return tomli_w.dumps(raw).encode()


def _write_new(path: Path, data: bytes) -> None:
    """Write, fsync, then link into place without replacing anything (a crash leaves no half file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile
    finally:
        tmp.unlink()


def cmd_restore(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    claimed: str | None = None  # "created" or "was-empty": set only once the home is ours to fill
    try:
        passphrase = _passphrase(args.passphrase_file)
        try:
            blob = Path(args.file).read_bytes()
        except OSError as exc:
            raise RestoreError(f"cannot read {args.file}: {exc.strerror}") from None
        opened = _open(blob, passphrase, args)
        if home.exists() and (not home.is_dir() or any(home.iterdir())):
            raise RestoreError(f"--home: {home} exists and is not empty; restore creates a new home only")
        claimed = "was-empty" if home.exists() else "created"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        summary = _restore_into(home, opened, args.cancel_pending_deletions)
    except (RestoreError, BackupError, ConfigError, SealError, CommandError) as exc:
        _unclaim(home, claimed)
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        _unclaim(home, claimed)
        raise
    print(json.dumps(summary, indent=2))
    return 0


class _Opened:
    """A backup's files, and what opens them: a seal record with its keyring, or a master key (before seals)."""

    def __init__(self, files: dict[str, bytes], record: "SealRecord | None" = None, keyring: Any = None,
                 master_text: str | None = None, key_file: tuple[str, str] | None = None) -> None:  # fmt: skip
        self.files, self.record, self.keyring, self.master_text, self.key_file = files, record, keyring, master_text, key_file


def _open(blob: bytes, passphrase: bytes | None, args: argparse.Namespace) -> _Opened:
    from keymanager.seal.record import SealRecord

    kind = backup_kind(blob)
    if kind == BACKUP_SEALED:
        clear = backup_record(blob)
        assert clear is not None
        record = SealRecord.from_bytes(clear, f"the seal record of {args.file}")
        keyring, key_file = _open_record(record, args)
        files = _files(open_backup(blob, master=keyring))
        files.pop(SEAL_FILE, None)
        return _Opened(files, record, keyring, key_file=key_file)
    if kind == BACKUP_PASSPHRASE:
        files = _files(open_backup(blob, passphrase=passphrase))
        inner = files.pop(SEAL_FILE, None)
        if inner is not None:
            record = SealRecord.from_bytes(inner, f"the seal record in {args.file}")
            keyring, key_file = _open_record(record, args)
            return _Opened(files, record, keyring, key_file=key_file)
        master, master_text = _restore_master_key(args.master_key_file)
        return _Opened(files, master_text=master_text)
    master, master_text = _restore_master_key(args.master_key_file)
    return _Opened(_files(open_backup(blob, master=master)), master_text=master_text)


def _open_record(record: "SealRecord", args: argparse.Namespace) -> tuple[Any, tuple[str, str] | None]:
    """The keyring of a backed-up seal record: the shares or passphrase of its day, or (file seal) its key file."""
    from keymanager.crypto import Kek
    from keymanager.seal.kinds import open_keyring
    from xks_proxy.cli.secrets_input import open_kek

    if record.kind == "file":
        path = args.master_key_file
        if path is None:
            raise RestoreError("this backup's home had the file seal: give its key file (--master-key-file)")
        try:
            text = Path(path).read_text()
            kek = Kek.from_text(text)
        except (OSError, ValueError) as exc:
            raise RestoreError(f"--master-key-file: {exc}") from None
        return open_keyring(record, kek), (str(record.params.get("file", "master.key")), text)
    if record.kind == "pkcs11":
        raise RestoreError("restoring a backup of a pkcs11-sealed home is not supported yet")
    if args.master_key_file is not None:
        raise RestoreError(f"this backup opens with the {record.kind} seal's shares or passphrase of its day, not a key file")
    return open_keyring(record, open_kek(record, args.seal_passphrase_file, None)), None


def _unclaim(home: Path, claimed: str | None) -> None:
    """Undo a failed restore: only in a home this restore created, or found empty."""
    if claimed == "created":
        shutil.rmtree(home, ignore_errors=True)
    elif claimed == "was-empty":
        for child in home.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _restore_master_key(path: str | None) -> tuple[MasterKey, str | None]:
    """The master key to open the restored home with: a file to copy in, or the environment."""
    if path is not None:
        try:
            text = Path(path).read_text()
            return MasterKey.from_text(text), text
        except (OSError, ValueError) as exc:
            raise RestoreError(f"--master-key-file: {exc}") from None
    env = os.environ.get("XKS_PROXY_MASTER_KEY")
    if not env:
        raise RestoreError("restore needs the backed-up home's master key: --master-key-file or $XKS_PROXY_MASTER_KEY")
    try:
        return MasterKey.from_text(env), None
    except ValueError as exc:
        raise RestoreError(f"$XKS_PROXY_MASTER_KEY: {exc}") from None


def _files(payload: bytes) -> dict[str, bytes]:
    try:
        doc = json.loads(payload)
        if doc.get("format") != _FORMAT:
            raise RestoreError(f"backup content format {doc.get('format')} is not supported")
        files = {name: base64.b64decode(data, validate=True) for name, data in doc["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RestoreError("backup content is malformed") from None
    for name in files:
        if name not in _SAFE_NAME and not (name.startswith("tls/") and "/" not in name[4:] and name[4:] not in ("", ".", "..")):
            raise RestoreError(f"backup names an unexpected file {name!r}")
    if _VAULT_NAME not in files or CONFIG_FILE not in files:
        raise RestoreError("backup lacks the vault or the configuration")
    return files


def _restore_into(home: Path, opened: _Opened, cancel_deletions: bool) -> dict[str, Any]:
    import tomllib

    from keymanager.base import KeyRefused
    from keymanager.registry import backend
    from keymanager.seal.record import FileRecord
    from xks_proxy.cli.home import write_config

    files = opened.files
    for name, data in files.items():
        if name == CONFIG_FILE:
            continue
        target = home / name
        target.parent.mkdir(mode=0o700, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o600)
    raw = tomllib.loads(files[CONFIG_FILE].decode())
    raw.setdefault("vault", {})["path"] = _VAULT_NAME  # the restored vault, wherever the old one lived
    keyring = None
    if opened.record is not None:
        from keymanager.seal.home import open_with

        FileRecord(home).write(opened.record)
        if opened.key_file is not None:
            (home / opened.key_file[0]).write_text(opened.key_file[1])
            (home / opened.key_file[0]).chmod(0o600)
        keyring = open_with(home, None, opened.record, opened.keyring.kek)
    if opened.master_text is not None:
        (home / "master.key").write_text(opened.master_text)
        (home / "master.key").chmod(0o600)
        raw.setdefault("master_key", {})["file"] = "master.key"
    write_config(home, raw)
    config = configmod.load(home, keyring=keyring)  # the master key must open the credentials...
    backup = backend(config.backend).backup
    assert backup is not None  # a backup is made only of a backend that has the capability
    try:
        checked = backup.check_restored(config, cancel_deletions)  # ...and the restored vault
    except KeyRefused as exc:
        raise RestoreError(str(exc)) from None
    names = sorted([*files, SEAL_FILE] if opened.record is not None else files)
    return {"home": str(home), "keys": checked.pop("keys"), "files": names, **checked}
