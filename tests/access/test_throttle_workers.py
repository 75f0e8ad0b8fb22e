"""Issue 15: with `serve --workers 4` a store's quota holds for the whole proxy, however KMS's
connections spread over the workers, and a worker SIGKILLed mid-flight wedges nobody.

Real `xks-proxy serve --http --workers 4` processes on a fresh home, real SigV4-signed requests
(botocore). Counts only: what a bucket admits over a window is at most its burst plus its rate
times the window, and at least its burst plus part of that refill while requests keep coming.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.conftest import Client, Home
from tests.support.proxy import WORKTREE, edit_config, eventually, wait_for_line
from tests.support.sealed_proxy import Served, kill, start

# The process layout is the same whatever the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only

WORKERS = 4


@asynccontextmanager
async def proxy_with_quota(home: Home, tmp_path: Path, rate: float, burst: int) -> AsyncIterator[Served]:
    """`serve --workers 4` with this quota on the store (no in-flight cap), all workers forked; stopped cleanly.
    No audit file, so no sidecar: the supervisor's children are its workers."""

    def quota(raw: dict[str, Any]) -> None:
        raw["throttle"] = {"max_in_flight": 0}
        raw["audit"] = {"path": ""}
        raw["stores"][0]["throttle"] = {"rate": rate, "burst": burst}

    edit_config(home.path, quota)
    served = await asyncio.to_thread(start, home.path, tmp_path / "serve.log", WORKERS, True)
    try:

        async def forked() -> bool:
            return len(served.children()) == WORKERS

        await eventually(forked, deadline=20, what="four workers")
        yield served
        assert await asyncio.to_thread(served.stop) == 0
        assert "Traceback" not in served.text and "throttle lock" not in served.text, served.text[-2000:]
    finally:
        kill(served.proc)


@asynccontextmanager
async def signed(home: Home, served: Served, keep_alive: bool) -> AsyncIterator[Client]:
    """One keep-alive connection (it stays on one worker), or a new connection per request (spread by the kernel)."""
    connector = aiohttp.TCPConnector(limit=1) if keep_alive else aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Client(session, f"http://127.0.0.1:{served.port}", f"/{home.prefix}/kms/xks/v1", home.access_key_id, home.secret)


async def warm_up(client: Client) -> None:
    """Health checks (exempt from the quota) until the workers answer."""

    async def healthy() -> bool:
        try:
            return (await client.call("health", requestMetadata={"kmsRequestId": "w", "kmsOperation": "KmsHealthCheck"}))[0] == 200
        except aiohttp.ClientError:
            return False

    await eventually(healthy, deadline=15, what="the workers answer")


async def hammer(client: Client, seconds: float, lanes: int) -> tuple[int, int, float]:
    """Encrypts back to back on `lanes` concurrent lanes for `seconds`: (200s, 429s, the window's length)."""
    statuses: list[int] = []
    started = time.monotonic()

    async def lane() -> None:
        while time.monotonic() - started < seconds:
            statuses.append((await client.encrypt("foo", b"quota"))[0])

    await asyncio.gather(*(lane() for _ in range(lanes)))
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, set(statuses)
    return statuses.count(200), statuses.count(429), elapsed


async def test_one_keep_alive_connection_gets_the_whole_quota(home: Home, tmp_path: Path) -> None:
    """One connection sits on one worker; it gets the store's burst and rate, not 1/4 of them."""
    rate, burst = 10.0, 20
    async with proxy_with_quota(home, tmp_path, rate, burst) as served, signed(home, served, keep_alive=True) as client:
        await warm_up(client)
        admitted, throttled, elapsed = await hammer(client, seconds=2.0, lanes=1)
    assert throttled > 0, "the connection asked for more than the quota"
    assert admitted <= burst + rate * elapsed + 1, (admitted, elapsed)
    # A worker's quarter would be 5 + 2.5/s; the whole quota is 20 + 10/s (half of the refill, generously).
    assert admitted >= burst + rate * elapsed / 2, (admitted, elapsed)


async def test_many_connections_over_all_workers_get_the_quota_once(home: Home, tmp_path: Path) -> None:
    """24 lanes on new connections, spread over four workers: at most burst + rate x window in total, never 4 bursts."""
    rate, burst = 2.0, 9
    async with proxy_with_quota(home, tmp_path, rate, burst) as served, signed(home, served, keep_alive=False) as client:
        await warm_up(client)
        admitted, throttled, elapsed = await hammer(client, seconds=1.5, lanes=24)
    assert throttled > 0
    assert burst <= admitted <= burst + rate * elapsed + 1, (admitted, elapsed)


async def test_workers_killed_while_requests_flow_wedge_no_bucket(home: Home, tmp_path: Path) -> None:
    """Ten times a worker is SIGKILLed amid metered traffic: the others go on admitting and refusing
    (a refusal proves they still charge the shared bucket: a wedged lock would admit everything)."""
    async with proxy_with_quota(home, tmp_path, rate=50.0, burst=20) as served, signed(home, served, keep_alive=False) as client:
        await warm_up(client)
        counts = {200: 0, 429: 0, "lost": 0}
        stop = asyncio.Event()

        async def lane() -> None:
            while not stop.is_set():
                try:
                    counts[(await client.encrypt("foo", b"kill"))[0]] += 1
                except aiohttp.ClientError:
                    counts["lost"] += 1  # a connection the killed worker had accepted

        lanes = [asyncio.create_task(lane()) for _ in range(8)]
        killed: set[int] = set()
        try:
            for round in range(10):

                async def all_up() -> bool:
                    children = served.children()
                    return len(children) == WORKERS and not killed & set(children)

                await eventually(all_up, deadline=15, what=f"four workers again before kill {round + 1}")
                victim = served.children()[round % WORKERS]
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
                before = dict(counts)

                async def metering() -> bool:
                    return counts[200] >= before[200] + 5 and counts[429] > before[429]

                await eventually(metering, deadline=10, what=f"admissions and refusals after kill {round + 1}")
        finally:
            stop.set()
            await asyncio.gather(*lanes)
    assert counts[200] > 0 and counts[429] > 0, counts


async def test_serve_runs_one_worker_per_core_it_may_use_by_default(home: Home, tmp_path: Path) -> None:
    """The default the throttling docs name: one worker per core the process may run on (here, under taskset, one)."""
    log = tmp_path / "default.log"
    args = ["taskset", "-c", "0", sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home.path), "--port", "0", "--http"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, env=dict(os.environ, PYTHONPATH=str(WORKTREE)), start_new_session=True)
    try:
        match = await asyncio.to_thread(wait_for_line, log, r"serving http://\S+ for stores \S+ with (\d+) worker")
        assert int(match[1]) == 1, "the cores it may use (one under taskset), not the host's"
    finally:
        kill(proc)
