"""`xks-proxy init|serve|demo`: make a home, serve it, or both at once for a first try; the server log.

`demo` binds its port before it makes the home and prints credentials, so a start that fails
prints nothing that claims success and leaves no home behind (tests/process/test_startup.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError
from xks_proxy.cli.keys import vault_admin


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: from config)")
    parser.add_argument("--port", type=int, help="port to listen on (default: from config)")
    parser.add_argument("--http", action="store_true", help="plain HTTP, for use behind a TLS-terminating load balancer")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="worker processes sharing the port (default: one per core)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


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
    from xks_proxy.process.sockets import ListenError
    from xks_proxy.process.supervisor import serve

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
    """supervisor.listen, its refusal as a one-line CommandError."""
    from xks_proxy.process.sockets import ListenError, listen

    try:
        return listen(host, port)
    except ListenError as exc:
        raise CommandError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Bind first, then make the home and print how to call it: a failed start prints no credentials."""
    from xks_proxy.process.supervisor import serve

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
        db = vault_admin(configmod.load(home))
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
