"""Hold N TLS connections open against the proxy, idle after one request each.

Each connection completes a handshake and one pre-signed GetHealthStatus (so it is an idle
keep-alive connection, not one still waiting for headers, which the header deadline would close),
then stays. Prints `READY <opened> <answered 200> <statuses as JSON>` once all are idle, and holds them until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from collections import Counter


async def one(port: int, request: bytes, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        return reader, writer, head.split(b" ", 2)[1].decode()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, StopIteration):
        return None


async def main(port: int, count: int, request: bytes) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker's shortcut too: it halves the client's CPU
    held = []
    for start in range(0, count, 50):
        held += await asyncio.gather(*(one(port, request, ctx) for _ in range(min(50, count - start))))
    opened = [h for h in held if h]
    statuses = Counter(status for _, _, status in opened)
    print(f"READY {len(opened)} {statuses['200']} {json.dumps(statuses)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, writer, _ in opened:
        writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--request-file", required=True)
    args = parser.parse_args()
    with open(args.request_file, "rb") as f:  # bytes: text mode would turn \r\n into \n
        asyncio.run(main(args.port, args.count, f.read()))
