"""Helpers for tests of the whole chain: a real client → `xks-proxy local-kms` → an XKS proxy → keys.

Both servers run as subprocesses of this worktree's code: the local KMS (`local-kms --http`,
its credentials parsed from what it prints) and our proxy (`serve` over its home's dev TLS).
Nothing here prints a secret: a failure shows the subprocess log with secrets redacted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.support import ROOT

REGION = "us-east-1"
STARTED = re.compile(
    r"local KMS: (?P<endpoint>http://127\.0\.0\.1:\d+)\s+region (?P<region>\S+)\s+account (?P<account>\d{12})\s*\n"
    r"principal (?P<principal>arn:aws:iam::\d{12}:\S+)\s*\n"
    r"aws_access_key_id = (?P<akid>\S+)\s*\n"
    r"aws_secret_access_key = (?P<secret>\S+)"
)
READY = "local KMS serving on"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redact(text: str, *secrets: str) -> str:
    text = re.sub(r"(aws_secret_access_key\s*=\s*|AWS_SECRET_ACCESS_KEY=|secret access key:\s*)\S+", r"\1<redacted>", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


def wait_until(check: Callable[[], Any], deadline: float, what: str, log: Callable[[], str] = lambda: "") -> Any:
    """Poll `check` until it returns something truthy; fail after `deadline` seconds, showing `log()`."""
    started = time.monotonic()
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() - started > deadline:
            raise AssertionError(f"{what} did not happen within {deadline} s\n{log()}")
        time.sleep(0.05)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_KMS", "XKS_PROXY_HOME"):  # fmt: skip
        env.pop(name, None)
    return env


@dataclass
class Process:
    """A subprocess whose output goes to a log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def shown(self) -> str:
        return redact(self.text(), *self.secrets)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def spawn(args: list[str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    return Process(proc, log)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# --- the local KMS ---------------------------------------------------------------------------------


@dataclass
class LocalKms:
    process: Process
    endpoint: str
    region: str
    account: str
    principal: str
    access_key_id: str
    secret: str = field(repr=False)

    def client(self, **kw: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "kms", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret, config=Config(retries={"max_attempts": 1}, read_timeout=30), **kw,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """What the AWS CLI and SDKs need to call it (credentials, region, endpoint)."""
        return {**_env(), "AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL_KMS": self.endpoint,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip

    def stop(self) -> None:
        self.process.stop()


def start_local_kms(state: Path, ca_bundle: Path | None = None, port: int | None = None) -> LocalKms:
    """`xks-proxy local-kms --state DIR --port N --http [--ca-bundle FILE]`, once it serves."""
    port = port or free_port()
    args = ["xks_proxy.cli", "local-kms", "--state", str(state), "--port", str(port), "--http", "--region", REGION]
    if ca_bundle is not None:
        args += ["--ca-bundle", str(ca_bundle)]
    process = spawn(args, state.parent / f"{state.name}.log")
    try:
        match = wait_until(lambda: STARTED.search(process.text()) or not process.alive(), 30,
                           "the local KMS printing its credentials", process.shown)  # fmt: skip
        if "invalid choice: 'local-kms'" in process.text():
            raise AssertionError("`xks-proxy local-kms` does not exist in this worktree (issue 14's local KMS service)")
        assert process.alive() and match is not True, f"local-kms exited ({process.proc.returncode}):\n{process.shown()}"
        process.secrets = (match["secret"],)
        wait_until(lambda: READY in process.text() or not process.alive(), 30, "the local KMS serving", process.shown)
        assert process.alive(), f"local-kms exited ({process.proc.returncode}):\n{process.shown()}"
        wait_until(lambda: listening(port), 10, "the local KMS port", process.shown)
    except BaseException:
        process.stop()
        raise
    return LocalKms(process, match["endpoint"], match["region"], match["account"], match["principal"], match["akid"], match["secret"])


# --- our proxy -------------------------------------------------------------------------------------


@dataclass
class ServedProxy:
    """`xks-proxy serve` on a home, over the home's dev TLS (tls/ca.pem signs a localhost certificate)."""

    home: Path
    port: int
    process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    def start(self) -> "ServedProxy":
        return self.spawn().wait()

    def spawn(self) -> "ServedProxy":
        """Start `serve` without waiting for it (`wait` does), to overlap its start with something else."""
        self.process = spawn(["xks_proxy.cli", "serve", "--home", str(self.home), "--port", str(self.port), "--workers", "1"],
                             self.home.parent / f"{self.home.name}-serve.log")  # fmt: skip
        return self

    def wait(self) -> "ServedProxy":
        process = self.process
        assert process is not None
        wait_until(lambda: listening(self.port) or not process.alive(), 30, "xks-proxy serve listening", process.shown)
        assert process.alive(), f"serve exited:\n{process.shown()}"
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            wait_until(lambda: not listening(self.port), 10, "xks-proxy serve closing its port")

    def audit(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.home.glob("audit.log*")):
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return records


def proxy_config(home: Path, prefix: str | None = None) -> dict[str, Any]:
    """`xks-proxy stores export` of a home: the KMS proxy configuration file."""
    args = [sys.executable, "-m", "xks_proxy.cli", "stores", "export", "--home", str(home), *([prefix] if prefix else [])]
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def xks_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Any `xks-proxy` command on a home (output not shown on failure: it may hold a new secret)."""
    done = subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args, "--home", str(home)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, f"xks-proxy {' '.join(args)} failed ({done.returncode}): {redact(done.stderr)}"
    return done


# --- custom key stores through the KMS API ------------------------------------------------------------


def create_store(kms: Any, name: str, endpoint: str, config: dict[str, Any], **over: Any) -> str:
    """CreateCustomKeyStore for an XKS proxy from its proxy configuration file; the store id."""
    credential = config["XksProxyAuthenticationCredential"]
    params = {
        "CustomKeyStoreName": name, "CustomKeyStoreType": "EXTERNAL_KEY_STORE", "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyUriEndpoint": endpoint, "XksProxyUriPath": config["XksProxyUriPath"],
        "XksProxyAuthenticationCredential": {"AccessKeyId": credential["AccessKeyId"],
                                             "RawSecretAccessKey": credential["RawSecretAccessKey"]},
    }  # fmt: skip
    params.update(over)
    return kms.create_custom_key_store(**params)["CustomKeyStoreId"]


def store_state(kms: Any, store_id: str) -> dict[str, Any]:
    return kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0]


def connect(kms: Any, store_id: str, deadline: float = 20) -> dict[str, Any]:
    """ConnectCustomKeyStore, then poll DescribeCustomKeyStores until it is no longer CONNECTING."""
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    return wait_until(lambda: (s := store_state(kms, store_id))["ConnectionState"] not in ("CONNECTING", "DISCONNECTED") and s,
                      deadline, f"store {store_id} leaving CONNECTING")  # fmt: skip


def disconnect(kms: Any, store_id: str, deadline: float = 20) -> None:
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    wait_until(lambda: store_state(kms, store_id)["ConnectionState"] == "DISCONNECTED", deadline, f"store {store_id} disconnecting")


def create_xks_key(kms: Any, store_id: str, xks_key_id: str = "foo") -> str:
    meta = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId=xks_key_id,
                          KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]  # fmt: skip
    return meta["Arn"]


def error_code(call: Callable[[], Any]) -> str:
    """The KMS exception name a call raises (its botocore error code); fails if it succeeds."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    raise AssertionError("the call succeeded")


def outcomes() -> Any:
    """The shared table of what KMS does with each proxy answer: the local KMS raises from it, the
    conformance tester predicts from it, so the tests assert it rather than hard-coding names."""
    from xks_proxy import kms_outcomes

    return kms_outcomes


@dataclass
class Chain:
    """A local KMS with a connected store on a proxy and a KMS key for its xks key `foo`."""

    kms: LocalKms
    client: Any
    store_id: str
    key_arn: str
    proxy: Any  # ServedProxy or TinyXks


def chain(kms: LocalKms, proxy: Any, endpoint: str, config: dict[str, Any], xks_key_id: str = "foo") -> Chain:
    client = kms.client()
    store_id = create_store(client, f"xks-{free_port()}", endpoint, config)
    state = connect(client, store_id)
    assert state["ConnectionState"] == "CONNECTED", state
    return Chain(kms, client, store_id, create_xks_key(client, store_id, xks_key_id), proxy)
