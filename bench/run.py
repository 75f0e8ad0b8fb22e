"""The benchmark: the proxy as users run it, driven from outside, against a baseline in the same run.

    .venv/bin/python bench/run.py [--only headline,openloop,scaling,memory,localkms,profile,handler,instructions,floor,catalog]
                                  [--duration 5] [--rounds 3] [--scaling-duration 4] [--backends vault,pkcs11]

Parts (each in its own module):
  headline  bench/throughput.py  one worker on core 0, wrk -t1 -c32 on core 1, pre-signed 256 B
                                 Encrypt + 64 B AAD, Decrypt, GetKeyMetadata; vault and SoftHSMv2;
                                 the minimal aiohttp app (bench/baseline.py) before and after
  openloop  bench/openloop.py    Encrypt offered at 1,800/s (bench/loadgen.py): p50/p99/p99.9
  scaling   bench/throughput.py  plaintext 16 B-4 KiB, 1/10/100 keys in use, 1/10 stores, 1,000
                                 keys in the vault, 1 and 2 workers with the generator's CPU
  memory    bench/memory.py      a TLS worker's RSS with 1,000 idle TLS connections (bench/tlsidle.py)
  localkms  bench/kmschain.py    Encrypt through `xks-proxy local-kms` and the proxy; added latency
  profile   bench/profile.py     py-spy on the worker under the headline load, shares by category
  handler   bench/handler.py     our code alone (XksServer.handle in-process, no HTTP), CPU per request
  instructions bench/instructions.py  callgrind instructions per request, baseline and vault, whole process:
                                 noise-free, for comparing versions of our code (not a time)
  floor     bench/floor.py       Encrypt on a server doing only the spec's work (SigV4, JSON, AES-GCM, an
                                 audit line), beside the baseline and the proxy
  catalog   bench/catalog.py     a SoftHSMv2 key catalog scan (the pkcs11 backend's rescan) at 10-1,000 keys

Every server is started fresh on a fresh home (`init --seal file`: default logging, audit on).
Writes bench/results/result.json and table.md. Numbers only: nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import catalog, handler, instructions, kmschain, memory, openloop, profile, report, throughput  # noqa: E402
from bench.context import RESULTS, Context  # noqa: E402

PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "headline": throughput.headline,
    "openloop": openloop.openloop,
    "scaling": throughput.scaling,
    "memory": memory.idle_tls,
    "localkms": kmschain.chain,
    "profile": profile.profile,
    "handler": handler.part,
    "instructions": instructions.part,
    "floor": throughput.floor,
    "catalog": catalog.part,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per headline, open-loop and profile cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the headline cells")
    parser.add_argument("--scaling-rounds", type=int, default=2, help="interleaved rounds of the scaling cells")
    parser.add_argument("--scaling-duration", type=int, default=4, help="seconds per scaling and local KMS cell")
    parser.add_argument("--backends", default="vault,pkcs11", help="comma-separated: vault, pkcs11 (SoftHSMv2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--openloop-duration", type=int, default=10, help="seconds per open-loop cell")
    parser.add_argument("--openloop-rounds", type=int, default=2, help="rounds of the open-loop cells")
    parser.add_argument("--profile-duration", type=int, default=12, help="seconds py-spy samples the worker")
    parser.add_argument("--rate", type=float, default=1800, help="open-loop offered rate")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed (apt-get install {'wrk' if tool == 'wrk' else 'util-linux'})")
    return args


def machine() -> dict[str, Any]:
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "processor": model}


def code() -> dict[str, Any]:
    """Which code was measured: the commit, and product files changed on disk but not committed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip("\n")

    dirty = git("status", "--porcelain", "--", "xks_proxy", "keymanager").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_product_files": [line[3:] for line in dirty]}


def main() -> None:
    args = parse_args()
    results: dict[str, Any] = {"started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "machine": machine(), "code": code(), "settings": vars(args), "parts": {}, "seconds": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xks-bench-") as tmp:
        ctx = Context(args, Path(tmp))
        for name in args.only.split(","):
            print(f"bench: {name}...", file=sys.stderr, flush=True)
            started = time.monotonic()
            results["parts"][name] = PARTS[name](ctx)
            results["seconds"][name] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "result.json").write_text(json.dumps(results, indent=2))
    text = report.render(results)
    (RESULTS / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
