"""The benchmark: the proxy as users run it, driven by wrk and an open-loop generator, against a baseline.

    .venv/bin/python bench/run.py [--duration 10] [--workers 1,2] [--backends vault,pkcs11]

For each backend and worker count it starts `xks-proxy serve --http --workers N` on a fresh
home (its own processes), and in the same run a minimal aiohttp app on the same port and worker
count answering a fixed JSON body (bench/baseline.py). wrk (closed loop, pre-signed requests:
SigV4 signatures stay valid for 5 minutes) measures requests/s and latency percentiles for
Encrypt, Decrypt and GetKeyMetadata at KMS's sizes; bench/loadgen.py measures latency at a fixed
offered 1,800 requests/s (open loop). Writes bench/results/result.json and a markdown table.
Numbers only: nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xks_proxy import sigv4  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PREFIX = "bench"
KEY = "bench-key"
REGION = "us-east-1"
PLAINTEXT_SIZES = (16, 32, 64, 256, 1024, 4096)  # KMS sends 16-4096 bytes (mostly small)
AAD = b"aws:ebs:id=vol-0123456789abcdef0;" + b"x" * 200  # a few hundred bytes of context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args], check=True, capture_output=True, text=True, env=env).stdout


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def metadata(op: str) -> dict[str, str]:
    return {
        "kmsRequestId": "bench-0000-0000-0000-000000000000",
        "kmsOperation": op,
        "awsPrincipalArn": "arn:aws:iam::111122223333:role/bench",
        "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555",
    }


class Target:
    """A home with a key and its credential; starts servers on it."""

    def __init__(self, backend: str, workdir: Path, env: dict[str, str]) -> None:
        self.backend = backend
        self.home = workdir / f"home-{backend}"
        self.env = env
        if backend == "pkcs11":
            self.env = env = softhsm_home(self.home, workdir)
        else:
            cli("init", "--home", str(self.home), "--uri-prefix", PREFIX, "--region", REGION, env=env)
        cli("keys", "create", KEY, "--home", str(self.home), env=env)
        cred = json.loads(cli("stores", "export", "--home", str(self.home), env=env))["XksProxyAuthenticationCredential"]
        self.access_key_id, self.secret = cred["AccessKeyId"], cred["RawSecretAccessKey"]

    def start(self, port: int, workers: int, baseline: bool) -> subprocess.Popen[bytes]:
        if baseline:
            cmd = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--port", str(port), "--workers", str(workers)]
        else:
            cmd = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(self.home), "--http",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        wait_listening(port, proc)
        return proc

    def raw_request(self, port: int, path: str, body: dict[str, Any]) -> str:
        data = json.dumps(body, separators=(",", ":")).encode()
        host = f"127.0.0.1:{port}"
        headers = sigv4.sign(method="POST", url_path=path, host=host, body=data, access_key_id=self.access_key_id,
                             secret=self.secret, region=REGION, extra_headers={"Content-Type": "application/json"})  # fmt: skip
        lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()] + [f"Content-Length: {len(data)}", "", ""]
        return ("\r\n".join(lines)).encode().decode("latin-1") + data.decode("latin-1")

    def requests(self, port: int, op: str, ciphertexts: list[dict[str, Any]]) -> list[str]:
        base = f"/{PREFIX}/kms/xks/v1/keys/{KEY}"
        rng = random.Random(7)
        out = []
        for i in range(60):
            if op == "encrypt":
                plaintext = rng.randbytes(PLAINTEXT_SIZES[i % len(PLAINTEXT_SIZES)])
                body = {"requestMetadata": metadata("Encrypt"), "plaintext": base64.b64encode(plaintext).decode(),
                        "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": base64.b64encode(AAD).decode()}  # fmt: skip
            elif op == "decrypt":
                body = {"requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
                        "additionalAuthenticatedData": base64.b64encode(AAD).decode(), **ciphertexts[i % len(ciphertexts)]}  # fmt: skip
            else:
                body = {"requestMetadata": metadata("CreateKey")}
            out.append(self.raw_request(port, f"{base}/{op}", body))
        return out


def softhsm_home(home: Path, workdir: Path) -> dict[str, str]:
    """A fresh SoftHSMv2 token and a pkcs11 home over it, made the way a migrating operator would:
    the AWS sample proxy's settings.toml, imported with `xks-proxy import-config`."""
    module = next((m for m in ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                               "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so") if Path(m).exists()), None)  # fmt: skip
    if module is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("the pkcs11 benchmark needs SoftHSMv2: apt-get install softhsm2")
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SOFTHSM2_CONF=str(conf))
    pin = "bench-pin-1234"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "xks-bench", "--so-pin", "bench-so-1234",
                    "--pin", pin], check=True, capture_output=True, env=env)  # fmt: skip
    from xks_proxy.cli.home import new_access_key_id, new_secret

    settings = workdir / "aws-settings.toml"
    settings.write_text("\n".join([
        "[server]", 'ip = "127.0.0.1"', "port = 8000", f'region = "{REGION}"', 'service = "kms-xks-proxy"',
        "[security]", "is_sigv4_auth_enabled = true", "is_tls_enabled = false", "is_mtls_enabled = false",
        "[pkcs11]", "session_pool_max_size = 16", "session_pool_timeout_milli = 5000", f'user_pin = "{pin}"',
        f'PKCS11_HSM_MODULE = "{module}"', "context_read_timeout_milli = 1000",
        "[limits]", "max_plaintext_in_base64 = 8192", "max_aad_in_base64 = 16384",
        "[hsm_capabilities]", "can_generate_iv = false", "is_zero_iv_required = false",
        "[[external_key_stores]]", f'uri_path_prefix = "/{PREFIX}"', f'sigv4_access_key_id = "{new_access_key_id()}"',
        f'sigv4_secret_access_key = "{new_secret()}"', "",
    ]))  # fmt: skip
    cli("import-config", str(settings), "--home", str(home), env=env)
    return env


def fetch_ciphertexts(target: Target, port: int) -> list[dict[str, Any]]:
    """Real ciphertexts from the running proxy, to decrypt under load."""
    out = []
    for raw in target.requests(port, "encrypt", []):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(raw.encode("latin-1"))
            data = b""
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        out.append({k: body[k] for k in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata")})
    return out


def _length(data: bytes) -> int:
    match = re.search(rb"Content-Length: (\d+)", data, re.I)
    return int(match[1]) if match else 0


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


def run_wrk(port: int, raw_requests: list[str], duration: float, connections: int, workdir: Path) -> dict[str, Any]:
    script = workdir / "bench.lua"
    # JSON string escapes are Lua string escapes for ASCII; Lua's long brackets would turn \r\n into \n.
    script.write_text(WRK_LUA % ",".join(json.dumps(r) for r in raw_requests))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(l for l in out.stdout.splitlines() if l.startswith("WRKJSON "))
    stats = json.loads(line[len("WRKJSON ") :])
    seconds = stats["duration_us"] / 1e6
    return {
        "rps": round(stats["requests"] / seconds, 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "p999_ms": stats["p999_us"] / 1000,
        "errors": stats["errors_status"] + stats["errors_other"],
        "loadgen_cpu_percent": round(100 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / seconds, 1),
    }


def rss_mb(pid: int) -> list[float]:
    """Resident memory of each worker (the children of a supervisor, or the process itself)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        out = []
        for p in [int(p) for p in children] or [pid]:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(round(int(line.split()[1]) / 1024, 1))
        return out
    except OSError:  # the process is gone: nothing to sample
        return []


def measure(target: Target, workers: int, baseline: bool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    proc = target.start(port, workers, baseline)
    try:
        ciphertexts = [] if baseline else fetch_ciphertexts(target, port)
        if baseline:  # the baseline ignores bodies; any well-formed ciphertext will do
            ciphertexts = [{"ciphertext": "AAAA", "initializationVector": "AAAAAAAAAAAAAAAA", "authenticationTag": "AAAAAAAAAAAAAAAAAAAAAA==", "ciphertextMetadata": "AQAAAAE="}]
        result: dict[str, Any] = {}
        peak: list[float] = []
        for op in ("encrypt", "decrypt", "metadata"):
            sampler_stop = threading.Event()

            def sample() -> None:
                while not sampler_stop.wait(0.5):
                    now = rss_mb(proc.pid)
                    peak[:] = [max(a, b) for a, b in zip(peak, now)] if peak and len(now) == len(peak) else now or peak

            sampler = threading.Thread(target=sample)
            sampler.start()
            result[op] = run_wrk(port, target.requests(port, op, ciphertexts), args.duration, args.connections, workdir)
            sampler_stop.set()
            sampler.join()
        result["rss_mb_per_worker"] = peak
        if not baseline and workers == args.open_loop_workers:
            reqs = workdir / "open.json"
            reqs.write_text(json.dumps(target.requests(port, "encrypt", ciphertexts)))
            out = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--requests", str(reqs),
                 "--rate", str(args.rate), "--duration", str(args.duration)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result["open_loop_encrypt"] = json.loads(out.stdout)
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def table(results: dict[str, Any]) -> str:
    rows = ["| backend | workers | op | req/s | ratio to baseline | p50 ms | p99 ms | p99.9 ms | errors | RSS MB/worker | wrk CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for backend, by_workers in results["runs"].items():
        for workers, res in by_workers.items():
            base = results["baseline"][workers]
            for op in ("encrypt", "decrypt", "metadata"):
                r = res[op]
                ratio = r["rps"] / base[op]["rps"] if base[op]["rps"] else float("nan")
                rows.append(
                    f"| {backend} | {workers} | {op} | {r['rps']:.0f} | {ratio:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{r['p999_ms']:.2f} | {r['errors']} | {max(res['rss_mb_per_worker'] or [0]):.0f} | {r['loadgen_cpu_percent']:.0f} |"
                )
    for workers, base in results["baseline"].items():
        rows.append(f"| baseline | {workers} | encrypt | {base['encrypt']['rps']:.0f} | 1.00 | {base['encrypt']['p50_ms']:.2f} | "
                    f"{base['encrypt']['p99_ms']:.2f} | {base['encrypt']['p999_ms']:.2f} | {base['encrypt']['errors']} | "
                    f"{max(base['rss_mb_per_worker'] or [0]):.0f} | {base['encrypt']['loadgen_cpu_percent']:.0f} |")  # fmt: skip
    lines = ["\n".join(rows), ""]
    for backend, by_workers in results["runs"].items():
        for workers, res in by_workers.items():
            if "open_loop_encrypt" in res:
                o = res["open_loop_encrypt"]
                lines.append(f"Open loop, {backend}, {workers} workers, Encrypt offered at {o['offered_rps']:.0f}/s: achieved "
                             f"{o['achieved_rps']:.0f}/s, p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms, "
                             f"p99.9 {o['p999_ms']:.2f} ms, errors {o['errors']}, generator CPU {o['loadgen_cpu_percent']:.0f}%")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument("--backends", default="vault", help="comma-separated: vault, pkcs11")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1800, help="open-loop offered rate")
    parser.add_argument("--open-loop-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    workers_list = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="xks-bench-") as tmp:
        workdir = Path(tmp)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "processor": _cpu_model()},  # fmt: skip
            "settings": vars(args),
            "baseline": {},
            "runs": {},
        }
        targets = {backend: Target(backend, workdir, env) for backend in args.backends.split(",")}
        for backend in targets:
            results["runs"][backend] = {}
        # Baseline and proxy back to back for each worker count, so both see the same machine.
        for workers in workers_list:
            print(f"measuring baseline with {workers} worker(s)...", file=sys.stderr, flush=True)
            first = next(iter(targets.values()))
            results["baseline"][str(workers)] = measure(first, workers, True, args, workdir)
            for backend, target in targets.items():
                print(f"measuring {backend} with {workers} worker(s)...", file=sys.stderr, flush=True)
                results["runs"][backend][str(workers)] = measure(target, workers, False, args, workdir)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "result.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (RESULTS / "table.md").write_text(text + "\n")
    print(text)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
