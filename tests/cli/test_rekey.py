"""`vault rekey` (a new seal, same master key) and sealed backups that restore only with the shares of their day."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from keymanager.crypto import Keyring, MasterKey
from tests.support.sealing import (
    PASSPHRASE,
    assert_no_secrets,
    create_keys,
    init,
    keyring,
    loaded,
    master_texts,
    open_all,
    passphrase_file,
    run,
    seal_under,
    share_words,
    shares,
)
from keymanager.seal.home import read_record
from tests.support.lifecycle import cli_env
from xks_proxy import config as configmod

KEYS = ["a", "b"]


def test_rekey_shamir_to_new_shares_then_to_a_passphrase(tmp_path: Path) -> None:
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    home = init(tmp_path / "home", "--seal", "shamir", "--shares", "3", "--threshold", "2", "--share-dir", str(s1))
    ring = keyring(home.path, share_text=shares(s1, 1, 2))
    create_keys(home.path, ring, "test", KEYS)
    before = seal_under(loaded(home.path, ring), "test", KEYS)
    record = (home.path / "seal.json").read_bytes()
    other = init(tmp_path / "other", "--seal", "shamir", "--shares", "3", "--threshold", "2", "--share-dir", str(tmp_path / "o"))
    out = home.outputs

    # Refused: another vault's shares; one share where two are needed. The record is untouched.
    wrong = run(home.path, "vault", "rekey", "--share-dir", str(s2), stdin=shares(tmp_path / "o", 1, 2), outputs=out)
    assert wrong.returncode == 1 and "another vault" in wrong.stderr
    short = run(home.path, "vault", "rekey", "--share-dir", str(s2), stdin=shares(s1, 3), outputs=out)
    assert short.returncode == 1 and "no input" in short.stderr
    assert (home.path / "seal.json").read_bytes() == record and not s2.exists()

    done = run(home.path, "vault", "rekey", "--shares", "4", "--threshold", "3", "--share-dir", str(s2), stdin=shares(s1, 2, 3), outputs=out)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[done.stdout.index("{"):])["seal"] == "shamir"
    assert len(share_words(s2)) == 4
    again = run(home.path, "vault", "rekey", "--share-dir", str(tmp_path / "s3"), stdin=shares(s1, 1, 2), outputs=out)
    assert again.returncode == 1, "the old shares no longer open the home"
    new_ring = keyring(home.path, share_text=shares(s2, 1, 3, 4))
    assert new_ring.current.key_id == ring.current.key_id  # the same master key
    open_all(loaded(home.path, new_ring), "test", before)

    # Shamir to a passphrase: the shares of now open it once more, then the passphrase does.
    pfile = passphrase_file(tmp_path / "pass")
    done = run(home.path, "vault", "rekey", "--seal", "passphrase", "--passphrase-file", str(pfile), stdin=shares(s2, 1, 2, 3), outputs=out)
    assert done.returncode == 0, done.stderr
    open_all(loaded(home.path, keyring(home.path, passphrase=PASSPHRASE)), "test", before)
    assert run(home.path, "vault", "rekey", "--share-dir", str(tmp_path / "s4"), stdin=shares(s2, 1, 2, 3), outputs=out).returncode == 1
    secrets = [*share_words(s1), *share_words(s2), *share_words(tmp_path / "o"), PASSPHRASE, *master_texts(ring)]
    assert_no_secrets(out + other.outputs, secrets)


def test_rekey_a_home_from_before_seals_to_shamir(tmp_path: Path) -> None:
    home = init(tmp_path / "home", "--seal", "file")
    assert (home.path / "master.key").exists() and not (home.path / "seal.json").exists()
    ring = keyring_legacy(home.path)
    create_keys(home.path, ring, "test", KEYS)
    before = seal_under(loaded(home.path, ring), "test", KEYS)
    done = run(home.path, "vault", "rekey", "--seal", "shamir", "--share-dir", str(tmp_path / "s"), outputs=home.outputs)
    assert done.returncode == 0, done.stderr
    assert not (home.path / "master.key").exists()
    assert "master_key" not in tomllib.loads((home.path / "config.toml").read_text())
    new_ring = keyring(home.path, share_text=shares(tmp_path / "s", 1, 3, 5))
    assert new_ring.current.key_id == ring.current.key_id
    open_all(loaded(home.path, new_ring), "test", before)
    assert_no_secrets(home.outputs, [*share_words(tmp_path / "s"), *master_texts(ring)])


def keyring_legacy(home: Path) -> Keyring:
    """The keyring a home opens by itself (master.key, or the file seal)."""
    ring = configmod.load(home).keyring
    assert ring is not None
    return ring


def test_a_backup_restores_only_with_the_shares_of_its_day(tmp_path: Path) -> None:
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    home = init(tmp_path / "home", "--seal", "shamir", "--shares", "3", "--threshold", "2", "--share-dir", str(s1))
    out = home.outputs
    ring = keyring(home.path, share_text=shares(s1, 1, 2))
    create_keys(home.path, ring, "test", KEYS)
    before = seal_under(loaded(home.path, ring), "test", KEYS)
    backup = tmp_path / "before.bak"
    done = run(home.path, "vault", "backup", str(backup), stdin=shares(s1, 1, 3), outputs=out)
    assert done.returncode == 0, done.stderr
    assert b"secret_access_key_sealed" not in backup.read_bytes() and b'"seal": "shamir"' in backup.read_bytes()

    # The home moves on: new shares, a new master key.
    assert run(home.path, "vault", "rekey", "--share-dir", str(s2), stdin=shares(s1, 1, 2), outputs=out).returncode == 0
    done = run(home.path, "vault", "rotate-master-key", stdin=shares(s2, 2, 3, 4), outputs=out)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["masterKeyId"] != ring.current.key_id

    # Today's shares, or none, do not open the old backup; no key file is asked for or accepted.
    refused = run(None, "vault", "restore", str(backup), "--home", str(tmp_path / "r0"), stdin=shares(s2, 1, 2, 4), outputs=out)
    assert refused.returncode == 1 and not (tmp_path / "r0").exists()
    refused = run(None, "vault", "restore", str(backup), "--home", str(tmp_path / "r0"), outputs=out)
    assert refused.returncode == 1 and not (tmp_path / "r0").exists()
    key_file = tmp_path / "some.key"
    key_file.write_text(MasterKey.generate_text())
    refused = run(None, "vault", "restore", str(backup), "--home", str(tmp_path / "r0"), "--master-key-file", str(key_file),
                  stdin=shares(s1, 1, 2), outputs=out)  # fmt: skip
    assert refused.returncode == 1 and "not a key file" in refused.stderr and not (tmp_path / "r0").exists()
    restored = run(None, "vault", "restore", str(backup), "--home", str(tmp_path / "r1"), stdin=shares(s1, 2, 3), outputs=out)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["keys"] == len(KEYS)
    r1 = tmp_path / "r1"
    assert (r1 / "seal.json").exists() and not (r1 / "master.key").exists()
    open_all(loaded(r1, keyring(r1, share_text=shares(s1, 1, 3))), "test", before)

    # A backup of today's home, under a passphrase: restores with today's shares.
    pfile = passphrase_file(tmp_path / "backup-pass")
    after = tmp_path / "after.bak"
    done = run(home.path, "vault", "backup", str(after), "--passphrase-file", str(pfile), stdin=shares(s2, 1, 3, 4), outputs=out)
    assert done.returncode == 0, done.stderr
    restored = run(
        None, "vault", "restore", str(after), "--home", str(tmp_path / "r2"), "--passphrase-file", str(pfile),
        stdin=shares(s2, 3, 5, 1), outputs=out,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    open_all(loaded(tmp_path / "r2", keyring(tmp_path / "r2", share_text=shares(s2, 1, 2, 5))), "test", before)
    assert_no_secrets(out, [*share_words(s1), *share_words(s2), PASSPHRASE, *master_texts(ring)])


def test_a_process_opened_before_a_rekey_follows_a_later_rotation(tmp_path: Path) -> None:
    """A proxy unsealed with the old passphrase holds the old KEK: it adopts the new master key through its link."""
    old_pass, new_pass = passphrase_file(tmp_path / "old"), passphrase_file(tmp_path / "new", "another-passphrase-of-length")
    home = init(tmp_path / "home", "--seal", "passphrase", "--passphrase-file", str(old_pass))
    running = keyring(home.path, passphrase=PASSPHRASE)  # as a serving process holds it
    create_keys(home.path, running, "test", KEYS)
    before = seal_under(loaded(home.path, running), "test", KEYS)
    done = run(home.path, "vault", "rekey", "--seal", "passphrase", "--passphrase-file", str(new_pass),
               "--current-passphrase-file", str(old_pass), outputs=home.outputs)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rotating = subprocess.Popen(
        [sys.executable, "-m", "xks_proxy.cli", "vault", "rotate-master-key", "--current-passphrase-file", str(new_pass)],
        env=cli_env(home.path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    old_id, adopted = running.current.key_id, None  # as a serving process reloads the vault during the rotation
    while rotating.poll() is None and adopted is None:
        keys = loaded(home.path, running)
        if running.current.key_id != old_id and all(k.versions for k in keys.values()):
            adopted = keys  # the vault is under the new key, opened through the link while it was there
        time.sleep(0.05)
    out, err = rotating.communicate(timeout=90)
    home.outputs += [out, err]
    assert rotating.returncode == 0, err
    assert adopted is not None, "the running process did not adopt the new key during the rotation's grace"
    new_id = json.loads(out)["masterKeyId"]
    open_all(adopted, "test", before)
    assert running.current.key_id == new_id and all(k.versions for k in adopted.values())
    final = read_record(home.path)
    assert final is not None and final.links == {}  # the new key sealed under the old one is gone with the rotation
    assert_no_secrets(home.outputs, [PASSPHRASE, "another-passphrase-of-length", *master_texts(running)])


def test_backups_of_a_home_from_before_seals_restore_with_master_key_before_and_after_a_rotation(tmp_path: Path) -> None:
    home = init(tmp_path / "home", "--seal", "file")
    ring = keyring_legacy(home.path)
    create_keys(home.path, ring, "test", KEYS)
    before = seal_under(loaded(home.path, ring), "test", KEYS)
    key_file = tmp_path / "escrowed.key"
    key_file.write_text((home.path / "master.key").read_text())
    out = home.outputs
    assert run(home.path, "vault", "backup", str(tmp_path / "old.bak"), outputs=out).returncode == 0
    done = run(home.path, "vault", "rotate-master-key", outputs=out)
    assert done.returncode == 0, done.stderr
    assert json.loads((home.path / "seal.json").read_text())["seal"] == "file"
    assert run(home.path, "vault", "backup", str(tmp_path / "new.bak"), outputs=out).returncode == 0
    for name in ("old", "new"):  # the same key file opens both: the master key of then, the seal's key of now
        restored = run(None, "vault", "restore", str(tmp_path / f"{name}.bak"), "--home", str(tmp_path / name),
                       "--master-key-file", str(key_file), outputs=out)  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        open_all(loaded(tmp_path / name, keyring_legacy(tmp_path / name)), "test", before)
    assert (tmp_path / "new" / "seal.json").exists() and not (tmp_path / "old" / "seal.json").exists()
    assert_no_secrets(out, [key_file.read_text().strip(), *master_texts(keyring(home.path))])
