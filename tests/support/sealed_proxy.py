"""Helpers for the sealed-serving tests: homes made by the real `init`, a real `serve` process, `unseal`.

Everything goes through the CLI as an operator runs it (subprocesses, shares on stdin); every
output is kept so a test can prove that no share or passphrase ever appears in one.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from contextlib import asynccontextmanager

from tests.conftest import Client
from tests.support.proxy import WORKTREE, cli, wait_for_line

SEALED_LINE = r"answering 503 on https://127\.0\.0\.1:(\d+)"
SERVING_LINE = r"serving https://127\.0\.0\.1:(\d+)"


@dataclass
class SealedHome:
    """A home made by `xks-proxy init`, its first store's credential, and its shares (shamir)."""

    path: Path
    share_dir: Path | None
    prefix: str
    access_key_id: str
    secret: str = field(repr=False)
    outputs: list[str] = field(default_factory=list, repr=False)

    def share(self, n: int) -> str:
        assert self.share_dir is not None
        return (self.share_dir / f"share-{n}.txt").read_text().strip()

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The real CLI on this home; its stdout and stderr are kept for `assert_never_shown`."""
        done = cli(self.path, *args, stdin=stdin)
        self.outputs += [done.stdout, done.stderr]
        return done

    def assert_never_shown(self, secrets: list[str], *texts: str) -> None:
        """No secret (nor any 4 consecutive words of a share past the set's common first words) in any output."""
        for text in (*self.outputs, *texts):
            for secret in secrets:
                words = secret.split()
                pieces = [secret] + [" ".join(words[i : i + 4]) for i in range(3, len(words) - 3)]
                assert not any(piece in text for piece in pieces), "a share or passphrase appears in an output"


def init(path: Path, *seal: str, prefix: str = "test") -> SealedHome:
    share_dir = path.parent / f"{path.name}-shares" if "shamir" in seal else None
    args = ["init", "--uri-prefix", prefix, "--port", "0", *seal] + (["--share-dir", str(share_dir)] if share_dir else [])
    done = cli(path, *args)
    assert done.returncode == 0, done.stderr
    akid = re.search(r"access key id:\s+(\S+)", done.stdout)
    secret = re.search(r"secret access key:\s+(\S+)", done.stdout)
    assert akid and secret, done.stdout
    return SealedHome(path, share_dir, prefix, akid[1], secret[1], [done.stdout, done.stderr])


def corrupt(share: str) -> str:
    """The share with one word replaced by another word of the list: SLIP-39's checksum fails."""
    words = share.split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    return " ".join(words)


@dataclass
class Served:
    """A running `xks-proxy serve` (its own process group) and its log."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def children(self) -> list[int]:
        """The supervisor's child processes (workers, sidecar, sealed responder)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]


def start(home: Path, log: Path, workers: int = 2, http: bool = False, extra: tuple[str, ...] = (), **popen: Any) -> Served:
    """`serve` (with `extra` arguments) in its own process group; returns once it answers (sealed or serving)."""
    env = dict(os.environ, PYTHONPATH=str(WORKTREE))
    env.pop("XKS_PROXY_MASTER_KEY", None)
    args = ["serve", "--home", str(home), "--port", "0", "--workers", str(workers), *extra] + (["--http"] if http else [])
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xks_proxy.cli", *args], stdout=stderr, stderr=stderr, env=env, start_new_session=True, **popen
        )
    scheme = "http" if http else "https"
    try:
        match = wait_for_line(log, rf"(?:answering 503 on|serving) {scheme}://127\.0\.0\.1:(\d+)")
    except BaseException:
        kill(proc)
        raise
    return Served(proc, log, int(match[1]))


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@asynccontextmanager
async def client(home: SealedHome, served: Served, http: bool = False) -> AsyncIterator[Client]:
    """A SigV4 client (botocore's signer) with a new connection per request, so every worker answers."""
    connector = aiohttp.TCPConnector(ssl=False, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        scheme = "http" if http else "https"
        yield Client(session, f"{scheme}://127.0.0.1:{served.port}", f"/{home.prefix}/kms/xks/v1", home.access_key_id, home.secret)


async def ping(c: Client) -> tuple[int, str]:
    async with c.session.get(c.base_url + "/ping") as resp:
        return resp.status, await resp.text()


async def round_trip(c: Client, key: str = "foo") -> bool:
    """A signed encrypt, then a decrypt of its result: True when both succeed."""
    try:
        status, encrypted = await c.encrypt(key, b"sealed-test")
        if status != 200:
            return False
        status, plain = await c.decrypt(key, encrypted)
        return status == 200
    except aiohttp.ClientError:
        return False


async def sealed_everywhere(c: Client) -> bool:
    """/ping 503 and a signed encrypt 503 DependencyTimeoutException, on fresh connections."""
    try:
        status, body = await c.encrypt("foo", b"x")
        return (await ping(c))[0] == 503 and status == 503 and body["errorName"] == "DependencyTimeoutException"
    except aiohttp.ClientError:
        return False


async def unseal_cli(home: SealedHome, stdin: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(home.run, "unseal", *args, stdin=stdin)
