"""`xks-proxy vault backup|restore`: an encrypted, consistent copy of a home, and its way back.

A backup holds the vault (a consistent snapshot taken with SQLite's online backup API, so it is
safe while servers run and write), config.toml (store credentials, sealed under the master
key) and the home's tls/ files. It is one file, AES-256-GCM encrypted as a whole under the
master key or under a key derived from an operator passphrase with scrypt; its clear header
says which (see `keymanager.crypto.seal_backup`). The master key itself is never in a backup:
everything inside is sealed under it, so keep it escrowed apart from the backups.

Restore creates a NEW home (never overwrites one), checks that the master key opens the
restored vault and credentials, and only then leaves the home in place.
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
from typing import Any

from keymanager.crypto import (
    BACKUP_PASSPHRASE,
    MIN_PASSPHRASE_CHARS,
    BackupError,
    MasterKey,
    backup_kind,
    open_backup,
    seal_backup,
)
from xks_proxy import config as configmod
from xks_proxy.config import CONFIG_FILE, ConfigError

_FORMAT = 1
_VAULT_NAME = "vault.db"
_SAFE_NAME = ("config.toml", "vault.db")


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
    restore.set_defaults(func=cmd_restore)


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

    config = configmod.load(configmod.home_dir(args.home))
    out = Path(args.file)
    try:
        passphrase = _passphrase(args.passphrase_file)
        if out.exists():
            raise RestoreError(f"{out} exists; a backup never overwrites a file")
        backup = backend(config.backend).backup
        if backup is None:
            raise RestoreError(f"vault backup is not supported on backend {config.backend}")
        snapshot = backup.snapshot(config)
    except (RestoreError, KeyRefused) as exc:
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return 1
    files = {_VAULT_NAME: snapshot, CONFIG_FILE: _config_for_backup(config)}
    tls = config.home / "tls"
    if tls.is_dir():
        files.update({f"tls/{p.name}": p.read_bytes() for p in sorted(tls.iterdir()) if p.is_file()})
    payload = json.dumps(
        {"format": _FORMAT, "created": time.time(), "files": {name: base64.b64encode(data).decode() for name, data in files.items()}}
    ).encode()
    sealed = seal_backup(payload, passphrase=passphrase) if passphrase else seal_backup(payload, master=config.master_key)
    _write_new(out, sealed)
    print(
        json.dumps(
            {
                "backup": str(out),
                "encryptedUnder": "passphrase" if passphrase else "master key",
                "files": sorted(files),
                "bytes": len(sealed),
            },
            indent=2,
        )
    )
    return 0


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
        master, master_text = _restore_master_key(args.master_key_file)
        try:
            blob = Path(args.file).read_bytes()
        except OSError as exc:
            raise RestoreError(f"cannot read {args.file}: {exc.strerror}") from None
        if backup_kind(blob) == BACKUP_PASSPHRASE:
            payload = open_backup(blob, passphrase=passphrase)
        else:
            payload = open_backup(blob, master=master)
        files = _files(payload)
        if home.exists() and (not home.is_dir() or any(home.iterdir())):
            raise RestoreError(f"--home: {home} exists and is not empty; restore creates a new home only")
        claimed = "was-empty" if home.exists() else "created"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        summary = _restore_into(home, files, master_text, args.cancel_pending_deletions)
    except (RestoreError, BackupError, ConfigError) as exc:
        _unclaim(home, claimed)
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        _unclaim(home, claimed)
        raise
    print(json.dumps(summary, indent=2))
    return 0


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


def _restore_into(home: Path, files: dict[str, bytes], master_text: str | None, cancel_deletions: bool) -> dict[str, Any]:
    import tomllib

    from keymanager.base import KeyRefused
    from keymanager.registry import backend
    from xks_proxy.cli.home import write_config

    for name, data in files.items():
        if name == CONFIG_FILE:
            continue
        target = home / name
        target.parent.mkdir(mode=0o700, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o600)
    raw = tomllib.loads(files[CONFIG_FILE].decode())
    raw.setdefault("vault", {})["path"] = _VAULT_NAME  # the restored vault, wherever the old one lived
    if master_text is not None:
        (home / "master.key").write_text(master_text)
        (home / "master.key").chmod(0o600)
        raw.setdefault("master_key", {})["file"] = "master.key"
    write_config(home, raw)
    config = configmod.load(home)  # the master key must open the credentials...
    backup = backend(config.backend).backup
    assert backup is not None  # a backup is made only of a backend that has the capability
    try:
        checked = backup.check_restored(config, cancel_deletions)  # ...and the restored vault
    except KeyRefused as exc:
        raise RestoreError(str(exc)) from None
    return {"home": str(home), "keys": checked.pop("keys"), "files": sorted(files), **checked}
