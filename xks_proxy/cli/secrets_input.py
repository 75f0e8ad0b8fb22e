"""Reading what opens a seal (shares, passphrases, PINs) from a person, never from argv.

From the terminal without echo when stdin is one, else one line of stdin (a pipe, a script);
a passphrase also from a file (owner-only) or, for containers, an environment variable whose
*name* is given. Nothing read here is printed, logged or put into a child's environment.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from keymanager.crypto import Keyring
from keymanager.seal.home import secret_from
from keymanager.seal.kinds import Unsealer
from keymanager.seal.record import SealError, SealRecord
from xks_proxy.cli.refusal import CommandError

PASSPHRASE_ENV = "XKS_PROXY_PASSPHRASE"


def ask(prompt: str) -> str:
    """One secret line: from the terminal without echo, or from stdin. CommandError at end of input."""
    if sys.stdin.isatty():
        try:
            return getpass.getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            raise CommandError("no input given") from None
    line = sys.stdin.readline()
    if not line:
        raise CommandError("no input on stdin (expected one line per share or passphrase)")
    return line.rstrip("\r\n")


def passphrase(file: str | None, env: str | None, confirm: bool = False, what: str = "passphrase") -> bytes:
    """--passphrase-file, or the environment variable named by --passphrase-env, or a prompt."""
    try:
        text = secret_from(Path.cwd(), {"passphrase_file": file, "passphrase_env": env}, "passphrase")
    except SealError as exc:
        raise CommandError(str(exc).replace("seal.passphrase_file", "--passphrase-file").replace("seal.passphrase_env", "--passphrase-env")) from None
    if text is None:
        text = ask(f"{what}: ")
        if confirm and sys.stdin.isatty() and ask(f"{what} again: ") != text:
            raise CommandError("the two passphrases differ")
    return text.encode()


def open_kek(record: SealRecord, file: str | None = None, env: str | None = None) -> object:
    """The KEK of `record` from a person: K shares one by one, or the passphrase (a CLI command's unseal)."""
    from keymanager.crypto import ShareError
    from keymanager.seal.kinds import passphrase_kek

    if record.kind == "passphrase":
        return passphrase_kek(record.params, passphrase(file, env or PASSPHRASE_ENV if env or os.environ.get(PASSPHRASE_ENV) else None))
    if record.kind != "shamir":
        raise CommandError(f"the {record.kind} seal opens by itself; it needs no shares or passphrase")
    unsealer = Unsealer(record)
    while True:
        try:
            kek = unsealer.add_share(ask(f"share {unsealer.given + 1} of {unsealer.threshold}: "))
        except ShareError as exc:
            raise CommandError(str(exc)) from None
        if kek is not None:
            return kek


def open_record(home: Path, dsn: str | None, record: SealRecord, seal_table: dict[str, object]) -> Keyring:
    """The keyring of `record`: by itself if the seal opens so (file, pkcs11, a configured passphrase), else from a person."""
    from keymanager.seal.home import auto_open, open_with

    try:
        keyring = auto_open(home, dsn, record, dict(seal_table))
        return keyring if keyring is not None else open_with(home, dsn, record, open_kek(record))
    except SealError as exc:
        raise CommandError(str(exc)) from None
