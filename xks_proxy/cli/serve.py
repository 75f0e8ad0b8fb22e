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
from pathlib import Path

from typing import TYPE_CHECKING

from keymanager.seal.record import KINDS, SealError
from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError
from xks_proxy.cli.keys import vault_admin

if TYPE_CHECKING:
    from keymanager.seal.kinds import NewSeal


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    init = sub.add_parser("init", parents=[common], help="create a new proxy home with one key store")
    init.add_argument("--uri-prefix", default="xks", help="URI path prefix of the first key store (default: xks)")
    init.add_argument("--region", default="us-east-1", help="AWS region that will call the store")
    init.add_argument("--port", type=int, default=8443, help="port to serve on (default: 8443)")
    seal_arguments(init)
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", parents=[common], help="serve the XKS API")
    _serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="init a fresh demo home with key 'foo', print how to call it, serve")
    demo.add_argument("--home", help="where to create the demo home (default: $XDG_STATE_HOME/xks-proxy/demo or ~/.local/state/xks-proxy/demo, replaced by the next demo)")
    demo.add_argument(
        "--with-kms", action="store_true", help="also run a local AWS KMS wired to this proxy (key foo); print an aws kms encrypt line"
    )
    _serve_arguments(demo)
    demo.set_defaults(func=cmd_demo)


def _at_least_one(text: str) -> int:
    """--workers: a whole number from 1 (0 would serve nothing while saying it serves)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not all the host has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: from config)")
    parser.add_argument("--port", type=int, help="port to listen on (default: from config)")
    parser.add_argument("--http", action="store_true", help="plain HTTP, for use behind a TLS-terminating load balancer")
    parser.add_argument(
        "--workers", type=_at_least_one, default=usable_cores(),
        help="worker processes sharing the port (default: one per core this process may run on)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", choices=["json", "text"],
        help="stderr lines as JSON objects (serve's default, for log shippers) or text (demo's default, for a person)",
    )  # fmt: skip


def seal_arguments(parser: argparse.ArgumentParser) -> None:
    """How a new seal is chosen: `init` and `vault rekey`."""
    parser.add_argument(
        "--seal", choices=KINDS, default="shamir",
        help="what guards the master key (default shamir; file keeps it in clear, for development)",
    )  # fmt: skip
    parser.add_argument("--shares", type=int, default=5, help="shamir: shares to make (default 5)")
    parser.add_argument("--threshold", type=int, default=3, help="shamir: shares needed to unseal (default 3)")
    parser.add_argument("--share-dir", help="shamir: write each share to its own file here (0600) instead of printing them")
    parser.add_argument("--passphrase-file", help="passphrase seal: read the passphrase from this file (else a prompt)")
    parser.add_argument("--passphrase-env", help="passphrase seal: the NAME of an environment variable holding it")
    parser.add_argument("--pkcs11-module", help="pkcs11 seal: the PKCS#11 library")
    parser.add_argument("--pkcs11-token", help="pkcs11 seal: the token label")
    parser.add_argument("--pkcs11-key-label", default="xks-proxy-seal", help="pkcs11 seal: label of the AES wrapping key")
    parser.add_argument("--pin-file", help="pkcs11 seal: file holding the user PIN (0600)")


def new_seal(args: argparse.Namespace) -> "NewSeal | None":
    """The seal `args` ask for (None: the file seal, master key in clear). CommandError if it cannot be made."""
    from keymanager.seal.kinds import make
    from xks_proxy.cli.secrets_input import passphrase

    try:
        if args.seal == "file":
            return None
        if args.seal == "passphrase":
            return make("passphrase", passphrase=passphrase(args.passphrase_file, args.passphrase_env, confirm=True))
        if args.seal == "pkcs11":
            pin = _pin(args.pin_file)
            hsm = {"module": args.pkcs11_module, "token_label": args.pkcs11_token, "key_label": args.pkcs11_key_label}
            return make("pkcs11", hsm=hsm, pin=pin)
        if args.share_dir and Path(args.share_dir).exists() and any(Path(args.share_dir).iterdir()):
            raise CommandError(f"--share-dir: {args.share_dir} is not empty; shares are written only into a new or empty directory")
        return make("shamir", shares=args.shares, threshold=args.threshold)
    except SealError as exc:
        raise CommandError(str(exc)) from None


def _pin(path: str | None) -> str:
    if not path:
        raise CommandError("--pin-file: the pkcs11 seal needs the token's user PIN in a file (chmod 600)")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise CommandError(f"--pin-file: cannot read {path}: {exc.strerror}") from None


def hand_out(seal: "NewSeal", share_dir: str | None) -> None:
    """Print each share once, or write each to its own 0600 file. They are never stored in the home."""
    if seal.kind != "shamir":
        return
    threshold = seal.params["threshold"]
    if share_dir:
        folder = Path(share_dir)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, share in enumerate(seal.shares, 1):
            fd = os.open(folder / f"share-{i}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(share + "\n")
        print(f"Wrote {len(seal.shares)} unseal shares to {folder}/share-1.txt ... share-{len(seal.shares)}.txt;")
        print(f"any {threshold} of them unseal the proxy. Hand each to a different person, then delete the files.")
        return
    print(f"Unseal shares (any {threshold} of {len(seal.shares)} unseal the proxy). Each is shown once, here only:")
    for i, share in enumerate(seal.shares, 1):
        print(f"  share {i}: {share}")
    print("Hand each share to a different person. Nothing in the home can unseal it.")


def _auto_unseal(seal: "NewSeal | None", args: argparse.Namespace) -> dict[str, str]:
    """config.toml's [seal]: how a start opens the seal without a person (containers, HSMs).

    --passphrase-env at init names the variable every start reads; --pin-file of the pkcs11 seal
    is where every start reads the token's PIN (an absolute path: the file stays where it is).
    """
    if seal is not None and seal.kind == "passphrase" and args.passphrase_env:
        return {"passphrase_env": args.passphrase_env}
    if seal is not None and seal.kind == "pkcs11" and args.pin_file:
        return {"pin_file": str(Path(args.pin_file).expanduser().resolve())}
    return {}


def cmd_init(args: argparse.Namespace) -> int:
    from xks_proxy.cli.home import init_home

    home = configmod.home_dir(args.home)
    seal = new_seal(args)
    if seal is not None and args.share_dir:
        hand_out(seal, args.share_dir)  # the shares are safe before the home that needs them exists
    # --passphrase-env at init also opens the seal at every start (containers): [seal] passphrase_env.
    auto = _auto_unseal(seal, args)
    akid, secret = init_home(home, args.uri_prefix.strip("/"), args.region, args.port, seal=seal, seal_settings=auto)
    store_path = f"/{args.uri_prefix.strip('/')}/kms/xks/v1"
    print(f"Created proxy home {home}")
    print(f"  seal:                 {args.seal}" + ("  (the master key is in clear in master.key: development only)" if seal is None else ""))
    print(f"  key store URI path:   {store_path}")
    print(f"  access key id:        {akid}")
    print(f"  secret access key:    {secret}")
    print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    if seal is not None and not args.share_dir:
        hand_out(seal, None)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from xks_proxy.process.hardening import no_core_dumps
    from xks_proxy.process.sockets import ListenError
    from xks_proxy.process.supervisor import serve

    no_core_dumps()  # before the seal opens: no core file ever holds the master key
    _setup_logging(args.log_level, args.log_format or "json")
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
    import shlex
    import sys

    from xks_proxy.process.hardening import no_core_dumps
    from xks_proxy.process.supervisor import serve

    if args.with_kms and args.http:
        raise CommandError("--with-kms: KMS calls XKS proxies over HTTPS only; drop --http")
    no_core_dumps()
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
    me = Path(sys.argv[0])  # the xks-proxy running, as an absolute path: a new shell has no .venv/bin on PATH
    sibling = Path(sys.executable).with_name("xks-proxy")
    command = str(me.absolute()) if me.name == "xks-proxy" else str(sibling) if sibling.is_file() else f"{sys.executable} -m xks_proxy.cli"
    print(
        "\n".join(
            [
                f"xks-proxy demo home: {home}" + ("" if args.home else "  (a demo: the next `demo` replaces it)"),
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
                f"  (other commands: {command} keys list --home {shlex.quote(str(home))})",
            ]
        ),
        flush=True,
    )
    _setup_logging(args.log_level, args.log_format or "text")
    from xks_proxy.cli import demo_kms

    endpoint = f"https://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
    kms = demo_kms.start(home, endpoint, akid, secret, home / "tls" / "ca.pem") if args.with_kms else None
    try:
        return serve(config, host=host, port=port, plain_http=args.http, workers=args.workers, sock=sock)
    finally:
        demo_kms.stop(kms)


def _demo_home(where: str | None, port: int) -> tuple[Path, str, str]:
    """A new home with key 'foo': (home, access key id, secret). Removed again if making it fails.

    Without --home it is one fixed place per user, $XDG_STATE_HOME/xks-proxy/demo (default
    ~/.local/state/xks-proxy/demo), replaced by the next `demo`: a demo's keys are throwaway, and
    a new temporary directory per run piled up in /tmp. Kept after exit, not removed, so the
    printed commands (keys list, the curl line's CA) still work while a person looks at it. A
    lock held until this process exits keeps a second default demo from replacing a running one.
    """
    import fcntl

    from keymanager.base import parse_usage
    from xks_proxy.cli.home import init_home

    if where:
        home = Path(where).resolve()
        existed = home.exists()
    else:
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "xks-proxy"
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(state / "demo.lock", os.O_RDWR | os.O_CREAT, 0o600)  # left open: held until exit
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise CommandError(f"another demo is running on {state / 'demo'}; give this one its own --home") from None
        home, existed = state / "demo", False
        shutil.rmtree(home, ignore_errors=True)
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


def _setup_logging(level: str, form: str) -> None:
    """The server log on stderr, written in batches (xks_proxy/process/logsink.py)."""
    from xks_proxy.process.logsink import setup_stderr

    setup_stderr(level, form)
