"""A sealed home at rest: a copy of every one of its files, without a share or the passphrase, opens nothing.

The attacker of this test has the whole home (a copied disk, a backup of it, a VM snapshot)
and tries every file as the key: as a key file's text, and every 32-byte window of it as the
seal's KEK and as the master key itself. None opens the wrapped master key or the health key's
material. The master key's bytes (read through the opened keyring, in this test only) occur in no
file, raw or base64. The home loads as sealed: its store credentials stay unopened.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keymanager.crypto import Kek, MasterKey
from keymanager.seal.home import open_with
from keymanager.seal.kinds import Unsealer
from keymanager.seal.record import FileRecord
from keymanager.vault.db import INTERNAL_STORE, VaultDB, parse_usage
from keymanager.vault.model import HEALTH_KEY, material_context
from keymanager.vault.storage import SqliteStorage
from tests.support import ROOT
from xks_proxy import config as configmod


def _init(home: Path, *seal: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", "init", "--home", str(home), *seal],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip


def _candidates(data: bytes) -> list[bytes]:
    """Every 32-byte window of the file, and the file read as base64 text of a key."""
    found = [data[i : i + 32] for i in range(0, max(1, len(data) - 31))]
    try:
        found.append(base64.b64decode(data.strip(), validate=True))
    except ValueError:
        pass
    return [c for c in found if len(c) == 32]


@pytest.mark.parametrize("seal", [("--seal", "shamir", "--shares", "3", "--threshold", "2"), ("--seal", "passphrase")])
def test_a_copy_of_every_file_opens_nothing(tmp_path: Path, seal: tuple[str, ...]) -> None:
    home, shares = tmp_path / "home", tmp_path / "shares"
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text("a long enough passphrase for the test\n")
    passphrase_file.chmod(0o600)
    extra = ("--share-dir", str(shares)) if "shamir" in seal else ("--passphrase-file", str(passphrase_file))
    out = _init(home, *seal, *extra)
    record = FileRecord(home).read()
    assert record is not None
    if record.kind == "shamir":
        unsealer = Unsealer(record)
        unsealer.add_share((shares / "share-1.txt").read_text())
        kek = unsealer.add_share((shares / "share-3.txt").read_text())
    else:
        from keymanager.seal.kinds import passphrase_kek

        kek = passphrase_kek(record.params, b"a long enough passphrase for the test")
    keyring = open_with(home, None, record, kek)
    db = VaultDB(home / "vault.db", keyring)
    db.create_key("xks", "foo", parse_usage("ENCRYPT,DECRYPT"))
    db.rotate("xks", "foo")
    db.close()
    master = keyring.current._material  # the test peeks; nothing else outside crypto.py may

    copy = tmp_path / "stolen"
    shutil.copytree(home, copy)
    files = [p for p in sorted(copy.rglob("*")) if p.is_file()]
    assert {p.name for p in files} >= {"config.toml", "seal.json", "vault.db", "server.key"}
    storage = SqliteStorage(copy / "vault.db")  # the sealed blobs, read as an attacker can: no key needed
    with storage.read() as tx:
        health = [v.sealed for v in tx.versions(INTERNAL_STORE, HEALTH_KEY)][0]
    storage.close()
    wrapped = record.keys[record.current]
    tried = 0
    for path in files:
        data = path.read_bytes()
        assert master not in data and base64.b64encode(master) not in data, path
        assert out.stdout.find(base64.b64encode(master).decode()) == -1
        for candidate in _candidates(data):
            tried += 1
            with pytest.raises(ValueError):
                Kek(candidate).unwrap(wrapped, record.current)
            with pytest.raises(ValueError):
                MasterKey(candidate).unseal(health, material_context(INTERNAL_STORE, HEALTH_KEY, 1))
    assert tried > 10_000  # the vault file alone has tens of thousands of windows

    sealed = configmod.load(copy)
    assert sealed.sealed and sealed.keyring is None
    assert all(cred.secret is None for store in sealed.stores for cred in store.credentials)
    with pytest.raises(configmod.ConfigError, match="sealed"):
        sealed.master_key
