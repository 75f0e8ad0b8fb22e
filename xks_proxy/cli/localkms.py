"""`xks-proxy local-kms`: a local AWS KMS (the KMS API on its wire protocol) in front of any XKS proxy.

    xks-proxy local-kms [--state DIR] [--host H] [--port N] [--http] [--region R] [--account A] [--ca-bundle FILE]
    xks-proxy local-kms principal add NAME [--state DIR]

The first start creates DIR (its seal, state.db) and one principal, and prints its credentials
once, in a form ~/.aws/credentials takes; later starts print the first two lines only. HTTPS
with a development certificate made in DIR/tls is the default (clients trust DIR/tls/ca.pem,
e.g. AWS_CA_BUNDLE); `--http` serves plain HTTP for a laptop and for tests. `--ca-bundle` is the
CA the *proxy's* certificate must chain to (default: the system's CAs, as KMS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

from keymanager.seal.record import SealError
from xks_proxy.cli.common import CommandError
from xks_proxy.devtls import make_dev_certs
from xks_proxy.localkms import home, principals, service
from xks_proxy.localkms.context import Local
from xks_proxy.localkms.state import State

DEFAULT_PORT = 4599
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "local-kms", help="serve a local AWS KMS API that uses XKS proxies for external key stores", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_options(parser, None)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--http", action="store_true", help="serve plain HTTP instead of HTTPS with DIR/tls's development certificate")
    parser.add_argument("--region", help=f"the region callers sign for and ARNs name (first start default {DEFAULT_REGION})")
    parser.add_argument("--account", help=f"the 12-digit account of ARNs (first start default {DEFAULT_ACCOUNT})")
    parser.add_argument("--ca-bundle", help="CA certificates the XKS proxies' TLS certificates must chain to (default: system CAs)")
    parser.set_defaults(func=_serve)
    actions = parser.add_subparsers(metavar="ACTION")
    principal = actions.add_parser("principal", help="manage the principals (access keys) that may call the local KMS")
    principal_actions = principal.add_subparsers(metavar="ACTION", required=True)
    add = principal_actions.add_parser("add", help="add a principal and print its credentials (no running server needed)")
    add.add_argument("name", help="the IAM user name of its ARN")
    _state_options(add, argparse.SUPPRESS)
    add.set_defaults(func=_add_principal)


def _state_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--state", default=default, help="state directory (default $XKS_PROXY_LOCAL_KMS or ~/.xks-proxy-local-kms)")
    parser.add_argument("--seal", choices=("file", "passphrase"), default=default if default is not None else "file",
                        help="how a new state directory is sealed (default file: DIR/seal.key)")
    parser.add_argument("--passphrase-env", default=default, help="environment variable holding the passphrase of a passphrase seal")


def _open(args: argparse.Namespace) -> Local:
    """The state directory opened (made on first use), with region and account kept from its first start."""
    directory = home.state_dir(getattr(args, "state", None))
    try:
        keyring = home.open_or_create(directory, getattr(args, "seal", "file"), getattr(args, "passphrase_env", None))
    except SealError as exc:
        raise CommandError(str(exc)) from None
    state = State(directory / home.STATE_DB)
    settings = state.get("settings", "service") or {}
    region = getattr(args, "region", None) or settings.get("region") or DEFAULT_REGION
    account = getattr(args, "account", None) or settings.get("account") or DEFAULT_ACCOUNT
    if not (account.isdigit() and len(account) == 12):
        raise CommandError("--account must be 12 digits")
    if not settings:
        state.insert("settings", "service", {"region": region, "account": account}, 0.0)
    return Local(state, keyring, region, account, getattr(args, "ca_bundle", None))


def _add_principal(args: argparse.Namespace) -> int:
    local = _open(args)
    try:
        sys.stdout.write(principals.credentials_text(*principals.add(local, args.name)))
    except principals.PrincipalError as exc:
        raise CommandError(str(exc)) from None
    finally:
        local.state.close()
    return 0


def _tls(directory: Path) -> ssl.SSLContext:
    tls = directory / "tls"
    if not (tls / "server.pem").exists():
        make_dev_certs(tls, ("localhost",))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "server.pem", tls / "server.key")
    return context


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    local = _open(args)
    directory = home.state_dir(args.state)
    url = f"{'http' if args.http else 'https'}://{args.host}:{args.port}"
    first = next(iter(local.state.all("principal")), None)
    print(f"local KMS: {url}  region {local.region}  account {local.account}")
    if first is None:
        sys.stdout.write(principals.credentials_text(*principals.add(local, principals.FIRST_PRINCIPAL)))
    else:
        print(f"principal {first['arn']}")
    sys.stdout.flush()
    context = None if args.http else _tls(directory)

    def ready() -> None:
        where = "" if args.http else f" (clients trust {directory / 'tls' / 'ca.pem'})"
        print(f"local KMS serving on {url}{where}", flush=True)

    try:
        asyncio.run(service.run(local, args.host, args.port, context, ready))
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
