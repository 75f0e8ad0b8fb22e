"""What every command group shares: the one-line refusal, who is acting, the home's configuration (opened).

`CommandError` is how a command refuses: `app.main` prints it as one line on stderr
(`xks-proxy: ...`) and exits 1, so a group needs no error class or wrapper of its own.
"""

from __future__ import annotations

import argparse
import getpass
import os

from xks_proxy import config as configmod
from xks_proxy.cli.refusal import CommandError

__all__ = ["CommandError", "actor", "load"]


def actor() -> str:
    """Who runs this command, as audit records and the fleet's change log name them."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name for this uid in this environment
        return f"cli:uid={os.getuid()}"


def load(args: argparse.Namespace) -> configmod.Config:
    """The configuration of the home --home names (default: $XKS_PROXY_HOME or ~/.xks-proxy), opened.

    A sealed home is opened with the shares or the passphrase, asked of the person running the
    command (no echo on a terminal, else one line of stdin each); without them, one line says
    it is sealed and how to proceed. (`keys --admin-url` goes through the running proxy instead
    and never gets here.)
    """
    home = configmod.home_dir(args.home)
    config = configmod.load(home)
    if not config.sealed:
        return config
    from keymanager.seal.home import read_record
    from xks_proxy.cli.secrets_input import open_record
    from xks_proxy.process.hardening import no_core_dumps

    no_core_dumps()  # this process is about to hold shares and the master key
    record = read_record(home, config.vault.dsn)
    if record is None:
        raise CommandError(f"{home} is sealed but has no seal record")
    try:
        keyring = open_record(home, config.vault.dsn, record, config.raw.get("seal") or {})
    except CommandError as exc:
        raise CommandError(
            f"{home} is sealed ({config.seal} seal): {exc}; give this command the shares (one per line) or the passphrase "
            "on stdin or at the prompt, or act through the unsealed running proxy (keys --admin-url)"
        ) from None
    return configmod.load(home, keyring=keyring)
