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
import importlib.metadata
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
EXIT_BROKEN_PIPE = 141  # as a shell reports a command a closed pipe stopped (128 + SIGPIPE)

GROUPS = (serve, unseal, keys, conformance, credentials, stores, import_config, vault, fleet, localkms)


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # every file the proxy writes (vault, WAL, keys, config) is owner-only
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "home", None) is None and args.home_first is not None:
        args.home = args.home_first  # `xks-proxy --home H keys list` means what `keys list --home H` does
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) is seen here, not at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say, and no traceback
        return EXIT_BROKEN_PIPE
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
    parser.add_argument("--version", action="version", version=f"xks-proxy {_version()}")
    parser.add_argument("--home", dest="home_first", metavar="HOME", help="proxy home (here or after the command)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="proxy home directory (default: $XKS_PROXY_HOME or ~/.xks-proxy)")
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in GROUPS:
        group.register(sub, common)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("xks-proxy")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
