"""An open-loop load generator: sends pre-built HTTP/1.1 requests at a fixed rate, whatever the server does.

Closed-loop tools (wrk) slow down with the server and hide its stalls ("coordinated omission").
Here every request has a scheduled send time, and its latency is measured from that time, so a
server that stalls is charged for every request that should have gone out meanwhile.

Prints one JSON object: offered rate, achieved rate, latency percentiles (ms), errors, CPU used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path


class Connection(asyncio.Protocol):
    """One keep-alive connection; responses are matched to requests in order."""

    def __init__(self, done: asyncio.Queue["Connection"]) -> None:
        self.done = done
        self.buffer = b""
        self.started = 0.0
        self.latencies: list[float] = []
        self.errors = 0
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, scheduled: float) -> None:
        self.started = scheduled
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        self.buffer = self.buffer[head_end + 4 + length :]
        if not head.startswith("HTTP/1.1 200"):
            self.errors += 1
        self.latencies.append(time.perf_counter() - self.started)
        self.done.put_nowait(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.errors += 1


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def run(host: str, port: int, requests: list[bytes], rate: float, duration: float, connections: int) -> dict:
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    conns = []
    for _ in range(connections):
        _, conn = await loop.create_connection(lambda: Connection(idle), host, port)
        conns.append(conn)
        idle.put_nowait(conn)
    total = int(rate * duration)
    interval = 1.0 / rate
    start = time.perf_counter() + 0.05
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    waited_for_connection = 0
    for i in range(total):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle.empty():
            waited_for_connection += 1
        conn = await idle.get()
        conn.send(requests[i % len(requests)], scheduled)
    deadline = time.perf_counter() + 10
    while sum(len(c.latencies) for c in conns) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies = [lat for c in conns for lat in c.latencies]
    for c in conns:
        c.closing = True
        if c.transport:
            c.transport.close()
    return {
        "offered_rps": rate,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "requests": total,
        "elapsed_s": round(elapsed, 3),
        "completed": len(latencies),
        "errors": sum(c.errors for c in conns) + (total - len(latencies)),
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "p999_ms": round(percentile(latencies, 99.9) * 1000, 3),
        "max_ms": round(max(latencies) * 1000, 3) if latencies else None,
        "sends_that_waited_for_a_connection": waited_for_connection,
        "loadgen_cpu_percent": round(
            100 * (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / elapsed, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=Path, required=True, help="JSON list of raw HTTP requests (latin-1 strings)")
    parser.add_argument("--rate", type=float, default=1800)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    requests = [r.encode("latin-1") for r in json.loads(args.requests.read_text())]
    result = asyncio.run(run(args.host, args.port, requests, args.rate, args.duration, args.connections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
