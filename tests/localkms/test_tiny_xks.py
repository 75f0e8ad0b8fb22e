"""tiny_xks, the independent XKS proxy of the tests, is spec-compliant: our conformance tester passes it.

That is what makes "the local KMS works with any spec-compliant proxy" mean something: tiny_xks
is written only from the protocol notes, shares no code with xks_proxy, and passes the checks a
compliant proxy passes (over HTTPS and plain HTTP, in-process and as a program).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.tiny_xks import BOTH, TinyXks, bound_aad
from xks_proxy.conformance import add_arguments
from xks_proxy.conformance.results import Status
from xks_proxy.conformance.runner import run_checks
from xks_proxy.conformance.settings import from_args

PROBE_KEYS = {"good": BOTH, "enc": ("ENCRYPT",), "dec": ("DECRYPT",), "none": (), "dis": BOTH}
PROBE_ARGS = ["--key-id", "good", "--encrypt-only-key", "enc", "--decrypt-only-key", "dec", "--no-usage-key", "none",
              "--disabled-key", "dis"]  # fmt: skip
TLS_CHECKS = {"transport/tls-version", "transport/tls-cipher", "transport/cert-chain", "transport/cert-expiry", "transport/cert-name"}


def _conformance(tiny: TinyXks, tmp: Path, *extra: str) -> dict[str, tuple[str, str]]:
    config = tmp / "proxy-config.json"
    config.write_text(json.dumps(tiny.proxy_config()))
    tls = ["--ca-bundle", str(tiny.ca_path)] if tiny.ca_path else ["--allow-http"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--endpoint", tiny.endpoint, "--config", str(config), "--burst", "10", "--concurrency", "4",
                              "--timeout", "3", *PROBE_ARGS, *tls, *extra])  # fmt: skip
    report = asyncio.run(run_checks(from_args(args)))
    return {r.id: (r.status.value, r.actual) for r in report.results}


@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
def test_tiny_xks_passes_conformance(tmp_path: Path, https: bool) -> None:
    tiny = TinyXks(keys=dict(PROBE_KEYS), disabled={"dis"}, tls_dir=tmp_path / "tls" if https else None)
    with tiny.running():
        got = _conformance(tiny, tmp_path)
    not_passed = {k: v for k, v in got.items() if v[0] != Status.PASS.value}
    allowed = {"transport/port"} | (set() if https else {"transport/https"} | TLS_CHECKS)
    assert set(not_passed) <= allowed, not_passed
    assert not any(v[0] == Status.FAIL.value for v in got.values()), not_passed
    assert len(got) > 50 and tiny.seen  # every category ran and reached the key store


def test_tiny_xks_switches_are_seen_by_the_tester(tmp_path: Path) -> None:
    """The switches tests flip: a disabled key, an answer delay, an error on every call."""
    tiny = TinyXks(keys=dict(PROBE_KEYS), disabled={"dis", "good"})
    with tiny.running():
        disabled = _conformance(tiny, tmp_path, "--only", "key")
        tiny.disabled.discard("good")
        tiny.delay = 0.3
        slow = _conformance(tiny, tmp_path, "--only", "latency", "--burst", "3", "--concurrency", "1")
        tiny.delay, tiny.fail_with = 0.0, "ThrottlingException"
        failing = _conformance(tiny, tmp_path, "--only", "connection")
    assert disabled["key/metadata"][0] == "FAIL" and "DISABLED" in disabled["key/metadata"][1]
    assert slow["latency/burst"][0] in ("FAIL", "WARN"), slow
    assert failing["connection/health-connect"][0] == "FAIL" and "ThrottlingException" in failing["connection/health-connect"][1]


def test_aad_binding_is_the_spec_construction() -> None:
    assert bound_aad(None, None) == b"\x00\x00\x00"
    assert bound_aad(b"", b"m")[:2] == b"\x00\x00" and len(bound_aad(b"", b"m")) == 2 + 32 + 1 + 1
    assert bound_aad(b"ab", None)[:2] == b"\x00\x02"


def test_tiny_xks_runs_as_a_program(tmp_path: Path) -> None:
    """`python -m tests.support.tiny_xks` prints its endpoint and proxy configuration, then serves."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.tiny_xks", "--tls", str(tmp_path / "tls"), "--key", "good",
                             "--key", "enc:ENCRYPT", "--key", "dec:DECRYPT", "--key", "none:", "--key", "dis",
                             "--disabled", "dis"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        config = tmp_path / "proxy-config.json"
        config.write_text(json.dumps({k: v for k, v in line.items() if k != "endpoint"}))
        done = subprocess.run([sys.executable, "-m", "xks_proxy.conformance", "--endpoint", line["endpoint"], "--config",
                               str(config), "--ca-bundle", str(tmp_path / "tls" / "ca.pem"), "--burst", "5", "--json",
                               *PROBE_ARGS], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    report = json.loads(done.stdout)
    failed = {c["id"]: c["actual"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed == {} and done.returncode == 0 and report["passed"] is True
