"""Opening a home's seal: where its record is, and what opens without a person (see the package docstring)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from keymanager.crypto import Keyring, Kek, MasterKey
from keymanager.seal.kinds import file_kek, open_keyring, passphrase_kek
from keymanager.seal.record import SEAL_FILE, FileRecord, SealError, SealRecord

#: Where the fleet's record lives, set by the vault backend's fleet capability (PostgreSQL).
RecordStore = Any


def record_store(home: Path, dsn: str | None) -> RecordStore:
    """seal.json in the home, or the `seal` row of the fleet's vault database."""
    if dsn is None:
        return FileRecord(home)
    from keymanager import registry

    fleet = registry.backend("vault").fleet
    assert fleet is not None
    return fleet.seal_record(dsn)


def read_record(home: Path, dsn: str | None = None) -> SealRecord | None:
    return record_store(home, dsn).read()


def legacy_keyring(master: MasterKey, home: Path | None = None, dsn: str | None = None) -> Keyring:
    """A home without a record: its one master key, which is also the KEK a first rekey/rotation keeps.

    With `home`, it follows a record that appears later (a rotation converts the home to the
    file seal whose key file is master.key, then rotates): a running proxy keeps serving.
    """
    return Keyring(Kek.of_master(master), master, refresh=_refresher(home, dsn) if home is not None else None)


def _refresher(home: Path, dsn: str | None) -> Callable[[], tuple[str, dict[str, bytes], dict[str, bytes]]]:
    def refresh() -> tuple[str, dict[str, bytes], dict[str, bytes]]:
        record = read_record(home, dsn)
        if record is None:
            raise ValueError("no seal record")
        return record.current, record.keys, record.links

    return refresh


def open_with(home: Path, dsn: str | None, record: SealRecord, kek: Any) -> Keyring:
    """The keyring `kek` opens, re-reading the record when another process rotates the master key."""
    return open_keyring(record, kek, _refresher(home, dsn))


def auto_open(home: Path, dsn: str | None, record: SealRecord, seal_table: dict[str, Any]) -> Keyring | None:
    """The keyring, if this seal opens without a person; None if it waits for `xks-proxy unseal`."""
    kek: Any
    if record.kind == "file":
        kek = file_kek(home, record)
    elif record.kind == "pkcs11":
        from keymanager.seal.hsm import open_hsm_kek

        kek = open_hsm_kek(record.params, secret_from(home, seal_table, "pin"))
    elif record.kind == "passphrase":
        passphrase = secret_from(home, seal_table, "passphrase")
        if passphrase is None:
            return None
        kek = passphrase_kek(record.params, passphrase.encode())
    else:
        return None
    return open_with(home, dsn, record, kek)


def secret_from(home: Path, table: dict[str, Any], name: str) -> str | None:
    """`[seal] <name>_file` (owner-only) or `<name>_env`: a passphrase or PIN kept outside config.toml."""
    path, env = table.get(f"{name}_file"), table.get(f"{name}_env")
    if path:
        target = (home / str(path)).expanduser()
        try:
            if target.stat().st_mode & 0o077:
                raise SealError(f"seal.{name}_file: {target} must be readable by its owner only (chmod 600)")
            return target.read_text().rstrip("\r\n")
        except OSError as exc:
            raise SealError(f"seal.{name}_file: cannot read {target}: {exc.strerror}") from None
    if env:
        value = os.environ.get(str(env))
        if not value:
            raise SealError(f"seal.{name}_env: the environment variable {env} is not set")
        return value
    return None
