"""`xks-proxy unseal|seal`: open or close a running proxy's seal through its control socket.

`unseal` reads one share (or the passphrase) from the terminal without echo, or one line of
stdin, and hands it to the proxy serving this home over `<home>/control.sock` (0600, owner and
root only; process/control_socket.py): never argv, never the environment, never the network.
It prints the progress ("2 of 3 shares given"), never the share. K people each run it once;
`--reset` discards the shares given so far, `--status` only asks. `seal` drops the running
proxy's master keys at once (incident response): it answers 503 until unsealed again.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import Any

from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError

#: How long a request may take: a passphrase's Argon2id, an HSM login, a fleet database.
REPLY_TIMEOUT = 60.0
#: How long `unseal` waits, after the last share, for a worker to serve before it says so.
SERVING_WAIT = 10.0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    unseal = sub.add_parser("unseal", parents=[common], help="give a running sealed proxy one share (or its passphrase)")
    what = unseal.add_mutually_exclusive_group()
    what.add_argument("--reset", action="store_true", help="discard the shares given so far")
    what.add_argument("--status", action="store_true", help="only say whether the proxy is sealed, and the progress")
    unseal.set_defaults(func=cmd_unseal)
    seal = sub.add_parser("seal", parents=[common], help="seal a running proxy now: it drops its master keys and answers 503")
    seal.set_defaults(func=cmd_seal)


def request(home: Path, message: dict[str, Any]) -> dict[str, Any]:
    """One request line to the proxy serving `home`, its reply; CommandError if none answers or it refuses."""
    path = home / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(str(path))
            try:
                sock.sendall(json.dumps(message).encode() + b"\n")
            except BrokenPipeError:  # refused at accept (another uid): its one line is waiting to be read
                pass
            reply = sock.makefile("rb").readline()
        except (FileNotFoundError, ConnectionRefusedError):
            raise CommandError(f"no running proxy serves {home} (no control socket {path} answers)") from None
        except OSError as exc:
            raise CommandError(f"cannot talk to the proxy on {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(reply)
    except ValueError:
        raise CommandError("the proxy's control socket answered nothing readable") from None
    if not isinstance(answer, dict):
        raise CommandError("the proxy's control socket answered nothing readable")
    if "error" in answer:
        raise CommandError(str(answer["error"]))
    return answer


def progress(status: dict[str, Any]) -> str:
    if not status.get("sealed"):
        return "unsealed: serving" if status.get("serving") else "unsealed; the workers are starting"
    if status.get("seal") == "shamir":
        given, threshold = int(status.get("given", 0)), int(status.get("threshold", 0))
        return f"sealed: {given} of {threshold} shares given; {threshold - given} more needed"
    return f"sealed ({status.get('seal')} seal)"


def cmd_unseal(args: argparse.Namespace) -> int:
    from xks_proxy.cli.secrets_input import ask
    from xks_proxy.process.hardening import no_core_dumps

    no_core_dumps()  # this process is about to hold a share
    home = configmod.home_dir(args.home)
    status = request(home, {"op": "reset" if args.reset else "status"})
    if args.reset or args.status or not status.get("sealed"):
        print(("shares given so far discarded; " if args.reset else "") + progress(status))
        return 0
    message: dict[str, Any] = {"op": "unseal"}
    if status.get("seal") == "shamir":
        message["share"] = ask(f"share {int(status.get('given', 0)) + 1} of {status.get('threshold')}: ")
    elif status.get("seal") == "passphrase":
        message["passphrase"] = ask("passphrase: ")
    reply = request(home, message)
    message.clear()
    if reply.get("unsealed"):
        reply = _until_serving(home, reply)
    print(progress(reply))
    return 0


def _until_serving(home: Path, status: dict[str, Any]) -> dict[str, Any]:
    """Wait (bounded) until a worker serves, so "serving" is printed only when it is true."""
    deadline = time.monotonic() + SERVING_WAIT
    while not status.get("serving") and not status.get("sealed") and time.monotonic() < deadline:
        time.sleep(0.1)
        status = request(home, {"op": "status"})
    if status.get("sealed"):
        raise CommandError("the shares opened the seal, but the proxy could not start serving and is sealed again: see its log")
    return status


def cmd_seal(args: argparse.Namespace) -> int:
    reply = request(configmod.home_dir(args.home), {"op": "seal"})
    print(f"sealed ({reply.get('seal')} seal): the proxy dropped its master keys and answers 503 until `xks-proxy unseal`")
    return 0
