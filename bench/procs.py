"""Processes of a run: ports, starting a server in its own session (optionally pinned to cores),
and reading its processes' memory and CPU from /proc.

A proxy is a supervisor, a sidecar (the audit writer, forked first) and N workers; "per worker"
numbers must leave the other two out, so `workers()` tells them apart by start time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cores: str | None) -> list[str]:
    """`cmd` under `taskset -c cores` (None: unpinned), so server and generator each get their own core."""
    return ["taskset", "-c", cores, *cmd] if cores else cmd


def start(cmd: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session (stderr, the access log, to `log`) and wait until it listens."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd[:8])} exited with {proc.returncode}: " + "\n".join(tail))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{cmd[:4]} did not listen; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from any of its threads: /proc/PID/task/PID/children
    would miss children forked from another thread)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def workers(pid: int, supervised: bool = True) -> list[int]:
    """The serving processes: a supervisor's children less the sidecar (its first child); the proxy
    itself when it serves one worker in-process (no children); the baseline and its forks."""
    kids = children(pid)
    if not supervised or not kids:
        return [pid, *kids]
    return sorted(kids, key=lambda p: int(_stat(p)[19]))[1:]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / CLOCK_TICKS
