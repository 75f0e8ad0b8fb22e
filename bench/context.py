"""What every part of a run shares: its settings, its scratch directory, the homes made so far,
and the helpers to serve one and sample its memory while a measurement runs."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from bench import presign, procs, wrk
from bench.homes import ROOT, Credential, Home, serve_baseline

RESULTS = Path(__file__).resolve().parent / "results"
#: The issue's placement on a 2-core machine: the server on core 0, the generator on core 1.
SERVER_CORE, LOADGEN_CORE = "0", "1"


@dataclass
class Server:
    """A running proxy (or the baseline) on a port, and its processes."""

    proc: subprocess.Popen[bytes]
    port: int
    supervised: bool
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        return procs.workers(self.proc.pid, self.supervised)

    def all_pids(self) -> list[int]:
        return [self.proc.pid, *procs.children(self.proc.pid)]


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    homes: dict[str, Home] = field(default_factory=dict)

    def home(self, name: str, backend: str = "vault", setup: Callable[[Home], None] | None = None) -> Home:
        """The home of that name, made (and set up) on first use."""
        if name not in self.homes:
            self.homes[name] = home = Home.create(self.workdir, name, backend)
            if setup:
                setup(home)
        return self.homes[name]

    @contextmanager
    def serving(self, home: Home | None, workers: int = 1, cores: str | None = SERVER_CORE, tls: bool = False) -> Iterator[Server]:
        """The proxy on `home` (None: the baseline app), stopped afterwards."""
        server = self._start(home, workers, cores, tls)
        try:
            yield server
        finally:
            procs.stop(server.proc)

    @contextmanager
    def serving_floor(self, cred: Credential, cores: str | None = SERVER_CORE) -> Iterator[Server]:
        """bench/floor.py (the spec's work only), accepting `cred`'s signatures, stopped afterwards."""
        port = procs.free_port()
        env = dict(os.environ, XKS_FLOOR_ACCESS_KEY_ID=cred.access_key_id, XKS_FLOOR_SECRET=cred.secret,
                   XKS_FLOOR_AUDIT=str(self.workdir / "floor-audit.log"))  # fmt: skip
        cmd = procs.pinned([sys.executable, str(ROOT / "bench" / "floor.py"), "--port", str(port)], cores)
        server = Server(procs.start(cmd, port, env, self.workdir / "floor.log"), port, supervised=False)
        try:
            yield server
        finally:
            procs.stop(server.proc)

    def _start(self, home: Home | None, workers: int, cores: str | None, tls: bool, attempts: int = 2) -> Server:
        """Start a server on a free port; once more on another port if it fails (a port taken
        meanwhile by the tests that share the machine)."""
        for attempt in range(attempts):
            port = procs.free_port()
            try:
                if home is None:
                    return Server(serve_baseline(self.workdir, port, workers, cores), port, supervised=False)
                return Server(home.serve(port, workers, cores, tls), port, supervised=True, tls=tls)
            except RuntimeError as exc:
                if attempt == attempts - 1:
                    raise
                print(f"bench: a server did not start, trying again: {exc}", file=sys.stderr, flush=True)
        raise AssertionError("unreachable")

    def wrk(self, server: Server, requests: list[str], duration: float | None = None, connections: int | None = None,
            cores: str | None = LOADGEN_CORE) -> dict[str, Any]:  # fmt: skip
        """wrk against the server, with the peak RSS of its busiest worker sampled meanwhile."""
        peak = [0.0]
        stop = threading.Event()
        workers = server.workers()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max([peak[0], *(procs.rss_mb(p) for p in workers)])

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = wrk.run(server.url, requests, duration or self.args.duration, connections or self.args.connections,
                             self.workdir, cores, server.all_pids())  # fmt: skip
        finally:
            stop.set()
            sampler.join()
        result["rss_mb_worker_peak"] = peak[0]
        return result


def fetch_ciphertexts(server: Server, targets: list[tuple[Credential, str]]) -> dict[str, dict[str, Any]]:
    """One real ciphertext per (store, key) from the running proxy, to decrypt under load."""
    out = {}
    for cred, key_id in targets:
        raw = presign.xks(server.port, cred, key_id, "encrypt", presign.encrypt_body(b"p" * presign.PLAINTEXT_BYTES))
        status, body = http_exchange(server.port, raw)
        if status != 200:
            raise RuntimeError(f"encrypt for {cred.prefix}/{key_id} answered {status}: {body[:200]!r}")
        answer = json.loads(body)
        out[f"{cred.prefix}/{key_id}"] = {k: answer[k] for k in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata") if k in answer}
    return out


def http_exchange(port: int, raw: str) -> tuple[int, bytes]:
    """Send one raw request on a new plain connection; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw.encode("latin-1"))
        data = b""
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                head = data[:head_end].decode("latin-1")
                length = next((int(l.split(":", 1)[1]) for l in head.split("\r\n") if l.lower().startswith("content-length:")), 0)
                if len(data) >= head_end + 4 + length:
                    return int(head.split()[1]), data[head_end + 4 : head_end + 4 + length]
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed after {data[:200]!r}")
            data += chunk
