"""Key states through the real CLI and real signed HTTP: pending import, disable, deletion, upgrade."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sqlite3
import struct
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymanager.crypto import MasterKey
from keymanager.vault.db import VaultDB, material_context
from tests.conftest import Home, b64, metadata, unb64
from tests.support.lifecycle import acli, cli, cli_json, serving, wait_for

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM


async def test_key_without_material_is_pending_import(home: Home) -> None:
    made = cli_json("keys", "create", "ext", "--no-material", home=home.path)
    assert (made["keyStatus"], made["origin"], made["versions"]) == ("PENDING_IMPORT", "EXTERNAL", 0)
    async with serving(home) as live:
        status, meta = await live.client.call("metadata", "ext", requestMetadata=metadata("CreateKey"))
        assert (status, meta["keyStatus"]) == (200, "DISABLED")
        status, body = await live.client.encrypt("ext", b"data")
        assert (status, body["errorName"]) == (400, "InvalidStateException")
        status, enc = await live.client.encrypt("foo", b"data")
        assert status == 200
        status, body = await live.client.decrypt("ext", enc)
        assert (status, body["errorName"]) == (400, "InvalidStateException")
    for action, reason in (("enable", "import it"), ("disable", "no key material"), ("rotate", "imported key material")):
        done = cli("keys", action, "ext", home=home.path)
        assert done.returncode == 1 and reason in done.stderr, (action, done.stderr)
        assert "Traceback" not in done.stderr


async def test_schedule_and_cancel_deletion(home: Home) -> None:
    async with serving(home) as live:
        client = live.client
        status, enc = await client.encrypt("foo", b"keep me", aad=b"ctx")
        assert status == 200
        for days in ("6", "31"):
            rc, _, err = await acli("keys", "schedule-deletion", "foo", "--pending-days", days, home=home.path)
            assert rc == 1 and "7 to 30" in err
        rc, out, err = await acli("keys", "schedule-deletion", "foo", "--pending-days", "7", home=home.path)
        assert rc == 0, err
        info = json.loads(out)
        assert info["keyStatus"] == "PENDING_DELETION"
        when = time.mktime(time.strptime(info["deletionDate"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert abs(when - (time.time() + 7 * 86400)) < 120

        async def refused() -> bool:
            status, body = await client.encrypt("foo", b"x")
            return status == 400 and body["errorName"] == "InvalidStateException"

        await wait_for(refused)
        status, meta = await client.call("metadata", "foo", requestMetadata=metadata("DescribeKey"))
        assert meta["keyStatus"] == "DISABLED"
        status, body = await client.decrypt("foo", enc, aad=b"ctx")
        assert (status, body["errorName"]) == (400, "InvalidStateException")

        for args, reason in (
            (("enable", "foo"), "cancel the deletion first"),
            (("disable", "foo"), "already refuses"),
            (("schedule-deletion", "foo", "--pending-days", "30"), "already scheduled"),
            (("rotate", "foo"), "PENDING_DELETION"),
        ):
            rc, _, err = await acli("keys", *args, home=home.path)
            assert rc == 1 and reason in err, (args, err)

        rc, out, err = await acli("keys", "cancel-deletion", "foo", home=home.path)
        assert rc == 0, err
        assert json.loads(out)["keyStatus"] == "DISABLED"  # as KMS: cancelled keys come back disabled
        rc, _, err = await acli("keys", "cancel-deletion", "foo", home=home.path)
        assert rc == 1 and "not pending deletion" in err
        rc, _, err = await acli("keys", "enable", "foo", home=home.path)
        assert rc == 0, err

        async def decrypts() -> bool:
            status, body = await client.decrypt("foo", enc, aad=b"ctx")
            return status == 200 and unb64(body["plaintext"]) == b"keep me"

        await wait_for(decrypts)


def _backdate_deletion(home: Home, key_id: str) -> None:
    """Stand-in for waiting out the period: the test moves the date, as time would."""
    conn = sqlite3.connect(home.path / "vault.db")
    with conn:
        conn.execute("UPDATE keys SET deletion_date = ? WHERE key_id = ?", (time.time() - 1, key_id))
    conn.close()


def _vault_bytes(home: Home) -> bytes:
    return b"".join(p.read_bytes() for p in home.path.glob("vault.db*") if p.is_file())


async def test_running_server_destroys_key_after_waiting_period(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy.audit")
    home.create_key("bar")
    conn = sqlite3.connect(home.path / "vault.db")
    (blob,) = conn.execute("SELECT sealed FROM key_versions WHERE key_id = 'foo'").fetchone()
    conn.close()
    assert blob in _vault_bytes(home)
    async with serving(home) as live:
        client = live.client
        rc, _, err = await acli("keys", "schedule-deletion", "foo", "--pending-days", "7", home=home.path)
        assert rc == 0, err
        rc, _, err = await acli("keys", "schedule-deletion", "bar", "--pending-days", "7", home=home.path)
        assert rc == 0, err
        _backdate_deletion(home, "foo")

        async def gone() -> bool:
            status, body = await client.call("metadata", "foo", requestMetadata=metadata("DescribeKey"))
            return status == 404 and body["errorName"] == "KeyNotFoundException"

        await wait_for(gone)
        status, meta = await client.call("metadata", "bar", requestMetadata=metadata("DescribeKey"))
        assert (status, meta["keyStatus"]) == (200, "DISABLED")  # not due yet: still there
    done = cli("keys", "show", "foo", home=home.path)
    assert done.returncode == 1 and "no key foo" in done.stderr
    assert blob not in _vault_bytes(home), "destroyed material must not linger in the vault file"
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "xks_proxy.audit"]
    assert any(e["action"] == "destroy" and e["keyId"] == "foo" for e in events)


def test_next_cli_command_destroys_due_keys(home: Home) -> None:
    home.create_key("bar")
    assert cli("keys", "schedule-deletion", "foo", "--pending-days", "30", home=home.path).returncode == 0
    assert cli("keys", "schedule-deletion", "bar", "--pending-days", "30", home=home.path).returncode == 0
    _backdate_deletion(home, "foo")
    done = cli("keys", "list", home=home.path)
    assert done.returncode == 0, done.stderr
    assert "destroyed key foo" in done.stderr
    lines = done.stdout.splitlines()
    assert not any(line.startswith("foo\t") for line in lines)
    assert any(line.startswith("bar\tPENDING_DELETION") for line in lines)


def test_deletion_waits_for_the_full_period(home: Home) -> None:
    """The sweep by the clock, in-process: one second early nothing happens, at the date it does."""
    cfg = home.config
    db = home.vault()
    scheduled = db.schedule_deletion(home.prefix, "foo", 7)
    db.close()
    assert scheduled.deletion_date is not None
    early = VaultDB(cfg.vault.path, cfg.master_key, clock=lambda: scheduled.deletion_date - 1)
    assert early.sweep(actor="test") == []
    assert early.key(home.prefix, "foo").state == "PENDING_DELETION"
    early.close()
    due = VaultDB(cfg.vault.path, cfg.master_key, clock=lambda: scheduled.deletion_date)
    assert [k.key_id for k in due.sweep(actor="test")] == ["foo"]
    due.close()


# --- upgrading a vault made by the first release -------------------------------------------------

# Schema 1 exactly as the first release created it.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS keys (store TEXT NOT NULL, key_id TEXT NOT NULL, state TEXT NOT NULL,
    usage TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (store, key_id));
CREATE TABLE IF NOT EXISTS key_versions (store TEXT NOT NULL, key_id TEXT NOT NULL, version INTEGER NOT NULL,
    sealed BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (store, key_id, version),
    FOREIGN KEY (store, key_id) REFERENCES keys (store, key_id));
"""


def _aad(aad: bytes | None, meta: bytes) -> bytes:
    """The spec's AAD construction, written out here independently of the proxy's code."""
    head = b"\x00\x00" if aad is None else struct.pack(">H", len(aad)) + hashlib.sha256(aad).digest()
    return head + bytes([len(meta)]) + meta


def _make_schema_1_vault(home: Home, material: bytes) -> None:
    master = MasterKey.from_text((home.path / "master.key").read_text())
    path = home.path / "vault.db"
    for p in home.path.glob("vault.db*"):
        p.unlink()
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_1)
    now = time.time() - 3600
    with conn:
        for store, key_id, secret in (("#internal", "health", os.urandom(32)), (home.prefix, "old", material)):
            conn.execute("INSERT INTO keys VALUES (?, ?, 'ENABLED', 'ENCRYPT,DECRYPT', ?)", (store, key_id, now))
            conn.execute(
                "INSERT INTO key_versions VALUES (?, ?, 1, ?, ?)", (store, key_id, master.seal(secret, material_context(store, key_id, 1)), now)
            )
    conn.close()


async def test_schema_1_vault_upgrades_in_place(home: Home) -> None:
    material = os.urandom(32)
    _make_schema_1_vault(home, material)
    meta = struct.pack(">BI", 1, 1)
    iv = os.urandom(12)
    sealed = AESGCM(material).encrypt(iv, b"written before the upgrade", _aad(b"ctx", meta))
    made_before = {
        "ciphertext": b64(sealed[:-16]),
        "initializationVector": b64(iv),
        "authenticationTag": b64(sealed[-16:]),
        "ciphertextMetadata": b64(meta),
    }
    started = time.time()
    async with serving(home) as live:
        status, body = await live.client.decrypt("old", made_before, aad=b"ctx")
        assert status == 200, body
        assert unb64(body["plaintext"]) == b"written before the upgrade"
        status, enc = await live.client.encrypt("old", b"after", aad=b"ctx")
        assert status == 200 and base64.b64decode(enc["ciphertextMetadata"]) == meta
    conn = sqlite3.connect(home.path / "vault.db")
    assert conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (2,)
    conn.close()
    versions = cli_json("keys", "versions", "old", "--json", home=home.path)["versions"]
    assert len(versions) == 1 and versions[0]["encryptionsReserved"] == 1
    since = time.mktime(time.strptime(versions[0]["countedSince"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert since >= started - 5  # counting starts at the upgrade, not at creation an hour ago
    assert cli_json("keys", "show", "old", home=home.path)["origin"] == "VAULT"


def test_vault_from_a_newer_release_is_refused(home: Home) -> None:
    conn = sqlite3.connect(home.path / "vault.db")
    with conn:
        conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    conn.close()
    done = cli("keys", "list", home=home.path)
    assert done.returncode == 1
    assert "newer than this xks-proxy" in done.stderr and "Traceback" not in done.stderr
