"""Helpers for the key lifecycle tests: the real CLI in a subprocess, config edits, a live server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from keymanager import create_key_manager
from tests.support import ROOT
from tests.conftest import Client, Home
from xks_proxy import config as configmod
from xks_proxy.cli.home import write_config
from xks_proxy.server import XksServer



def cli_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("XKS_PROXY_MASTER_KEY", None)
    if home is not None:
        env["XKS_PROXY_HOME"] = str(home)
    env.update(extra)
    return env


def cli(*args: str, home: Path | None = None, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `xks-proxy ARGS` for real, in a subprocess (for tests with no server on this event loop)."""
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", *args], env=cli_env(home, **extra), cwd=cwd, capture_output=True, text=True, timeout=60
    )


async def acli(*args: str, home: Path | None = None, cwd: Path | None = None, **extra: str) -> tuple[int, str, str]:
    """The same, without blocking the event loop that runs the server under test."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xks_proxy.cli",
        *args,
        env=cli_env(home, **extra),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_json(*args: str, home: Path | None = None, cwd: Path | None = None) -> Any:
    done = cli(*args, home=home, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def patch_config(home: Path, **sections: dict[str, Any]) -> None:
    """Merge settings into config.toml's tables, as an operator would edit it."""
    raw = tomllib.loads((home / "config.toml").read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    write_config(home, raw)


@dataclass
class Live:
    server: TestServer
    client: Client
    key_manager: Any
    admin: Any = None


@asynccontextmanager
async def serving(home: Home, path: Path | None = None) -> AsyncIterator[Live]:
    """The real app (and admin listener, if configured) over `path` (default: the fixture home)."""
    cfg = configmod.load(path or home.path)
    key_manager = create_key_manager(cfg)
    app = XksServer(cfg, key_manager).app()
    admin = None
    if cfg.admin.enabled:
        from xks_proxy.admin import api as adminmod

        admin = adminmod.attach(app, cfg, key_manager)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session:
            client = Client(
                session=session,
                base_url=str(server.make_url("")).rstrip("/"),
                uri_path=f"/{home.prefix}/kms/xks/v1",
                access_key_id=home.access_key_id,
                secret=home.secret,
            )
            yield Live(server=server, client=client, key_manager=key_manager, admin=admin)
    finally:
        await server.close()


async def wait_for(check: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll an async `check()` until it returns something truthy, or fail at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(interval)
