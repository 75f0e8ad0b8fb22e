"""`xks-proxy demo --with-kms`: a local AWS KMS in front of the demo proxy, ready for `aws kms encrypt`.

`start` runs this module as a child process of the demo (so the supervisor forks its workers
from a process without extra threads). The child starts `xks-proxy local-kms` on a free port
with its state in the demo home, waits until the proxy and the local KMS answer, creates and
connects a custom key store for the demo store and a KMS key for xks key `foo`, prints an
`aws kms encrypt` line that works as printed, and stays until it is stopped, stopping the local
KMS with it. The demo store's credential reaches it in its environment, never in its argv.
The local KMS's first-start output holds its principal's secret: it is read through a pipe and
kept in memory only; what the child prints is passed on to stderr without the secret line, and
the secret reaches the terminal once, in the printed `aws` line (a demo prints its credentials).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

_ENV_AKID, _ENV_SECRET = "XKS_DEMO_ACCESS_KEY_ID", "XKS_DEMO_SECRET_ACCESS_KEY"
_STARTED = re.compile(
    r"local KMS: (?P<endpoint>http://\S+)\s+region (?P<region>\S+)\s+account \d+\s*\n\s*principal \S+\s*\n"
    r"\s*aws_access_key_id = (?P<akid>\S+)\s*\n\s*aws_secret_access_key = (?P<secret>\S+)"
)
_READY = "local KMS serving on"
_SECRET_LINE = re.compile(r"aws_secret_access_key")
DEADLINE = 60.0


def start(home: Path, endpoint: str, access_key_id: str, secret: str, ca_bundle: Path | None) -> subprocess.Popen[bytes]:
    """Start the child that brings up the local KMS and wires it to the demo proxy at `endpoint`."""
    args = [sys.executable, "-m", "xks_proxy.cli.demo_kms", "--home", str(home), "--endpoint", endpoint]
    if ca_bundle is not None:
        args += ["--ca-bundle", str(ca_bundle)]
    return subprocess.Popen(args, env={**os.environ, _ENV_AKID: access_key_id, _ENV_SECRET: secret})


def stop(child: subprocess.Popen[bytes] | None) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()


class _Output:
    """The local KMS's stdout, read through a pipe: kept in memory, passed on to stderr without secret lines."""

    def __init__(self, kms: subprocess.Popen[bytes]) -> None:
        self.text = ""
        self._reader = threading.Thread(target=self._read, args=(kms,), daemon=True)
        self._reader.start()

    def _read(self, kms: subprocess.Popen[bytes]) -> None:
        assert kms.stdout is not None
        for raw in kms.stdout:
            line = raw.decode(errors="replace")
            self.text += line
            if not _SECRET_LINE.search(line):
                sys.stderr.write(line)
                sys.stderr.flush()


def _wait(check, what: str, kms: subprocess.Popen[bytes]):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if kms.poll() is not None:
            raise SystemExit(f"xks-proxy demo: the local KMS exited ({kms.returncode}); its output is above")
        time.sleep(0.1)
    raise SystemExit(f"xks-proxy demo: {what} did not happen within {DEADLINE:.0f} s; the local KMS's output is above")


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xks-proxy demo --with-kms")
    parser.add_argument("--home", required=True)
    parser.add_argument("--endpoint", required=True, help="the demo proxy's XksProxyUriEndpoint")
    parser.add_argument("--ca-bundle", help="the CA that signed the demo proxy's certificate")
    parser.add_argument("--uri-path", default="/demo/kms/xks/v1")
    parser.add_argument("--xks-key-id", default="foo")
    args = parser.parse_args(argv)
    home = Path(args.home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "xks_proxy.cli", "local-kms", "--state", str(home / "local-kms"), "--port", str(port), "--http"]
    if args.ca_bundle:
        command += ["--ca-bundle", args.ca_bundle]
    env = {k: v for k, v in os.environ.items() if k not in (_ENV_AKID, _ENV_SECRET)}
    kms = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    output = _Output(kms)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        started = _wait(lambda: _STARTED.search(output.text), "the local KMS start", kms)
        _wait(lambda: _READY in output.text and _reachable("127.0.0.1", port), "the local KMS serving", kms)
        proxy = urlsplit(args.endpoint)
        _wait(lambda: _reachable(proxy.hostname or "localhost", proxy.port or 443), "the demo proxy listening", kms)
        try:
            arn = _wire(args, started)
        except Exception as exc:  # a botocore error names the KMS error; never a credential
            raise SystemExit(f"xks-proxy demo: setting up the local KMS failed: {exc}") from None
        _print(started, arn)
        kms.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(kms)  # type: ignore[arg-type]


def _wire(args: argparse.Namespace, started: re.Match[str]) -> str:
    """CreateCustomKeyStore + ConnectCustomKeyStore for the demo store, CreateKey for the xks key: the key ARN."""
    import botocore.session

    client = botocore.session.get_session().create_client(
        "kms", endpoint_url=started["endpoint"], region_name=started["region"],
        aws_access_key_id=started["akid"], aws_secret_access_key=started["secret"],
    )  # fmt: skip
    store = client.create_custom_key_store(
        CustomKeyStoreName="xks-proxy-demo", CustomKeyStoreType="EXTERNAL_KEY_STORE", XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyUriEndpoint=args.endpoint, XksProxyUriPath=args.uri_path,
        XksProxyAuthenticationCredential={"AccessKeyId": os.environ[_ENV_AKID], "RawSecretAccessKey": os.environ[_ENV_SECRET]},
    )["CustomKeyStoreId"]  # fmt: skip
    client.connect_custom_key_store(CustomKeyStoreId=store)
    deadline = time.monotonic() + DEADLINE
    while True:
        state = client.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0]
        if state["ConnectionState"] == "CONNECTED":
            break
        if state["ConnectionState"] == "FAILED" or time.monotonic() > deadline:
            raise SystemExit(f"xks-proxy demo: the local KMS could not connect to the demo proxy: "
                             f"{state['ConnectionState']} {state.get('ConnectionErrorCode', '')}")  # fmt: skip
        time.sleep(0.1)
    key = client.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId=args.xks_key_id,
                            Description="xks-proxy demo key")["KeyMetadata"]  # fmt: skip
    return key["Arn"]


def _print(started: re.Match[str], arn: str) -> None:
    sibling = Path(sys.executable).with_name("aws")
    aws = str(sibling) if sibling.is_file() else shutil.which("aws") or "aws"
    call = (f"AWS_ACCESS_KEY_ID={shlex.quote(started['akid'])} AWS_SECRET_ACCESS_KEY={shlex.quote(started['secret'])} "
            f"{shlex.quote(aws)} kms {{op}} --endpoint-url {started['endpoint']} --region {started['region']}")  # fmt: skip
    encrypt = call.format(op="encrypt") + f" --key-id {arn} --plaintext fileb://<(echo hello) --query CiphertextBlob --output text"
    decrypt = call.format(op="decrypt") + f" --ciphertext-blob fileb://<({encrypt} | base64 -d) --query Plaintext --output text | base64 -d"
    print("\n".join([
        f"local AWS KMS:        {started['endpoint']}  (region {started['region']}; key store connected to this proxy)",
        f"  KMS key:            {arn}  (xks key foo)",
        "Try the whole chain, aws CLI → local KMS → this proxy → key foo (bash):",
        f"  {encrypt}",
        "and back:",
        f"  {decrypt}",
    ]), flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
