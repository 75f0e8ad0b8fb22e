"""`xks-proxy`: the command line operators and scripts use; the parser is assembled here, and only here.

Every command takes --home (or $XKS_PROXY_HOME, default ~/.xks-proxy). Errors are one line on
stderr and a non-zero exit status; nothing prints a secret except `init` (which creates one)
and `stores export` (whose job it is).

Each command group is a module of this package with `register(subparsers, common)`; `GROUPS`
lists them in the order `xks-proxy --help` shows them. A new group is a new module and one
line there.
"""

from __future__ import annotations

import argparse
import os
import sys

from keymanager.base import KeyAdminError
from xks_proxy.cli import conformance, credentials, fleet, import_config, keys, serve, stores, unseal, vault
from xks_proxy.cli import localkms
from xks_proxy.cli.common import CommandError
from xks_proxy.config import ConfigError
from xks_proxy.errors import XksError

EXIT_USAGE = 2
EXIT_FAILED = 1

GROUPS = (serve, unseal, keys, conformance, credentials, stores, import_config, vault, fleet, localkms)


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # every file the proxy writes (vault, WAL, keys, config) is owner-only
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"xks-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except XksError as exc:  # the key manager could not start (e.g. the HSM refused the PIN)
        print(f"xks-proxy: cannot start: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyAdminError as exc:  # e.g. the vault database does not answer: nothing was changed
        print(f"xks-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xks-proxy", description="AWS KMS External Key Store proxy")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="proxy home directory (default: $XKS_PROXY_HOME or ~/.xks-proxy)")
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in GROUPS:
        group.register(sub, common)
    return parser
