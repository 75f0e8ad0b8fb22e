"""An unauthenticated stranger must not starve or bloat the proxy (issue 11, section 3).

Every test drives a real `xks-proxy serve` process (HTTPS, one worker) over real sockets: stalled
bodies and headers, idle connections, 1,000 TLS connections that never finish their headers,
non-UTF-8 header bytes, clients that vanish mid-body, and malformed requests carrying a secret.
Timeouts are configured short here to keep the suite fast; the defaults are checked on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest

from tests.support import ROOT
from tests.conftest import REGION, Client, metadata
from tests.support.fleet import free_port
from tests.support.lifecycle import cli_env, patch_config
from tests.support.proxy import scrape, value, wait_for_line
from xks_proxy import config as configmod
from xks_proxy.access.connections import SWEEP_SECONDS
from xks_proxy.cli.home import init_home

pytestmark = pytest.mark.vault_only

#: Short deadlines for the tests (the defaults are 10 s, 10 s, 75 s: test_defaults_are_the_documented_ones).
HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT = 2.0, 2.0, 3.0
#: Slack for "closed by the server within its deadline" on a loaded 2-core machine.
SLACK = 3.0
MARKER = "Zk9-NEVER-LOGGED-plaintext-4c1d"


@dataclass
class Served:
    """One `xks-proxy serve` process over HTTPS, and what a test needs to reach it."""

    home: Path
    prefix: str
    access_key_id: str
    secret: str
    port: int
    metrics_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def __post_init__(self) -> None:
        self.ctx = ssl.create_default_context(cafile=str(self.home / "tls" / "ca.pem"))
        #: For bulk connections: the attacker does not verify the server, and it halves the client's CPU.
        self.careless = ssl.create_default_context()
        self.careless.check_hostname = False
        self.careless.verify_mode = ssl.CERT_NONE

    def rss_kib(self) -> int:
        """The resident memory of all the server's processes (supervisor, workers, sidecar): its own session."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.proc.pid:  # the process group
                    status = (stat.parent / "status").read_text()
                    total += int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]
            except (OSError, TypeError):
                continue
        return total

    def audit(self) -> list[dict[str, Any]]:
        path = self.home / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def client(self, session: aiohttp.ClientSession) -> Client:
        return Client(
            session=session, base_url=f"https://127.0.0.1:{self.port}", uri_path=f"/{self.prefix}/kms/xks/v1",
            access_key_id=self.access_key_id, secret=self.secret,
        )  # fmt: skip

    def health_head(self, extra: str = "") -> bytes:
        """A health request's request line and headers, unsigned (any stranger can send this)."""
        return (
            f"POST /{self.prefix}/kms/xks/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n"
        ).encode()


def _serve(tmp: Path, **server: Any) -> Iterator[Served]:
    home = tmp / "home"
    akid, secret = init_home(home, "test", REGION, 0)
    metrics_port = free_port()
    patch_config(home, server=server, metrics={"enabled": True, "port": metrics_port})
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xks_proxy.cli", "serve", "--port", str(port), "--log-level", "info"],
            env=cli_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_line(log, r"metrics on http")
        served = Served(home, "test", akid, secret, port, metrics_port, proc, log)
        _wait_listening(port)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the proxy did not listen")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Short deadlines; the default in-flight cap (256), so 400 stalled requests would exhaust it."""
    yield from _serve(
        tmp_path_factory.mktemp("hostile"), header_timeout_seconds=HEADER_TIMEOUT, body_timeout_seconds=BODY_TIMEOUT,
        idle_timeout_seconds=IDLE_TIMEOUT, max_connections=2000,
    )  # fmt: skip


async def _open(served: Served, first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port, ssl=served.careless)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> float | None:
    """Seconds until the server closed the connection (whatever it answered first), or None if it did not."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - started


async def _in_batches(coros: list[Any], size: int = 100) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(coros), size):
        out += await asyncio.gather(*coros[i : i + size])
    return out


# --- settings ------------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    init_home(tmp_path / "h", "test", REGION, 0)
    server = configmod.load(tmp_path / "h").server
    assert (server.header_timeout_seconds, server.body_timeout_seconds, server.idle_timeout_seconds) == (10.0, 10.0, 75.0)
    assert server.max_connections == 1000
    docs = (ROOT / "docs" / "access-control.md").read_text()
    for line in ("header_timeout_seconds = 10", "body_timeout_seconds = 10", "idle_timeout_seconds = 75", "max_connections = 1000"):
        assert line in docs, line


@pytest.mark.parametrize(
    "setting, bad",
    [("header_timeout_seconds", 0), ("body_timeout_seconds", 301), ("idle_timeout_seconds", "75"), ("max_connections", 0)],
)
def test_bad_settings_are_refused(tmp_path: Path, setting: str, bad: Any) -> None:
    init_home(tmp_path / "h", "test", REGION, 0)
    patch_config(tmp_path / "h", server={setting: bad})
    with pytest.raises(configmod.ConfigError, match=f"server.{setting}"):
        configmod.load(tmp_path / "h")


# --- stalled requests ------------------------------------------------------------------------------------


async def _signed_health_latencies(served: Served, count: int) -> list[tuple[int, float]]:
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=served.ctx)) as session:
        client = served.client(session)
        await client.call("health", requestMetadata=metadata("KmsHealthCheck"))  # the connection, warm
        for _ in range(count):
            started = time.monotonic()
            status, _ = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
            out.append((status, time.monotonic() - started))
    return out


async def test_400_stalled_bodies_starve_nobody_and_are_closed(proxy: Served) -> None:
    """Content-Length and no body, Expect: 100-continue and no body, chunked at 1 byte/s: 400 in all."""
    stalled = (
        [proxy.health_head("Content-Length: 20000\r\n")] * 180
        + [proxy.health_head("Content-Length: 200\r\nExpect: 100-continue\r\n")] * 180
        + [proxy.health_head("Transfer-Encoding: chunked\r\n")] * 40
    )
    conns = await _in_batches([_open(proxy, head) for head in stalled])
    opened = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with_chunk = b"1\r\n{\r\n"
        try:
            while True:
                writer.write(with_chunk)
                await asyncio.sleep(1.0)
        except (ConnectionError, RuntimeError):
            pass

    tricklers = [asyncio.create_task(trickle(w)) for _, w in conns[-40:]]
    try:
        latencies = await _signed_health_latencies(proxy, 20)
        assert time.monotonic() - opened < BODY_TIMEOUT, "the signed requests ran while every stalled one was open"
        assert [s for s, _ in latencies] == [200] * 20
        assert max(t for _, t in latencies) < 0.25, latencies
        closed = await asyncio.gather(*(_closed_by_server(r, BODY_TIMEOUT + SLACK) for r, _ in conns))
        assert all(c is not None for c in closed), f"{closed.count(None)} stalled connections still open"
    finally:
        for task in tricklers:
            task.cancel()
        for _, writer in conns:
            writer.close()
    outcomes = [r["outcome"] for r in proxy.audit() if r.get("event") == "xks.request"]
    assert outcomes.count("RequestTimeout") >= 400
    assert "InternalException" not in outcomes


def _signed_request(served: Served, body: dict[str, Any], extra: dict[str, bytes] | None = None) -> bytes:
    """A health request signed as KMS signs it (botocore), as raw bytes; `extra` headers are added unsigned."""
    path = f"/{served.prefix}/kms/xks/v1/health"
    payload = json.dumps(body).encode()
    signer = Client(session=None, base_url=f"https://127.0.0.1:{served.port}", uri_path="", access_key_id=served.access_key_id, secret=served.secret)  # type: ignore[arg-type]
    headers = signer.signed_headers(path, payload)
    headers.setdefault("Host", f"127.0.0.1:{served.port}")  # signed by botocore, sent by the HTTP client
    lines = [f"POST {path} HTTP/1.1".encode()] + [f"{k}: {v}".encode() for k, v in headers.items()]
    lines += [k.encode() + b": " + v for k, v in (extra or {}).items()]
    lines += [f"Content-Length: {len(payload)}".encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    return int(head.split()[1]), await reader.readexactly(length)


async def test_headers_that_never_end_and_idle_connections_are_closed(proxy: Served) -> None:
    partial = [await _open(proxy, b"POST /test/kms/xks/v1/health HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
    silent = [await _open(proxy) for _ in range(20)]
    reader, writer = await _open(proxy, _signed_request(proxy, {"requestMetadata": metadata("KmsHealthCheck")}))
    assert (await _response(reader))[0] == 200
    # Idle is not "waiting for headers": the served connection outlives the header deadline ...
    closed = await asyncio.gather(*(_closed_by_server(r, HEADER_TIMEOUT + SLACK) for r, _ in partial + silent))
    assert all(c is not None for c in closed), f"{closed.count(None)} connections without a whole request still open"
    writer.write(_signed_request(proxy, {"requestMetadata": metadata("KmsHealthCheck")}))
    assert (await _response(reader))[0] == 200
    # ... and is closed by the idle deadline.
    took = await _closed_by_server(reader, IDLE_TIMEOUT + SLACK)
    assert took is not None and took >= IDLE_TIMEOUT - 0.5, took
    for _, w in partial + silent + [(reader, writer)]:
        w.close()


async def test_200_idle_connections_are_all_closed_by_the_sweep_and_none_early(proxy: Served) -> None:
    """No timer per connection: one sweep per worker closes each after its idle deadline, within a sweep period."""
    request = _signed_request(proxy, {"requestMetadata": metadata("KmsHealthCheck")})

    async def served_then_idle() -> float | None:
        sent = time.monotonic()  # before the server's idle clock can start: a sure lower bound, however late we read
        reader, writer = await _open(proxy, request)
        try:
            assert (await _response(reader))[0] == 200
            if await _closed_by_server(reader, IDLE_TIMEOUT + SWEEP_SECONDS + SLACK) is None:
                return None
            return time.monotonic() - sent
        finally:
            writer.close()

    took = await asyncio.gather(*(served_then_idle() for _ in range(200)))
    assert all(t is not None for t in took), f"{took.count(None)} idle connections still open"
    print(f"200 idle connections closed {min(took):.2f}-{max(took):.2f} s after their requests (idle {IDLE_TIMEOUT} s)")  # type: ignore[type-var]
    assert min(took) >= IDLE_TIMEOUT, min(took)  # type: ignore[type-var]  # none early


# --- memory: 1,000 TLS connections whose headers never end ------------------------------------------


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Served]:
    """A header deadline long enough that all 1,000 connections are open at once when RSS is read
    (1,000 handshakes take 5-15 s on a loaded 2-core machine), short enough for "closed within 30 s"."""
    yield from _serve(tmp_path, header_timeout_seconds=20.0, max_connections=2500)


async def test_1000_tls_connections_without_headers_cost_under_100_mb_and_are_closed(roomy: Served) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=roomy.ctx)) as session:
        assert (await roomy.client(session).call("health", requestMetadata=metadata("KmsHealthCheck")))[0] == 200
    before = roomy.rss_kib()
    started = time.monotonic()
    # Handshake done, then a request line and headers that never end.
    tls = await _in_batches([_open(roomy, b"POST /test/kms/xks/v1/health HTTP/1.1\r\nHost: x\r\n") for _ in range(1000)])
    tls_done = time.monotonic()
    with_tls = roomy.rss_kib()
    # Connected, and not even a ClientHello (closed by the 10 s handshake timeout).
    raw = await _in_batches([asyncio.open_connection("127.0.0.1", roomy.port) for _ in range(1000)])
    raw_done = time.monotonic()
    await asyncio.sleep(0.5)
    peak = roomy.rss_kib()
    still_open = sum(not r.at_eof() for r, _ in tls + raw)
    assert still_open == 2000, f"only {still_open} of 2,000 open at once (opening took {raw_done - started:.1f} s)"
    closed = await asyncio.gather(
        *(_closed_by_server(r, 30.0 - (time.monotonic() - tls_done)) for r, _ in tls),
        *(_closed_by_server(r, 30.0 - (time.monotonic() - raw_done)) for r, _ in raw),
    )
    assert all(c is not None for c in closed), f"{closed.count(None)} of 2,000 still open 30 s after they were opened"
    await asyncio.sleep(0.5)
    after = roomy.rss_kib()
    print(
        f"RSS {before / 1024:.1f} MiB; 1,000 TLS +{(with_tls - before) / 1024:.1f} MiB; 1,000 raw +{(peak - with_tls) / 1024:.1f} MiB;"
        f" after closing +{(after - before) / 1024:.1f} MiB; TLS opened in {tls_done - started:.1f} s"
    )
    assert with_tls - before < 100 * 1024, (before, with_tls)
    assert peak - with_tls < 100 * 1024, (with_tls, peak)
    assert after - before < 100 * 1024, (before, after)
    for _, writer in tls + raw:
        writer.close()


# --- bytes a stranger chooses ----------------------------------------------------------------------------


async def test_non_utf8_and_non_ascii_header_values_are_401_never_500(proxy: Served) -> None:
    """A signed header holding bytes >= 0x80 (valid access key id, a made-up signature): 401, 30 times."""
    statuses = []
    for i in range(30):
        value = bytes([0x80 + i * 4]) + b"abc" if i % 3 else "é-ü".encode()
        request = _signed_request(proxy, {"requestMetadata": metadata("KmsHealthCheck")}, {"X-Xks-Extra": value})
        head, body = request.split(b"\r\n\r\n", 1)
        head = head.replace(b"SignedHeaders=content-type;host;x-amz-date", b"SignedHeaders=content-type;host;x-amz-date;x-xks-extra")
        reader, writer = await _open(proxy, head + b"\r\n\r\n" + body)
        status, answer = await _response(reader)
        statuses.append(status)
        assert json.loads(answer)["errorName"] == "AuthenticationFailedException", answer
        writer.close()
    assert statuses == [401] * 30


async def test_a_client_gone_mid_body_is_its_own_outcome_not_a_5xx(proxy: Served) -> None:
    def gone() -> list[dict[str, Any]]:  # the audit file is written in batches: count, do not slice
        return [r for r in proxy.audit() if r.get("outcome") == "ClientDisconnected"]

    before = len(gone())
    for _ in range(20):
        reader, writer = await _open(proxy, proxy.health_head("Content-Length: 5000\r\n") + b'{"requestMetadata": ')
        await asyncio.sleep(0.05)
        writer.transport.abort()
    await asyncio.sleep(1.0)
    records = gone()[before:]
    assert len(records) == 20 and all(r["status"] == 499 for r in records), records
    assert not [r for r in proxy.audit() if r.get("status", 0) >= 500]
    samples = await scrape(proxy.metrics_port)
    assert value(samples, "xks_requests_total", store="test", operation="health", outcome="ClientDisconnected") >= 20
    assert value(samples, "xks_requests_total", store="test", operation="health", outcome="InternalException") is None
    log = proxy.log.read_text()
    assert "Traceback" not in log and '"level":"ERROR"' not in log, log[-3000:]


async def test_a_malformed_request_puts_no_byte_of_it_in_any_log(proxy: Served) -> None:
    """The header block ends in \\r\\n\\r\\x01: aiohttp's parser error quotes what follows (the body)."""
    body = json.dumps({"requestMetadata": metadata("Encrypt"), "plaintext": MARKER}).encode()
    for _ in range(10):
        reader, writer = await _open(
            proxy, proxy.health_head(f"Content-Length: {len(body)}\r\n")[:-2] + b"\r\x01" + body + b"\r\n\r\n" + body
        )
        status, _ = await _response(reader)
        assert status == 400
        writer.close()
    await asyncio.sleep(1.0)
    log = proxy.log.read_text()
    assert "BadHttpMessage" in log, "aiohttp's refusal is logged (one line)"
    assert MARKER not in log and MARKER not in (proxy.home / "audit.log").read_text()
    assert "Traceback" not in log


# --- the per-worker connection cap -------------------------------------------------------------------------


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Served]:
    """20 connections per worker (the default is 2 workers on this machine: 40 for the proxy)."""
    yield from _serve(tmp_path, max_connections=20, header_timeout_seconds=10.0)


async def test_connections_over_the_cap_are_closed_at_once_and_the_proxy_serves_after(capped: Served) -> None:
    workers = os.cpu_count() or 1
    cap = 20 * workers
    raw = [await asyncio.open_connection("127.0.0.1", capped.port) for _ in range(cap + 40)]
    await asyncio.sleep(0.5)  # every accept has been seen by a worker
    closed = await asyncio.gather(*(_closed_by_server(r, 1.0) for r, _ in raw))
    refused = sum(c is not None for c in closed)
    # Each worker holds at most 20; the kernel's spread over workers decides who holds how many.
    assert 40 <= refused <= cap + 40 - 20, (refused, cap)
    assert 1 <= capped.log.read_text().count("connection cap reached") <= workers, "one line per worker per minute"
    for _, writer in raw:
        writer.close()
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=capped.ctx)) as session:
        status, _ = await capped.client(session).call("health", requestMetadata=metadata("KmsHealthCheck"))
    assert status == 200
