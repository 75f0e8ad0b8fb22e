"""`serve --workers N`: one audit file, one metrics endpoint, SIGHUP to every worker, the in-flight cap split, the quota shared, a restarted worker up to date."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

import pytest

from tests.conftest import Client, Home
from tests.support.proxy import WORKTREE, Pki, edit_config, eventually, scrape, value, wait_for_line
from tests.support.sealed_proxy import client, init, kill, round_trip, start
from xks_proxy.access.throttle import Throttle

# Process layout is the same whatever the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only


async def test_two_workers_share_audit_metrics_and_reload(home: Home, tmp_path: Path) -> None:
    pki = Pki(home.path)

    def configure(raw: dict[str, Any]) -> None:
        pki.configure(raw)
        raw["metrics"] = {"enabled": True, "port": 0}
        raw["stores"][0]["policy"] = [{"name": "hup", "effect": "deny", "kmsOperation": "Xncrypt"}]

    edit_config(home.path, configure)
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(WORKTREE))
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home.path), "--port", "0", "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        port = int((await asyncio.to_thread(wait_for_line, log, r"serving https://127\.0\.0\.1:(\d+)"))[1])
        metrics_port = int((await asyncio.to_thread(wait_for_line, log, r"metrics on http://127\.0\.0\.1:(\d+)/"))[1])
        # A new connection per request, so both workers answer.
        connector = aiohttp.TCPConnector(ssl=pki.context(pki.kms), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = Client(session, f"https://127.0.0.1:{port}", "/test/kms/xks/v1", home.access_key_id, home.secret)

            async def serving() -> bool:
                try:
                    return (await client.encrypt("foo", b"warm-up"))[0] == 200
                except aiohttp.ClientError:
                    return False

            await eventually(serving, deadline=15, what="the workers serve")
            for _ in range(20):
                assert (await client.encrypt("foo", b"counted"))[0] == 200

            samples = await scrape(metrics_port)
            ok = value(samples, "xks_requests_total", store="test", operation="encrypt", outcome="OK")
            assert ok is not None and ok >= 21, "one endpoint counts the requests of every worker"
            assert [v for (name, _), v in samples.items() if name == "xks_keymanager_health"] == [2]
            days = value(samples, "xks_tls_certificate_expiry_days", certificate="server")
            assert days is not None and 9.9 < days <= 10.0

            # An edit polling cannot see; SIGHUP to the supervisor must reach every worker.
            path = home.path / "config.toml"
            st = os.stat(path)
            text = path.read_text()
            with open(path, "r+") as handle:
                handle.write(text.replace("Xncrypt", "Encrypt"))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            proc.send_signal(signal.SIGHUP)

            async def every_worker_denies() -> bool:
                statuses = [(await client.encrypt("foo", b"after"))[0] for _ in range(10)]
                return statuses == [403] * 10

            await eventually(every_worker_denies, deadline=5, what="every worker reloaded on SIGHUP")
            final = await scrape(metrics_port)
            ok = value(final, "xks_requests_total", store="test", operation="encrypt", outcome="OK")
            denied = value(final, "xks_requests_total", store="test", operation="encrypt", outcome="AccessDeniedException")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:  # a failed test: stop the supervisor and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    records = [json.loads(line) for line in (home.path / "audit.log").read_text().splitlines()]
    # Each worker hands its records over in batches, so the file interleaves workers by batch:
    # order by the records' own time.
    outcomes = [r["outcome"] for r in sorted(records, key=lambda r: r["time"])]
    assert (outcomes.count("OK"), outcomes.count("AccessDeniedException")) == (ok, denied), "all workers' records, one file"
    assert outcomes[-10:] == ["AccessDeniedException"] * 10
    assert "Traceback" not in log.read_text()


def test_each_worker_holds_its_share_of_the_in_flight_cap(home: Home) -> None:
    edit_config(home.path, lambda raw: raw.update(throttle={"max_in_flight": 10}))
    assert Throttle(home.config, workers=4).max_in_flight == 3  # ceil(10 / 4); the quota is shared: tests/access/test_throttle_workers.py


async def test_a_restarted_worker_serves_the_configuration_of_now_not_of_the_start(tmp_path: Path) -> None:
    """The supervisor read config.toml at start; a worker it restarts after an edit must serve the edit."""
    home = init(tmp_path / "home", "--seal", "file")
    assert home.run("keys", "create", "foo").returncode == 0
    served = start(home.path, tmp_path / "serve.log", workers=2, http=True)
    deny = [{"name": "no-encrypt", "effect": "deny", "kmsOperation": "Encrypt"}]
    try:
        async with client(home, served, http=True) as c:
            await eventually(lambda: round_trip(c), deadline=15, what="the workers serve")
            edit_config(home.path, lambda raw: raw["stores"][0].update(policy=deny))

            async def denied_everywhere() -> bool:
                return [(await c.encrypt("foo", b"x"))[0] for _ in range(10)] == [403] * 10

            await eventually(denied_everywhere, deadline=10, what="every worker took up the edit")
            statuses: list[int] = []
            for _ in range(10):  # every child killed, every worker restarted from the supervisor's old config
                before = set(served.children())
                for pid in before:
                    os.kill(pid, signal.SIGKILL)

                async def restarted() -> bool:
                    try:
                        statuses.append((await c.encrypt("foo", b"x"))[0])
                    except aiohttp.ClientError:
                        return False
                    return not before & set(served.children()) and len(served.children()) == 3

                await eventually(restarted, deadline=15, what="the workers are back")
            statuses += [(await c.encrypt("foo", b"x"))[0] for _ in range(10)]
        assert served.stop() == 0
    finally:
        kill(served.proc)
    assert statuses and set(statuses) <= {403, 503}, f"a restarted worker served the old configuration: {statuses}"
