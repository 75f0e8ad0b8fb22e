"""Instructions per request under callgrind: a count the machine's noise does not move.

Throughput and CPU time on this shared machine move by about +-0.08 in a ratio between runs,
which hides a change of a few microseconds. An instruction count does not move: here the
baseline app and the proxy (the headline's vault home, one worker in-process) each run under
`valgrind --tool=callgrind`; a client sends 300 requests to warm the server, the counters are
zeroed (`callgrind_control -z`), 1,000 more go over 8 keep-alive connections, and the counters
are dumped. What is printed is instructions per request, whole process (aiohttp, the event loop,
our code, the log threads), and the baseline's count over ours.

It is not a time. Valgrind's CPU runs SHA-256 in software (about 30 instructions per byte,
measured; the real core has SHA extensions), and a cache miss counts as one instruction, so
the ratio here is not the throughput ratio (0.54 here beside 0.59 in the headline of the same
code, README). Use it to compare two versions of our code; the headline says how fast they are.
"""

from __future__ import annotations

import asyncio
import glob
import re
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from bench import presign, procs
from bench.homes import KEY, ROOT, Credential

if TYPE_CHECKING:
    from bench.context import Context

WARM, COUNTED, CONNECTIONS = 300, 1000, 8


async def _send(port: int, requests: list[str], count: int) -> None:
    """`count` requests over keep-alive connections, each answer read whole; anything but 200 stops the part."""
    sent = 0

    async def connection(first: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = first
        while sent < count:
            sent += 1
            writer.write(requests[i % len(requests)].encode("latin-1"))
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"the server answered {head.splitlines()[0]!r}")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    await asyncio.gather(*(connection(k) for k in range(CONNECTIONS)))


def _count(cmd: list[str], env: dict[str, str], port: int, requests: Any, tag: str, ctx: "Context") -> float:
    """Instructions per request of the server `cmd` listening on `port`."""
    out = ctx.workdir / f"callgrind.{tag}"
    proc = procs.start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *cmd], port, env,
                       ctx.workdir / f"callgrind-{tag}.log")  # fmt: skip
    try:
        batch = requests()
        asyncio.run(_send(port, batch, WARM))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_send(port, batch, COUNTED))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(0.5)
    finally:
        procs.stop(proc)
    # Dump 1 holds the counted requests (zeroed just before them); dump 0 is written at exit.
    (dump,) = glob.glob(f"{out}.{proc.pid}.1")
    with open(dump) as f:
        total = next(int(m.group(1)) for line in f if (m := re.match(r"(?:totals|summary): (\d+)", line)))
    return total / COUNTED


def part(ctx: "Context") -> dict[str, Any]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return {"error": "valgrind is not installed (apt-get install valgrind)"}
    home = ctx.home("headline")
    cred: Credential = home.stores[0]
    out: dict[str, Any] = {"warm_requests": WARM, "counted_requests": COUNTED, "connections": CONNECTIONS}
    for op in ("encrypt", "decrypt", "metadata"):
        base_port, proxy_port = procs.free_port(), procs.free_port()
        ciphertexts = _ciphertexts(ctx, op)  # the baseline answers any body alike: the same requests for both
        baseline = _count([sys.executable, str(ROOT / "bench" / "baseline.py"), "--port", str(base_port)], dict(home.env),
                          base_port, lambda: presign.rotation(base_port, [(cred, KEY)], op, ciphertexts=ciphertexts),
                          f"baseline-{op}", ctx)  # fmt: skip
        proxy = _count([sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home.path), "--host", "127.0.0.1",
                        "--port", str(proxy_port), "--workers", "1", "--http"], dict(home.env), proxy_port,
                       lambda: presign.rotation(proxy_port, [(cred, KEY)], op, ciphertexts=ciphertexts), f"vault-{op}", ctx)  # fmt: skip
        out[op] = {"baseline": round(baseline), "vault": round(proxy), "ratio": round(baseline / proxy, 3)}
    return out


def _ciphertexts(ctx: "Context", op: str) -> dict[str, Any] | None:
    """For Decrypt, one real ciphertext of the home's key, from a proxy run briefly without valgrind."""
    if op != "decrypt":
        return None
    from bench.context import fetch_ciphertexts

    home = ctx.home("headline")
    with ctx.serving(home) as server:
        return fetch_ciphertexts(server, [(home.stores[0], KEY)])
