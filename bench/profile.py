"""Profile mode: where one worker's time goes under the headline load, by category.

py-spy samples the pinned worker while wrk drives the headline Encrypt, pausing it for each
sample: without the pause (`--nonblocking`) a stack is read while the worker runs, and its
frames can come from different instants (stacks such as XksServer._log under aiohttp's
_prepare_headers, which never calls it), which misplaces whole categories. The pauses slow the
worker by about a fifth; the shares are of samples, so they stand. Each sampled stack is put
in the category of its innermost frame that a rule in CATEGORIES names (so base64 inside the
encrypt path counts as the encrypt path, and the logging module inside the request record
counts as the access log); a stack none of them names goes to FALLBACK's generic machinery
(aiohttp, the event loop), else "other". Threads waiting are left out. CATEGORIES is the one
place the grouping is defined: keep it current when code moves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import procs
from bench.context import LOADGEN_CORE, RESULTS, Context
from bench.throughput import signed

#: (category, file-path pattern, function pattern): a frame matches when both patterns search true.
#: py-spy names methods Class.method, hence the (^|\.) anchors. Checked in this order on each frame.
CATEGORIES: list[tuple[str, str, str]] = [
    ("access log", r"(^|/)logging/|xks_proxy/process/logsink\.py", r"^(?!LineBatch)"),
    ("access log", r"xks_proxy/server\.py", r"(^|\.)_log$"),
    ("audit", r"xks_proxy/access/audit\.py|xks_proxy/process/logsink\.py", r""),
    ("metrics", r"xks_proxy/access/metrics\.py|prometheus_client/", r""),
    ("SigV4", r"xks_proxy/sigv4\.py", r""),
    ("background (vault refresh, config reload)", r"keymanager/vault/manager\.py", r"(^|\.)(_watch|_refresh|_open_sync)$"),
    ("background (vault refresh, config reload)", r"xks_proxy/process/reload\.py", r""),
    ("encrypt path (key lookup, usage, AES-GCM, base64)", r"keymanager/", r""),
    ("encrypt path (key lookup, usage, AES-GCM, base64)", r"xks_proxy/server\.py", r"(^|\.)_(encrypt|decrypt|metadata|timed|observed)$"),
    ("JSON (parse, validate, dump)", r"xks_proxy/protocol\.py|(^|/)json/", r""),
    ("admission (throttle, policy)", r"xks_proxy/access/(throttle|policy)\.py", r""),
    ("admission (throttle, policy)", r"xks_proxy/server\.py", r"(^|\.)(_admit|_authorize|_allowed)(\.|$)"),
    ("routing, body read, handler", r"xks_proxy/server\.py", r""),
    # aiohttp parses the request inside the guard's data_received: parsing, not the guard's cost.
    ("aiohttp request parsing and dispatch", r"aiohttp/web_protocol\.py", r"(^|\.)data_received$"),
    ("connection deadlines (access/connections.py)", r"xks_proxy/access/connections\.py", r""),
    ("aiohttp response writing", r"aiohttp/(web_response|http_writer|abc)\.py", r""),
    ("aiohttp response writing", r"aiohttp/web_protocol\.py", r"(^|\.)(finish_response|_write_headers|write|drain)$"),
]
#: Used only when no frame of the stack matched CATEGORIES: generic machinery under everything.
FALLBACK: list[tuple[str, str, str]] = [
    ("aiohttp request parsing and dispatch", r"aiohttp/", r""),
    ("event loop and transport", r"(^|/)asyncio/|selectors\.py", r""),
]
#: A thread waiting (its leaf frame): not work, left out of the shares.
IDLE = re.compile(r"(^|\.)(wait|_worker)$")
OTHER = "other"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _match(frames: list[dict[str, str]], rules: list[tuple[str, str, str]]) -> str | None:
    """The category of the innermost frame some rule matches."""
    for frame in reversed(frames):
        for name, file_re, func_re in rules:
            if re.search(file_re, frame["file"]) and re.search(func_re, frame["func"]):
                return name
    return None


def categorize(stack: str) -> tuple[str, str]:
    """The category of one collapsed stack (root first), and its leaf frame when that is "other"."""
    frames = [m.groupdict() for f in stack.split(";") if (m := _FRAME.match(f))]
    if frames and IDLE.search(frames[-1]["func"]) and re.search(r"threading\.py|concurrent/futures", frames[-1]["file"]):
        return "idle", ""
    found = _match(frames, CATEGORIES) or _match(frames, FALLBACK)
    if found:
        return found, ""
    leaf = frames[-1] if frames else {"func": stack, "file": ""}
    return OTHER, f"{leaf['func']} ({Path(leaf['file']).name})"


def shares(collapsed: str) -> dict[str, Any]:
    by_category: Counter[str] = Counter()
    other_leaves: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        category, leaf = categorize(stack)
        by_category[category] += int(count)
        if leaf:
            other_leaves[leaf] += int(count)
    idle = by_category.pop("idle", 0)
    total = sum(by_category.values()) or 1
    return {
        "samples": total,
        "idle_thread_samples_left_out": idle,
        "percent": {k: round(100 * v / total, 1) for k, v in by_category.most_common()},
        "other_top_leaves_percent": {k: round(100 * v / total, 1) for k, v in other_leaves.most_common(8)},
    }


def profile(ctx: Context) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    home = ctx.home("headline")
    seconds = ctx.args.profile_duration
    out: dict[str, Any] = {}
    with ctx.serving(home) as server:
        (worker,) = server.workers()
        out["encrypt_without_profiler"] = ctx.wrk(server, signed(server, home, "encrypt")(), ctx.args.duration)
        collapsed = ctx.workdir / "profile.txt"
        cmd = procs.pinned([pyspy, "record", "--pid", str(worker), "--nolineno", "--rate", "250", "--format", "raw",
                            "--duration", str(seconds - 2), "--output", str(collapsed)], LOADGEN_CORE)  # fmt: skip
        spy: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: spy.update(run=subprocess.run(cmd, capture_output=True, text=True)))
        load = threading.Thread(target=lambda: out.update(encrypt_under_profiler=ctx.wrk(server, signed(server, home, "encrypt")(), seconds)))
        load.start()
        time.sleep(1.0)
        thread.start()
        thread.join()
        load.join()
        run = spy["run"]
        if run.returncode != 0 or not collapsed.exists():
            return {**out, "error": f"py-spy could not record (exit {run.returncode}): {run.stderr.strip()[-300:]}"}
        text = collapsed.read_text()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "profile-collapsed.txt").write_text(text)
        out.update(shares(text))
    return out
