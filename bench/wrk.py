"""Closed-loop measurement with wrk: one thread, N connections, pre-signed requests from a Lua list.

Reports requests/s, latency percentiles, errors, and the CPU both sides used (the generator's from
its rusage as our child, the server's from /proc), so a reader can tell the proxy's limit from
the generator's.
"""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path
from typing import Any

from bench import procs

WRK_LUA = """
local requests = {%s}
local i = 0
request = function()
  i = i + 1
  return requests[(i %% #requests) + 1]
end
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors_status":%%d,"errors_other":%%d,"p50_us":%%d,"p99_us":%%d,"p999_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def run(url: str, raw_requests: list[str], duration: float, connections: int, workdir: Path,
        cores: str | None = None, server_pids: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """One wrk run against `url`; `server_pids` are the processes whose CPU is reported beside it."""
    script = workdir / "bench.lua"
    # JSON string escapes are Lua string escapes for ASCII; Lua's long brackets would turn \r\n into \n.
    script.write_text(WRK_LUA % ",".join(json.dumps(r) for r in raw_requests))
    cmd = procs.pinned(["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--timeout", "5s", "-s", str(script), url], cores)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = procs.cpu_seconds(server_pids or [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    server_after = procs.cpu_seconds(server_pids or [])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(l for l in out.stdout.splitlines() if l.startswith("WRKJSON "))
    stats = json.loads(line[len("WRKJSON ") :])
    seconds = stats["duration_us"] / 1e6
    wrk_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    server_cpu = server_after - server_before
    return {
        "rps": round(stats["requests"] / seconds, 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "p999_ms": stats["p999_us"] / 1000,
        "errors": stats["errors_status"] + stats["errors_other"],
        "wrk_cpu_percent": round(100 * wrk_cpu / seconds, 1),
        "server_cpu_percent": round(100 * server_cpu / seconds, 1),
        # What a request costs the server whatever share of the core it got: robust to other load.
        "server_cpu_us_per_request": round(1e6 * server_cpu / stats["requests"], 1) if stats["requests"] else None,
    }
