"""`vault backup` while a server writes, `vault restore` into a new home, and a real decrypt after."""

from __future__ import annotations

import pytest

import asyncio
import json
import os
from pathlib import Path

from keymanager.crypto import MasterKey
from keymanager.crypto_transfer import BACKUP_MAGIC
from tests.conftest import Home, unb64
from tests.support.lifecycle import acli, cli, cli_json, patch_config, serving

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


async def test_backup_while_serving_then_restore_and_decrypt(home: Home, tmp_path: Path) -> None:
    patch_config(home.path, vault={"count_block": 1})  # every encryption writes to the vault meanwhile
    backup = tmp_path / "vault.bak"
    async with serving(home) as live:
        status, enc = await live.client.encrypt("foo", b"made before the backup", aad=b"ctx")
        assert status == 200
        busy = True

        async def traffic() -> int:
            count = 0
            while busy:
                status, _ = await live.client.encrypt("foo", b"meanwhile")
                assert status == 200
                count += 1
            return count

        writer = asyncio.create_task(traffic())
        await asyncio.sleep(0.05)
        rc, out, err = await acli("vault", "backup", str(backup), home=home.path)
        busy = False
        assert await writer > 0
        assert rc == 0, err
        assert json.loads(out)["encryptedUnder"] == "master key"
    blob = backup.read_bytes()
    assert blob.startswith(BACKUP_MAGIC) and b"SQLite format 3" not in blob and b"access_key_id" not in blob

    again = cli("vault", "backup", str(backup), home=home.path)
    assert again.returncode == 1 and "never overwrites" in again.stderr

    restored = tmp_path / "restored"
    summary = cli_json("vault", "restore", str(backup), "--home", str(restored), "--master-key-file", str(home.path / "master.key"))
    assert summary["keys"] == 1 and "vault.db" in summary["files"]
    assert (restored / "master.key").stat().st_mode & 0o077 == 0
    async with serving(home, path=restored) as live:
        status, body = await live.client.decrypt("foo", enc, aad=b"ctx")
        assert status == 200, body
        assert unb64(body["plaintext"]) == b"made before the backup"

    before = _tree(restored)
    done = cli("vault", "restore", str(backup), "--home", str(restored), "--master-key-file", str(home.path / "master.key"))
    assert done.returncode == 1 and "not empty" in done.stderr
    assert _tree(restored) == before, "a refused restore must leave an existing home untouched"


def test_restore_refusals_leave_nothing_behind(home: Home, tmp_path: Path) -> None:
    backup = tmp_path / "vault.bak"
    cli_json("vault", "backup", str(backup), home=home.path)
    target = tmp_path / "new"
    other_key = tmp_path / "other.key"
    other_key.write_text(MasterKey.generate_text())
    tampered = tmp_path / "tampered.bak"
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    for args, reason in (
        ((str(backup),), "needs the backed-up home's master key"),
        ((str(backup), "--master-key-file", str(other_key)), "does not open under this master key"),
        ((str(tampered), "--master-key-file", str(home.path / "master.key")), "altered"),
        ((str(home.path / "config.toml"), "--master-key-file", str(home.path / "master.key")), "not an xks-proxy backup"),
    ):
        done = cli("vault", "restore", *args, "--home", str(target))
        assert done.returncode == 1 and reason in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert not target.exists()


def test_passphrase_backup(home: Home, tmp_path: Path) -> None:
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse battery staple\n")
    short = tmp_path / "short"
    short.write_text("too short\n")
    backup = tmp_path / "vault.bak"
    done = cli("vault", "backup", str(backup), "--passphrase-file", str(short), home=home.path)
    assert done.returncode == 1 and "at least 16" in done.stderr
    assert cli_json("vault", "backup", str(backup), "--passphrase-file", str(passphrase), home=home.path)["encryptedUnder"] == "passphrase"
    assert backup.read_bytes()[len(BACKUP_MAGIC) : len(BACKUP_MAGIC) + 2] == b"\x01\x02"  # header: format 1, passphrase

    master = (home.path / "master.key").read_text().strip()
    target = tmp_path / "new"
    wrong = tmp_path / "wrong"
    wrong.write_text("a different passphrase entirely\n")
    for extra, reason in (((), "give --passphrase-file"), (("--passphrase-file", str(wrong)), "wrong passphrase")):
        done = cli("vault", "restore", str(backup), "--home", str(target), *extra, XKS_PROXY_MASTER_KEY=master)
        assert done.returncode == 1 and reason in done.stderr, done.stderr
        assert not target.exists()
    # The master key from the environment: the new home holds no master.key file at all.
    done = cli("vault", "restore", str(backup), "--home", str(target), "--passphrase-file", str(passphrase), XKS_PROXY_MASTER_KEY=master)
    assert done.returncode == 0, done.stderr
    assert not (target / "master.key").exists()
    listed = cli("keys", "list", home=target, XKS_PROXY_MASTER_KEY=master)
    assert listed.returncode == 0 and listed.stdout.startswith("foo\tENABLED"), listed.stderr


def test_restore_can_rescue_keys_pending_deletion(home: Home, tmp_path: Path) -> None:
    assert cli("keys", "schedule-deletion", "foo", "--pending-days", "7", home=home.path).returncode == 0
    backup = tmp_path / "vault.bak"
    cli_json("vault", "backup", str(backup), home=home.path)
    key = str(home.path / "master.key")
    kept = cli_json("vault", "restore", str(backup), "--home", str(tmp_path / "a"), "--master-key-file", key)
    assert [p["keyId"] for p in kept["pendingDeletion"]] == ["foo"]
    rescued = cli_json("vault", "restore", str(backup), "--home", str(tmp_path / "b"), "--master-key-file", key, "--cancel-pending-deletions")
    assert [p["keyId"] for p in rescued["deletionCancelled"]] == ["foo"]
    assert cli_json("keys", "show", "foo", home=tmp_path / "b")["keyStatus"] == "DISABLED"
    assert cli_json("keys", "show", "foo", home=tmp_path / "a")["keyStatus"] == "PENDING_DELETION"
    assert os.listdir(tmp_path / "b")
