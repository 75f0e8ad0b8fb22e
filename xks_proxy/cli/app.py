"""`xks-proxy`: the command line operators and scripts use.

Every command takes --home (or $XKS_PROXY_HOME, default ~/.xks-proxy). Errors are one line on
stderr and a non-zero exit status; nothing prints a secret except `init` (which creates one)
and `stores export` (whose job it is).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from keymanager.base import KeyAdminError
from keymanager.crypto import WRAPPING_ALGORITHMS, WRAPPING_KEY_SPECS
from xks_proxy import config as configmod
from xks_proxy.config import ConfigError
from xks_proxy.errors import XksError

if TYPE_CHECKING:
    from xks_proxy.admin.lifecycle import KeyLifecycle

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
    except KeyAdminError as exc:  # e.g. the vault database does not answer: nothing was changed
        print(f"xks-proxy: {exc}", file=sys.stderr)
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
    store_arg.add_argument("--admin-url", help="act through a running proxy's admin API (https://HOST:PORT), not the local vault")
    store_arg.add_argument("--admin-token-file", help="file holding the admin API bearer token (a JWT)")
    store_arg.add_argument("--admin-ca", help="CA bundle that signed the admin API's certificate (default: system CAs)")
    create = keys.add_parser("create", parents=[store_arg], help="create a key")
    create.add_argument("key_id")
    create.add_argument("--usage", default="ENCRYPT,DECRYPT", help="comma-separated ENCRYPT,DECRYPT (may be empty)")
    create.add_argument("--no-material", action="store_true", help="create without key material (PENDING_IMPORT), to import your own")
    create.set_defaults(func=cmd_keys_create, action_name="create")
    keys.add_parser("list", parents=[store_arg], help="list keys").set_defaults(func=cmd_keys_list, action_name="list")
    for name, helptext in (
        ("show", "show one key"),
        ("disable", "disable a key (crypto refused, metadata says DISABLED)"),
        ("enable", "enable a disabled key"),
        ("rotate", "add a new key version; old ciphertexts keep decrypting"),
        ("versions", "list a key's versions with creation time and encryption counts"),
        ("cancel-deletion", "cancel a scheduled deletion (the key becomes DISABLED)"),
    ):
        action = keys.add_parser(name, parents=[store_arg], help=helptext)
        action.add_argument("key_id")
        action.set_defaults(func=_KEY_ACTIONS[name], action_name=name)
    schedule = keys.add_parser(
        "schedule-deletion", parents=[store_arg], help="destroy a key after a waiting period (crypto refused meanwhile)"
    )
    schedule.add_argument("key_id")
    schedule.add_argument("--pending-days", type=int, default=30, help="waiting period, 7 to 30 days (default 30)")
    schedule.set_defaults(func=_KEY_ACTIONS["schedule-deletion"], action_name="schedule-deletion")
    params = keys.add_parser(
        "get-import-params", parents=[store_arg], help="write a wrapping public key and import token for `keys import`"
    )
    params.add_argument("key_id")
    params.add_argument("--wrapping-algorithm", required=True, choices=WRAPPING_ALGORITHMS)
    params.add_argument("--wrapping-key-spec", required=True, choices=tuple(WRAPPING_KEY_SPECS))
    params.add_argument("--out-dir", default=".", help="where to write WrappingPublicKey.der/.pem and ImportToken (default: .)")
    params.set_defaults(func=_KEY_ACTIONS["get-import-params"], action_name="get-import-params")
    imp = keys.add_parser("import", parents=[store_arg], help="import wrapped key material into a key made with --no-material")
    imp.add_argument("key_id")
    imp.add_argument("--import-token", required=True, metavar="FILE", help="the ImportToken file from get-import-params")
    imp.add_argument("--encrypted-key-material", required=True, metavar="FILE", help="the key material wrapped to the public key")
    imp.set_defaults(func=_KEY_ACTIONS["import"], action_name="import")

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
    from xks_proxy.cli.home import init_home

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
    from xks_proxy.process.runner import ListenError, serve

    _setup_logging(args.log_level)
    config = configmod.load(configmod.home_dir(args.home), shared=False)
    if config.vault.dsn is not None:
        from xks_proxy.fleet.member import wait_for_stores

        config = wait_for_stores(config)
    try:
        return serve(config, host=args.host, port=args.port, plain_http=args.http, workers=args.workers)
    except ListenError as exc:
        raise CommandError(str(exc)) from None


def _listen(host: str, port: int) -> socket.socket:
    """runner.listen, its refusal as a one-line CommandError."""
    from xks_proxy.process.runner import ListenError, listen

    try:
        return listen(host, port)
    except ListenError as exc:
        raise CommandError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Bind first, then make the home and print how to call it: a failed start prints no credentials."""
    from xks_proxy.process.runner import serve

    port = args.port or 8443
    host = args.host or "127.0.0.1"  # what init_home writes as server.host
    sock = _listen(host, port)
    try:
        home, akid, secret = _demo_home(args.home, port)
    except BaseException:
        sock.close()
        raise
    config = configmod.load(home)
    scheme = "http" if args.http else "https"
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
                f"--aws-sigv4 aws:amz:us-east-1:kms-xks-proxy --user '{akid}:{secret}' "
                "-H 'Content-Type: application/json' "
                """-d '{"requestMetadata":{"kmsRequestId":"1","kmsOperation":"CreateKey","awsPrincipalArn":"me"}}' """
                f"{scheme}://localhost:{port}/demo/kms/xks/v1/keys/foo/metadata",
                f"  (other commands: xks-proxy keys list --home {home})",
            ]
        ),
        flush=True,
    )
    _setup_logging(args.log_level)
    return serve(config, host=host, port=port, plain_http=args.http, workers=args.workers, sock=sock)


def _demo_home(where: str | None, port: int) -> tuple[Path, str, str]:
    """A new home with key 'foo': (home, access key id, secret). Removed again if making it fails."""
    from keymanager.base import parse_usage
    from xks_proxy.cli.home import init_home

    home = Path(where).resolve() if where else Path(tempfile.mkdtemp(prefix="xks-demo-"))
    existed = where is not None and home.exists()
    try:
        akid, secret = init_home(home, "demo", "us-east-1", port)
        db = _vault(configmod.load(home))
        try:
            db.create_key("demo", "foo", parse_usage("ENCRYPT,DECRYPT"))
        finally:
            db.close()
    except BaseException:
        if not existed:
            shutil.rmtree(home, ignore_errors=True)
        raise
    return home, akid, secret


def _setup_logging(level: str) -> None:
    """The server log on stderr, written in batches (see xks_proxy/process/logsink.py)."""
    from xks_proxy.process.logsink import BatchHandler

    # Records never show thread, process or caller: don't compute them per request.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # the stdlib's documented switch for findCaller
    handler = BatchHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


# --- keys ----------------------------------------------------------------------------------------


def _vault(config: configmod.Config):  # -> the vault's KeyAdmin
    if config.backend != "vault":
        raise CommandError(f"this command needs the vault backend, not {config.backend!r}")
    return _key_admin(config)


def _key_admin(config: configmod.Config):  # -> keymanager.base.KeyAdmin
    """The configured backend's key administration (the vault file, or the HSM token)."""
    from keymanager import create_key_admin

    try:
        return create_key_admin(config)
    except KeyAdminError as exc:
        raise CommandError(str(exc)) from None


def _key_command(action: Callable[..., object]) -> Callable[[argparse.Namespace], int]:
    """Run a lifecycle action on the local vault or through --admin-url; refusals are one-line errors."""

    def run(args: argparse.Namespace) -> int:
        from xks_proxy.admin.client import AdminError

        try:
            with _lifecycle(args) as keys:
                result = action(keys, args)
        except (KeyAdminError, AdminError) as exc:
            raise CommandError(str(exc)) from None
        if result is not None:
            print(json.dumps(result, indent=2))
        return 0

    return run


@contextmanager
def _lifecycle(args: argparse.Namespace) -> Iterator["KeyLifecycle"]:
    """The admin API client (--admin-url), or the local vault after destroying keys that are due."""
    from keymanager.registry import backend

    if args.admin_url:
        from xks_proxy.admin.client import AdminClient

        if not args.admin_token_file:
            raise CommandError("--admin-url needs --admin-token-file")
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"--admin-token-file: {exc.strerror}: {args.admin_token_file}") from None
        yield AdminClient(args.admin_url, token, args.store, ca_file=args.admin_ca)
        return
    config = _load(args)
    store = config.store(args.store)
    key_id = getattr(args, "key_id", None)
    if key_id is not None and not store.allows(key_id):
        raise CommandError(f"key id {key_id} is not in the key_ids of store {store.prefix!r} (config.toml)")
    from xks_proxy.access import audit

    audit.append_only(config.audit)  # lifecycle actions are audited, from the CLI too
    full_lifecycle = backend(config.backend).lifecycle  # the vault's; its KeyAdmin also sweeps due deletions
    if full_lifecycle is None:
        from xks_proxy.admin.lifecycle import KeyAdminLifecycle

        admin = _key_admin(config)
        try:
            yield KeyAdminLifecycle(admin, store, args.action_name, config.backend)
        finally:
            admin.close()
        return
    db = _vault(config)
    try:
        actor = _cli_actor()
        for info in db.sweep(actor=actor):
            print(f"xks-proxy: destroyed key {info.key_id} in store {info.store!r}: its deletion date passed", file=sys.stderr)
        yield full_lifecycle(db, store.prefix, actor, "cli")
    finally:
        db.close()


def _cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment
        return f"cli:uid={os.getuid()}"


def _list(keys: "KeyLifecycle", args: argparse.Namespace) -> None:
    for info in keys.list():
        usage = ",".join(info["keyUsage"]) or "-"
        last = f"versions={info['versions']}" if "versions" in info else f"keySpec={info['keySpec']}"
        line = f"{info['keyId']}\t{info['keyStatus']}\t{usage}\t{last}"
        if info.get("deletionDate"):
            line += f"\tdeletion={info['deletionDate']}"
        print(line)


def _get_import_params(keys: "KeyLifecycle", args: argparse.Namespace) -> dict[str, object]:
    """Write the wrapping public key (DER and PEM) and the import token, as KMS's console offers them."""
    from cryptography.hazmat.primitives import serialization

    params = keys.import_params(args.key_id, args.wrapping_algorithm, args.wrapping_key_spec)
    der = base64.b64decode(params["publicKey"])
    pem = serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"WrappingPublicKey.der": der, "WrappingPublicKey.pem": pem, "ImportToken": params["importToken"].encode() + b"\n"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    summary = {k: v for k, v in params.items() if k not in ("publicKey", "importToken")}
    return {**summary, "files": [str(out / name) for name in files]}


def _import(keys: "KeyLifecycle", args: argparse.Namespace) -> dict[str, object]:
    try:
        token = Path(args.import_token).read_text().strip()
        material = Path(args.encrypted_key_material).read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {getattr(exc, 'filename', None) or 'the import token'}: {exc}") from None
    return keys.import_material(args.key_id, token, material)


cmd_keys_create = _key_command(lambda keys, args: keys.create(args.key_id, args.usage, args.no_material))
cmd_keys_list = _key_command(_list)
_KEY_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": _key_command(lambda keys, args: keys.show(args.key_id)),
    "disable": _key_command(lambda keys, args: keys.disable(args.key_id)),
    "enable": _key_command(lambda keys, args: keys.enable(args.key_id)),
    "rotate": _key_command(lambda keys, args: keys.rotate(args.key_id)),
    "versions": _key_command(lambda keys, args: keys.versions(args.key_id)),
    "schedule-deletion": _key_command(lambda keys, args: keys.schedule_deletion(args.key_id, args.pending_days)),
    "cancel-deletion": _key_command(lambda keys, args: keys.cancel_deletion(args.key_id)),
    "get-import-params": _key_command(_get_import_params),
    "import": _key_command(_import),
}


def _conformance(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    try:
        from xks_proxy import conformance
    except ImportError:
        return
    parser = sub.add_parser("conformance", help="check any XKS proxy the way AWS KMS will use it")
    conformance.add_arguments(parser)
    parser.set_defaults(func=conformance.run)


def _stores_and_credentials(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy.cli import stores as stores_cli

    stores_cli.register(sub, common)


def _import_config(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy.cli import import_config

    import_config.register(sub, common)


def _vault_backup(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy.cli import vault as backup

    backup.register(sub, common)


def _fleet(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy.cli import fleet as fleet_cli

    fleet_cli.register(sub, common)


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]] = [
    _conformance,
    _stores_and_credentials,
    _import_config,
    _vault_backup,
    _fleet,
]


if __name__ == "__main__":
    sys.exit(main())
