"""The documented local fleet (deploy/fleet/run-local.sh): PostgreSQL, two proxies, HAProxy with TLS.

Signed HTTPS traffic goes through the real HAProxy (SigV4 signs the Host header: it must arrive
intact) while one proxy is rolled (drained through /ping, stopped, started: a rolling upgrade)
and then the other is SIGKILLed. Not one request may fail: HAProxy resends what was in flight
on the dead proxy and takes it out of rotation by its /ping check.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import ClientSession, TCPConnector

from tests.conftest import Client, need, unb64
from tests.fleet_util import free_port
from tests.lifecycle_util import wait_for
from tests.postgres import pg_bin

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "fleet" / "run-local.sh"


def _two_free_ports() -> int:
    """A port P with P and P+1 both free (run-local.sh puts proxy k on BASE+k-1)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120)


async def test_local_fleet_survives_a_proxy_killed_mid_traffic() -> None:
    need("haproxy")
    need("curl")
    pg_bin()
    base = Path(tempfile.mkdtemp(prefix="xks-fleet-"))  # not under pytest's 0700 tmp: PostgreSQL runs as `postgres`
    base.chmod(0o711)
    https_port, base_port = free_port(), _two_free_ports()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        XKS_PROXY=f"{sys.executable} -m xks_proxy.cli",
        XKS_HTTPS_PORT=str(https_port),
        XKS_BASE_PORT=str(base_port),
        XKS_PG_PORT=str(free_port()),
    )
    env.pop("XKS_PROXY_HOME", None)
    fleet = base / "fleet"
    started = _run(str(SCRIPT), "start", str(fleet), "2", env=env)
    try:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(fleet.glob("*.log")))
        assert started.returncode == 0, started.stdout + started.stderr + logs
        assert f"https://localhost:{https_port}/xks/kms/xks/v1" in started.stdout
        cli = [sys.executable, "-m", "xks_proxy.cli"]
        assert _run(*cli, "keys", "create", "foo", "--home", str(fleet / "home-1"), env=env).returncode == 0
        exported = json.loads(_run(*cli, "stores", "export", "--home", str(fleet / "home-2"), env=env).stdout)
        credential = exported["XksProxyAuthenticationCredential"]
        ssl_context = ssl.create_default_context(cafile=str(fleet / "home-1" / "tls" / "ca.pem"))
        async with ClientSession(connector=TCPConnector(ssl=ssl_context, limit=16)) as session:
            client = Client(
                session, f"https://localhost:{https_port}", exported["XksProxyUriPath"],
                credential["AccessKeyId"], credential["RawSecretAccessKey"],
            )  # fmt: skip
            await wait_for(lambda: _served_by_both(client), timeout=3)  # the new key reached both proxies
            outcome = await _traffic(client, fleet, env)
        log = (fleet / "haproxy.log").read_text()
    finally:
        _run(str(SCRIPT), "stop", str(fleet), env=env)
    try:
        served = re.findall(r"xks_proxies/(proxy\d) \S+ (\d{3}) .* (\d+)/(\d+)/(\d+)/(\d+)/\+?(\d+) \d+/\d+ \"POST", log)
        assert outcome["failures"] == [], outcome["failures"][:5]
        assert outcome["before"] > 100 and outcome["after"] > 100, outcome
        assert {"proxy1", "proxy2"} <= {s[0] for s in served}  # both carried traffic
        assert log.index("xks_proxies/proxy1 is DOWN") < log.index("xks_proxies/proxy1 is UP")  # rolled: out, back in
        assert "xks_proxies/proxy2 is DOWN" in log  # the killed one, taken out by the health check
        retried = sum(1 for s in served if int(s[6]) > 0)
        print(f"\nrequests: {outcome['before']} up to the kill (proxy 1 rolled meanwhile), {outcome['after']} after, 0 failed; "
              f"resent by HAProxy to the other proxy: {retried}")  # fmt: skip
        password = (fleet / "pg.dsn").read_text().split(":")[2].split("@")[0]
        for path in fleet.glob("*.log"):
            assert password not in path.read_text(), f"{path} shows the database password"
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _served_by_both(client: Client) -> bool:
    """Four encryptions in a row succeed: HAProxy's round robin sent them to both proxies."""
    return all([(await client.encrypt("foo", b"ready"))[0] == 200 for _ in range(4)])


async def _traffic(client: Client, fleet: Path, env: dict[str, str]) -> dict:
    """Eight concurrent encrypt+decrypt loops: roll proxy 1, then SIGKILL proxy 2, then two more seconds."""
    failures: list = []
    done = {"n": 0}
    running = [True]

    async def loop(worker: int) -> None:
        i = 0
        while running[0]:
            plaintext = b"w%d-%d" % (worker, i)
            try:
                status, enc = await client.encrypt("foo", plaintext)
                if status != 200:
                    failures.append(("encrypt", status, enc))
                    continue
                status, body = await client.decrypt("foo", enc)
                if status != 200 or unb64(body["plaintext"]) != plaintext:
                    failures.append(("decrypt", status, body))
            except Exception as exc:  # a dropped connection is a failure too
                failures.append(("error", repr(exc)))
            done["n"] += 2
            i += 1

    loops = [asyncio.create_task(loop(w)) for w in range(8)]
    try:
        await asyncio.sleep(1.0)
        rolled = await asyncio.to_thread(_run, str(SCRIPT), "roll", str(fleet), "1", env=env)
        assert rolled.returncode == 0 and "rolled proxy 1" in rolled.stdout, rolled.stdout + rolled.stderr
        before = done["n"]
        os.killpg(int((fleet / "proxy-2.pid").read_text()), signal.SIGKILL)
        await asyncio.sleep(2.0)
    finally:
        running[0] = False
        await asyncio.gather(*loops)
    return {"failures": failures, "before": before, "after": done["n"] - before}
