"""`xks-proxy`: the command line operators and scripts use.

Every command takes --home (or $XKS_PROXY_HOME, default ~/.xks-proxy). Errors are one line on
stderr and a non-zero exit status; nothing prints a secret except `init` (which creates one)
and `stores export` (whose job it is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from xks_proxy import config as configmod
from xks_proxy.config import ConfigError
from xks_proxy.errors import XksError

EXIT_USAGE = 2
EXIT_FAILED = 1


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
    except KeyboardInterrupt:
        return 130


class CommandError(Exception):
    """A refused command, printed as one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xks-proxy", description="AWS KMS External Key Store proxy")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="proxy home directory (default: $XKS_PROXY_HOME or ~/.xks-proxy)")
    sub = parser.add_subparsers(metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create a new proxy home with one key store")
    init.add_argument("--uri-prefix", default="xks", help="URI path prefix of the first key store (default: xks)")
    init.add_argument("--region", default="us-east-1", help="AWS region that will call the store")
    init.add_argument("--port", type=int, default=8443, help="port to serve on (default: 8443)")
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", parents=[common], help="serve the XKS API")
    _serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="init a fresh demo home with key 'foo', print how to call it, serve")
    demo.add_argument("--home", help="where to create the demo home (default: a new temporary directory)")
    _serve_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="keys in the key manager").add_subparsers(metavar="ACTION")
    store_arg = argparse.ArgumentParser(add_help=False, parents=[common])
    store_arg.add_argument("--store", help="the key store's URI prefix (needed when there are several)")
    create = keys.add_parser("create", parents=[store_arg], help="create a key")
    create.add_argument("key_id")
    create.add_argument("--usage", default="ENCRYPT,DECRYPT", help="comma-separated ENCRYPT,DECRYPT (may be empty)")
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser("list", parents=[store_arg], help="list keys").set_defaults(func=cmd_keys_list)
    for name, helptext in (
        ("show", "show one key"),
        ("disable", "disable a key (crypto refused, metadata says DISABLED)"),
        ("enable", "enable a disabled key"),
        ("rotate", "add a new key version; old ciphertexts keep decrypting"),
    ):
        action = keys.add_parser(name, parents=[store_arg], help=helptext)
        action.add_argument("key_id")
        action.set_defaults(func=_KEY_ACTIONS[name])

    for extra in _EXTRA_COMMANDS:
        extra(sub, common)
    return parser


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: from config)")
    parser.add_argument("--port", type=int, help="port to listen on (default: from config)")
    parser.add_argument("--http", action="store_true", help="plain HTTP, for use behind a TLS-terminating load balancer")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="worker processes sharing the port (default: one per core)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(configmod.home_dir(args.home))


# --- init / serve / demo ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from xks_proxy.home import init_home

    home = configmod.home_dir(args.home)
    akid, secret = init_home(home, args.uri_prefix.strip("/"), args.region, args.port)
    config = configmod.load(home)
    store = config.stores[0]
    print(f"Created proxy home {home}")
    print(f"  key store URI path:   {store.uri_path}")
    print(f"  access key id:        {akid}")
    print(f"  secret access key:    {secret}")
    print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from xks_proxy.runner import serve

    config = _load(args)
    _setup_logging(args.log_level)
    return serve(config, host=args.host, port=args.port, plain_http=args.http, workers=args.workers)


def cmd_demo(args: argparse.Namespace) -> int:
    from xks_proxy.home import init_home
    from xks_proxy.runner import serve

    home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="xks-demo-"))
    port = args.port or 8443
    akid, secret = init_home(home, "demo", "us-east-1", port)
    config = configmod.load(home)
    admin = _admin(config)
    try:
        admin.create_key("demo", "foo", _usage("ENCRYPT,DECRYPT"))
    finally:
        admin.close()
    scheme = "http" if args.http else "https"
    host = args.host or config.server.host
    print(
        "\n".join(
            [
                f"xks-proxy demo home: {home}",
                f"  endpoint:           {scheme}://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}",
                "  URI path:           /demo/kms/xks/v1",
                f"  access key id:      {akid}",
                f"  secret access key:  {secret}",
                "  key:                foo (AES_256, ENCRYPT+DECRYPT)",
                f"  TLS CA:             {home / 'tls' / 'ca.pem'}",
                "Try:",
                f"  curl {'--cacert ' + str(home / 'tls' / 'ca.pem') + ' ' if not args.http else ''}"
                f"--aws-sigv4 aws:amz:us-east-1:kms-xks-proxy --user {akid}:$SECRET "
                "-H 'Content-Type: application/json' "
                """-d '{"requestMetadata":{"kmsRequestId":"1","kmsOperation":"CreateKey","awsPrincipalArn":"me"}}' """
                f"{scheme}://localhost:{port}/demo/kms/xks/v1/keys/foo/metadata",
                f"  (other commands: xks-proxy keys list --home {home})",
            ]
        ),
        flush=True,
    )
    _setup_logging(args.log_level)
    return serve(config, host=args.host, port=port, plain_http=args.http, workers=args.workers)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


# --- keys ----------------------------------------------------------------------------------------


def _admin(config: configmod.Config):  # -> keymanager.base.KeyAdmin
    """The configured backend's key administration (the vault file, or the HSM token)."""
    from keymanager import create_key_admin
    from keymanager.base import KeyAdminError

    try:
        return create_key_admin(config)
    except KeyAdminError as exc:
        raise CommandError(str(exc)) from None


def _usage(text: str):
    from keymanager.vault import VaultError, parse_usage

    try:
        return parse_usage(text)
    except VaultError as exc:
        raise CommandError(f"--usage: {exc}") from None


def _key_command(action: Callable[..., object]) -> Callable[[argparse.Namespace], int]:
    """Run a KeyAdmin action for (store, key id), turning refusals into one-line errors."""

    def run(args: argparse.Namespace) -> int:
        from keymanager.base import KeyAdminError

        config = _load(args)
        store = config.store(args.store)
        key_id = getattr(args, "key_id", None)
        if key_id is not None and not store.allows(key_id):
            raise CommandError(f"key id {key_id} is not in the key_ids of store {store.prefix!r} (config.toml)")
        admin = _admin(config)
        try:
            info = action(admin, store, args)
        except KeyAdminError as exc:
            raise CommandError(str(exc)) from None
        finally:
            admin.close()
        if info is not None:
            print(json.dumps(_key_json(info), indent=2))
        return 0

    return run


def _key_json(info) -> dict[str, object]:  # info: keymanager.base.KeyInfo
    shown: dict[str, object] = {
        "keyId": info.key_id,
        "store": info.store,
        "keyStatus": info.state,
        "keyUsage": [u.value for u in info.usage],
        "keySpec": info.key_spec,
    }
    if info.versions is not None:
        shown["versions"] = info.versions
    if info.created_at is not None:
        shown["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_at))
    return shown


def _list(admin, store: configmod.Store, args: argparse.Namespace) -> None:
    for info in admin.keys(store.prefix):
        if not store.allows(info.key_id):
            continue
        usage = ",".join(u.value for u in info.usage) or "-"
        last = f"versions={info.versions}" if info.versions is not None else f"keySpec={info.key_spec}"
        print(f"{info.key_id}\t{info.state}\t{usage}\t{last}")


cmd_keys_create = _key_command(
    lambda admin, store, args: admin.create_key(store.prefix, _checked_key_id(args.key_id), _usage(args.usage))
)
cmd_keys_list = _key_command(_list)
_KEY_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": _key_command(lambda admin, store, args: admin.key(store.prefix, args.key_id)),
    "disable": _key_command(lambda admin, store, args: admin.set_state(store.prefix, args.key_id, "DISABLED")),
    "enable": _key_command(lambda admin, store, args: admin.set_state(store.prefix, args.key_id, "ENABLED")),
    "rotate": _key_command(lambda admin, store, args: admin.rotate(store.prefix, args.key_id)),
}


def _checked_key_id(key_id: str) -> str:
    if not configmod.KEY_ID_RE.match(key_id):
        raise CommandError(f"key id {key_id!r} must be 1-128 characters of [A-Za-z0-9._-]")
    return key_id


def _conformance(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    try:
        from xks_proxy import conformance
    except ImportError:
        return
    parser = sub.add_parser("conformance", help="check any XKS proxy the way AWS KMS will use it")
    conformance.add_arguments(parser)
    parser.set_defaults(func=conformance.run)


def _stores_and_credentials(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy import stores_cli

    stores_cli.register(sub, common)


def _import_config(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy import import_config

    import_config.register(sub, common)


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]] = [
    _conformance,
    _stores_and_credentials,
    _import_config,
]


if __name__ == "__main__":
    sys.exit(main())
