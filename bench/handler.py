"""Our own code's cost per request, in one process, without HTTP: `python -m bench.handler`.

The headline cells measure the whole worker, whose time is about half aiohttp's and the event
loop's; the machine's noise between runs (about +-0.08 in a ratio) hides a change of a few
microseconds in our part. Here `XksServer.handle` is called directly on pre-built, pre-signed
aiohttp requests (routing, body read, SigV4, JSON, quota and policy, the vault's AES-GCM, the
response object, the access and audit record with both logs on), so what is printed is our
part alone: microseconds of CPU per request, the median over the rounds and their spread.
The same request runs thousands of times in a row, with warm caches: a lower bound of what the
code costs inside a serving worker, where it runs between aiohttp's steps (py-spy's profile
gives its share there). It is for comparing two versions of our code; in bench/run.py (part
"handler", each operation in a process pinned to the server's core) it is printed beside the
headline cells of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import streams, web
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bench import presign, procs
from bench.context import SERVER_CORE
from bench.homes import KEY, ROOT, Home

if TYPE_CHECKING:
    from bench.context import Context


def _parse(raw: str) -> tuple[str, str, CIMultiDict[str], bytes]:
    head, _, body = raw.partition("\r\n\r\n")
    request_line, *lines = head.split("\r\n")
    method, path, _ = request_line.split(" ")
    headers: CIMultiDict[str] = CIMultiDict(line.split(": ", 1) for line in lines)  # type: ignore[misc]
    return method, path, headers, body.encode("latin-1")


class _Connection:
    """What a request reads of its connection (aiohttp's RequestHandler): the peer, no TLS."""

    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8000)
    _reading_paused = False

    def pause_reading(self) -> None: ...

    def resume_reading(self, resume_parser: bool = True) -> None: ...


def _request(method: str, path: str, headers: CIMultiDict[str], body: bytes, loop: asyncio.AbstractEventLoop) -> web.BaseRequest:
    """The request aiohttp's parser would hand `handle`: the message, its whole body, the peer."""
    connection = _Connection()
    payload = streams.StreamReader(connection, 2**16, loop=loop)  # type: ignore[arg-type]
    payload.feed_data(body)
    payload.feed_eof()
    raw_headers = tuple((k.encode(), v.encode()) for k, v in headers.items())
    message = RawRequestMessage(
        method, path, HttpVersion11, CIMultiDictProxy(headers), raw_headers, False, None, False, False, URL(path)
    )
    return web.BaseRequest(message, payload, connection, None, None, loop)  # type: ignore[arg-type]


async def measure(home: Home, op: str, count: int, rounds: int) -> list[float]:
    from keymanager import create_key_manager
    from xks_proxy import config as configmod
    from xks_proxy.access.audit import AuditLog
    from xks_proxy.process import logsink
    from xks_proxy.server import XksServer

    config = configmod.load(home.path)
    audit = AuditLog(config.audit)  # as a serving process has it: records to the home's audit.log
    logsink.setup_stderr("info", "json")  # and the access line to stderr (sent to /dev/null by main)
    server = XksServer(config, create_key_manager(config))
    await server.start()
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    cred = home.stores[0]
    ciphertext = None
    if op == "decrypt":  # one real ciphertext from this very server
        first = _request(*_parse(presign.xks(1, cred, KEY, "encrypt", presign.encrypt_body(rng.randbytes(256)))), loop)
        response = await server.handle(first)  # type: ignore[arg-type]
        ciphertext = json.loads(response.body)  # type: ignore[union-attr]
    results = []
    try:
        for _ in range(rounds):
            body = presign.body_for(op, rng, presign.PLAINTEXT_BYTES, ciphertext)
            raw = presign.xks(1, cred, KEY, op, body)
            requests = [_request(*_parse(raw), loop) for _ in range(count)]
            started = time.process_time()
            for request in requests:
                response = await server.handle(request)  # type: ignore[arg-type]
            used = time.process_time() - started
            assert response.status == 200, response.body  # type: ignore[union-attr]
            results.append(1e6 * used / count)
    finally:
        await server.close()
        audit.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="encrypt", choices=("encrypt", "decrypt", "metadata"))
    parser.add_argument("--requests", type=int, default=4000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object (bench/run.py's handler part)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xks-handler-") as tmp:
        home = Home.create(Path(tmp), "handler")
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
        os.dup2(devnull, 2)
        try:
            results = asyncio.run(measure(home, args.op, args.requests, args.rounds))
        finally:
            logging.shutdown()  # the batched access lines go out now, to /dev/null, not at exit
            os.dup2(saved, 2)
    summary = {"op": args.op, "us_per_request": round(statistics.median(results), 1), "min": round(min(results), 1),
               "max": round(max(results), 1), "rounds": args.rounds, "requests_per_round": args.requests}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.op}: {summary['us_per_request']} us of CPU per request in XksServer.handle "
              f"(median of {args.rounds} rounds of {args.requests}; min {summary['min']}, max {summary['max']})")  # fmt: skip


def part(ctx: "Context") -> dict[str, Any]:
    """bench/run.py's handler part: each operation in its own process, pinned to the server's core."""
    out = {}
    for op in ("encrypt", "decrypt", "metadata"):
        cmd = [sys.executable, "-m", "bench.handler", "--op", op, "--json"]
        run = subprocess.run(procs.pinned(cmd, SERVER_CORE), capture_output=True, text=True, check=True, cwd=ROOT)
        out[op] = json.loads(run.stdout.splitlines()[-1])
    return out


if __name__ == "__main__":
    main()
