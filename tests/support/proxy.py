"""Helpers for tests that run the whole proxy (runner.start: TLS listener, reload, audit, metrics)."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import sys
import time
import tomllib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import ClientSession, TCPConnector
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT
from tests.support.certs import CA, Leaf, client_context
from tests.conftest import Client, Home
from xks_proxy import config as configmod
from xks_proxy.cli.home import write_config
from xks_proxy.process.worker import Running, start

WORKTREE = ROOT
KMS_NAME = "cks.kms.us-east-1.amazonaws.com"


def edit_config(home: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change config.toml the way an operator would: parse, edit, write back atomically."""
    raw = tomllib.loads((home / configmod.CONFIG_FILE).read_text())
    change(raw)
    write_config(home, raw)


@dataclass
class Pki:
    """A server CA with a server certificate for 127.0.0.1, and a trusted client CA."""

    home: Path
    server_ca: CA = field(default_factory=lambda: CA("server CA"))
    client_ca: CA = field(default_factory=lambda: CA("client CA"))

    def __post_init__(self) -> None:
        self.kms = self.client_ca.leaf(dns=(KMS_NAME,))
        self.install_server_cert(self.server_ca.leaf(dns=("localhost",), client=False, ip=True))
        (self.home / "client-ca.pem").write_bytes(self.client_ca.pem)

    def install_server_cert(self, leaf: Leaf) -> None:
        """Replace the server certificate the way certbot does: write new files, rename over."""
        for name, data in (("server-cert.pem", leaf.cert_pem), ("server-key.pem", leaf.key_pem)):
            tmp = self.home / (name + ".new")
            tmp.write_bytes(data)
            os.replace(tmp, self.home / name)

    def configure(self, raw: dict[str, Any]) -> None:
        raw["server"]["tls_cert"] = "server-cert.pem"
        raw["server"]["tls_key"] = "server-key.pem"
        raw["tls"] = {"client_ca": "client-ca.pem"}

    def context(self, leaf: Leaf | None, tls12: bool = False) -> ssl.SSLContext:
        """A client context presenting `leaf` (None: no certificate), optionally capped at TLS 1.2."""
        ctx = client_context(self.server_ca, leaf, self.home)
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx


@asynccontextmanager
async def running(home: Path, **kw: Any) -> AsyncIterator[Running]:
    proxy = await start(configmod.load(home), port=0, **kw)
    try:
        yield proxy
    finally:
        await proxy.close()


@asynccontextmanager
async def client_for(
    home: Home, proxy: Running, ctx: ssl.SSLContext | None = None, access_key_id: str | None = None, secret: str | None = None,
    prefix: str | None = None,
) -> AsyncIterator[Client]:
    scheme = "https" if ctx is not None else "http"
    async with ClientSession(connector=TCPConnector(ssl=ctx if ctx is not None else False)) as session:
        yield Client(
            session=session,
            base_url=f"{scheme}://127.0.0.1:{proxy.port}",
            uri_path=f"/{home.prefix if prefix is None else prefix}/kms/xks/v1",
            access_key_id=access_key_id or home.access_key_id,
            secret=secret or home.secret,
        )


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = 2.0, what: str = "condition") -> float:
    """Poll `check` until it holds; fail after `deadline` seconds. Returns the time it took."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > deadline:
            raise AssertionError(f"{what} did not hold within {deadline} s")
        await asyncio.sleep(0.05)


def cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess against this worktree's code."""
    env = dict(os.environ, PYTHONPATH=str(WORKTREE), XKS_PROXY_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics over HTTP and parse it: (sample name, labels) -> value."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for_line(log: Path, pattern: str, deadline: float = 15) -> re.Match[str]:
    """Poll a subprocess's log file for a line (e.g. the port it listens on)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the server log:\n{log.read_text()}")
