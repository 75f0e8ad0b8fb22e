"""Open loop: Encrypt offered at a fixed rate (1,800/s, KMS's default quota) by bench/loadgen.py on
core 1, to one pinned worker on core 0; latency from each request's scheduled send time."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

from bench import procs
from bench.context import LOADGEN_CORE, Context, Server
from bench.homes import ROOT, Home
from bench.throughput import signed


def offer(ctx: Context, server: Server, requests: list[str]) -> dict[str, Any]:
    path = ctx.workdir / "open.json"
    path.write_text(json.dumps(requests))
    cmd = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(server.port), "--requests", str(path),
           "--rate", str(ctx.args.rate), "--duration", str(ctx.args.openloop_duration)]  # fmt: skip
    before = procs.cpu_seconds(server.all_pids())
    out = subprocess.run(procs.pinned(cmd, LOADGEN_CORE), capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    used = procs.cpu_seconds(server.all_pids()) - before
    result["server_cpu_percent"] = round(100 * used / result["elapsed_s"], 1)
    result["server_cpu_us_per_request"] = round(1e6 * used / max(result["completed"], 1), 1)
    return result


def openloop(ctx: Context) -> dict[str, Any]:
    """The servers side by side on core 0, offered the load in turn, for --rounds rounds: each
    metric is the median over the rounds (errors: their sum), with every round's p99 beside it."""
    vault = ctx.home("headline")
    homes: dict[str, Home | None] = {"baseline": None, "vault": vault}
    if "pkcs11" in ctx.args.backends:
        homes["pkcs11"] = ctx.home("softhsm", "pkcs11")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in homes}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(ctx.serving(home)) for name, home in homes.items()}
        for _ in range(ctx.args.openloop_rounds):
            for name, server in servers.items():
                rounds[name].append(offer(ctx, server, signed(server, homes[name] or vault, "encrypt")()))
    out = {}
    for name, runs in rounds.items():
        out[name] = {k: sum(r[k] for r in runs) if k == "errors" else statistics.median(r[k] for r in runs) if isinstance(runs[0][k], (int, float))
                     else runs[0][k] for k in runs[0]}  # fmt: skip
        out[name]["rounds_p99_ms"] = [r["p99_ms"] for r in runs]
    return out
