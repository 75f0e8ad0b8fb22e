"""What every command group shares: the one-line refusal, who is acting, the home's configuration.

`CommandError` is how a command refuses: `app.main` prints it as one line on stderr
(`xks-proxy: ...`) and exits 1, so a group needs no error class or wrapper of its own.
"""

from __future__ import annotations

import argparse
import getpass
import os

from xks_proxy import config as configmod


class CommandError(Exception):
    """A refused command, printed as one line."""


def actor() -> str:
    """Who runs this command, as audit records and the fleet's change log name them."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name for this uid in this environment
        return f"cli:uid={os.getuid()}"


def load(args: argparse.Namespace) -> configmod.Config:
    """The configuration of the home --home names (default: $XKS_PROXY_HOME or ~/.xks-proxy)."""
    return configmod.load(configmod.home_dir(args.home))
