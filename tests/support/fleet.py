"""Helpers for the fleet tests: proxy homes on a shared PostgreSQL vault, and real serve processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import REGION, Home, run_cli_in_process
from tests.support.lifecycle import cli_env, patch_config
from xks_proxy.cli.home import init_home

#: Put in every test DSN: the trust-auth test cluster ignores it, so anything that prints a DSN shows it.
DSN_PASSWORD = "pw-4e1f-never-printed"


def dsn_with_password(dsn: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{DSN_PASSWORD}@")


def write_dsn_file(path: Path, dsn: str) -> Path:
    path.write_text(dsn_with_password(dsn) + "\n")
    path.chmod(0o600)
    return path


def pg_home(path: Path, dsn: str, prefix: str = "test", **vault: Any) -> Home:
    """A home made as an operator makes the first proxy of a fleet: `init`, then `fleet init --dsn-file`."""
    akid, secret = init_home(path, prefix, REGION, 0)
    if vault:
        patch_config(path, vault=vault)
    dsn_file = write_dsn_file(path.parent / f"{path.name}.dsn", dsn)
    assert run_cli_in_process("fleet", "init", "--home", str(path), "--dsn-file", str(dsn_file)) == 0
    return Home(path=path, prefix=prefix, access_key_id=akid, secret=secret)


def copy_home(home: Home, path: Path) -> Home:
    """Another proxy's home: the first one's config.toml, master key and TLS files (what an operator copies)."""
    path.mkdir(mode=0o700)
    for name in ("config.toml", "master.key"):
        shutil.copy2(home.path / name, path / name)
    shutil.copytree(home.path / "tls", path / "tls")
    return Home(path=path, prefix=home.prefix, access_key_id=home.access_key_id, secret=home.secret)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proxy:
    """One real `xks-proxy serve --http` process (its own session: killed as a group)."""

    home: Home
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int = 1) -> "Proxy":
        args = ["serve", "--http", "--port", str(self.port), "--workers", str(workers), "--log-level", "info", *self.extra]
        handle = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xks_proxy.cli", *args], env=cli_env(self.home.path),
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        handle.close()
        return self

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    async def wait_serving(self, timeout: float = 20.0) -> None:
        """Until GET /ping answers 200 (the key manager has loaded)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with await asyncio.to_thread(urllib.request.urlopen, self.url + "/ping", None, 0.5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"proxy on {self.port} did not serve: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
