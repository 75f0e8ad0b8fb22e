"""Helpers for the seal tests (rekey, master key rotation, sealed backups): homes made by the real
CLI, the CLI with shares or a passphrase on stdin, and the vault opened in-process with a keyring."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keymanager.base import parse_usage
from keymanager.crypto import DataKey, Kek, Keyring
from keymanager.seal.home import open_with, read_record
from keymanager.seal.kinds import passphrase_kek
from keymanager.vault.db import VaultDB
from tests.support.lifecycle import cli_env

PASSPHRASE = "correct-horse-battery-staple-42"


@dataclass
class SealedHome:
    """A home made by `xks-proxy init`, with its first store's credential and what opens it."""

    path: Path
    prefix: str
    access_key_id: str
    secret: str = field(repr=False)
    outputs: list[str] = field(default_factory=list, repr=False)  # every CLI output, checked for secrets at the end


def run(home: Path | None, *args: str, stdin: str = "", outputs: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """`xks-proxy ARGS` in a subprocess, `stdin` fed to it (shares, a passphrase), its output kept."""
    done = subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", *args], input=stdin, env=cli_env(home), capture_output=True, text=True, timeout=90
    )
    if outputs is not None:
        outputs.extend((done.stdout, done.stderr))
    return done


def init(path: Path, *seal: str, prefix: str = "test") -> SealedHome:
    outputs: list[str] = []
    done = run(path, "init", "--uri-prefix", prefix, *seal, outputs=outputs)
    assert done.returncode == 0, done.stderr
    akid = re.search(r"access key id:\s+(\S+)", done.stdout)
    secret = re.search(r"secret access key:\s+(\S+)", done.stdout)
    assert akid and secret, done.stdout
    return SealedHome(path, prefix, akid.group(1), secret.group(1), outputs)


def shares(folder: Path, *numbers: int) -> str:
    """Shares `numbers` of a share directory, one per line, as `unseal` prompts read them."""
    return "".join((folder / f"share-{n}.txt").read_text() for n in numbers)


def share_words(folder: Path) -> list[str]:
    return [p.read_text().strip() for p in sorted(folder.glob("share-*.txt"))]


def passphrase_file(path: Path, text: str = PASSPHRASE) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def keyring(home: Path, *, share_text: str | None = None, passphrase: str | None = None, dsn: str | None = None) -> Keyring:
    """The home's keyring in this process: from shares, a passphrase, or as it opens by itself."""
    record = read_record(home, dsn)
    assert record is not None
    if share_text is not None:
        return open_with(home, dsn, record, Kek.from_shares([line for line in share_text.splitlines() if line.strip()]))
    if passphrase is not None:
        return open_with(home, dsn, record, passphrase_kek(record.params, passphrase.encode()))
    from xks_proxy import config as configmod

    opened = configmod.load(home, shared=False).keyring  # with config.toml's [seal] settings
    assert opened is not None
    return opened


def vault(home: Path, ring: Keyring) -> VaultDB:
    return VaultDB(home / "vault.db", ring)


def create_keys(home: Path, ring: Keyring, store: str, names: list[str]) -> None:
    db = vault(home, ring)
    try:
        for name in names:
            db.create_key(store, name, parse_usage("ENCRYPT,DECRYPT"))
    finally:
        db.close()


def loaded(home: Path, ring: Keyring) -> dict[tuple[str, str], Any]:
    db = vault(home, ring)
    try:
        return db.load()[1]
    finally:
        db.close()


def seal_under(keys: dict[tuple[str, str], Any], store: str, names: list[str]) -> dict[str, tuple[bytes, bytes, bytes]]:
    """A ciphertext per key, made with its current version's material (to decrypt after a change)."""
    out = {}
    for name in names:
        key = keys[(store, name)]
        data_key: DataKey = key.versions[key.current]
        out[name] = data_key.encrypt(name.encode(), None, b"")
    return out


def open_all(keys: dict[tuple[str, str], Any], store: str, sealed: dict[str, tuple[bytes, bytes, bytes]]) -> None:
    for name, (iv, ciphertext, tag) in sealed.items():
        key = keys[(store, name)]
        assert key.versions[1].decrypt(iv, ciphertext, tag, None, b"") == name.encode()


def master_texts(ring: Keyring) -> list[str]:
    """The master keys' bytes as text would show them (base64 and hex): never in any output."""
    out = []
    for kid in ring.key_ids:
        raw = ring.master(kid)._material  # a test may look: this is what must never be shown
        out += [base64.b64encode(raw).decode(), raw.hex()]
    return out


def assert_no_secrets(texts: list[str], secrets: list[str]) -> None:
    """No secret, nor (a share) any run of five of its words past the set's common prefix, in any text."""
    for text in texts:
        for secret in secrets:
            words = secret.split()
            pieces = [secret] + [" ".join(words[i : i + 5]) for i in range(4, len(words) - 4)] if len(words) > 8 else [secret]
            assert not any(piece in text for piece in pieces), "a share, passphrase or master key appears in an output"
