"""Memory: a TLS worker's RSS before and after 1,000 idle TLS connections (bench/tlsidle.py on
core 1). RSS under load is sampled by every wrk cell (`rss_mb_worker_peak`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench import presign, procs
from bench.context import LOADGEN_CORE, Context
from bench.homes import ROOT


def idle_tls(ctx: Context, count: int = 1000) -> dict[str, Any]:
    home = ctx.home("headline")
    with ctx.serving(home, tls=True) as server:
        request = ctx.workdir / "health.http"
        health = {"requestMetadata": presign.metadata("KmsHealthCheck")}
        request.write_bytes(presign.xks(server.port, home.stores[0], "", "health", health).encode("latin-1"))
        time.sleep(1.0)
        (worker,) = server.workers()
        before = procs.rss_mb(worker)
        cmd = [sys.executable, str(ROOT / "bench" / "tlsidle.py"), "--port", str(server.port), "--count", str(count),
               "--request-file", str(request)]  # fmt: skip
        started = time.monotonic()
        client = subprocess.Popen(procs.pinned(cmd, LOADGEN_CORE), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready = (client.stdout.readline() if client.stdout else "").split(maxsplit=3)
            took = time.monotonic() - started
            time.sleep(1.0)
            held = procs.rss_mb(worker)
        finally:
            if client.stdin:
                client.stdin.close()
            client.wait(timeout=30)
        opened, answered = (int(ready[1]), int(ready[2])) if len(ready) >= 3 else (0, 0)
        return {"connections_asked": count, "connections_opened": opened, "health_answered_200": answered,
                "statuses": json.loads(" ".join(ready[3:]) or "{}"),
                "rss_mb_before": before, "rss_mb_with_idle": held, "rss_mb_added": round(held - before, 1),
                "seconds_to_open": round(took, 1)}  # fmt: skip
