"""The conformance tester against a reference XKS server that can be told to misbehave.

A tester that passes a broken proxy is worse than none, so every fault of `tests/support/broken_xks.py`
must be caught, by exactly the checks that should catch it, with the KMS outcome KMS would
produce; and the well-behaved reference must pass everything. Most runs are in-process (fast);
the CLI module also runs as a real subprocess for the happy path and a failure, with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support import broken_xks
from tests.support import ROOT
from tests.support.broken_xks import SECRET, serve
from xks_proxy.conformance import add_arguments, tls
from xks_proxy.conformance.checks.latency import percentile
from xks_proxy.conformance.report import render_table
from xks_proxy.conformance.results import Report, Status
from xks_proxy.conformance.runner import run_checks
from xks_proxy.conformance.settings import SettingsError, from_args
from xks_proxy.conformance.validate import health_problems, metadata_problems

TLS_CODE = "XKS_PROXY_INVALID_TLS_CONFIGURATION"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def conformance(server: broken_xks.BrokenXks, *extra: str, probes: bool = True, burst: int = 8) -> Report:
    """Run the tester in-process against `server`, as the CLI would."""
    settings = from_args(parse(server.args(*extra, probes=probes, burst=burst)))
    return asyncio.run(run_checks(settings))


def failures(report: Report) -> dict[str, str]:
    return {r.id: r.kms.code for r in report.results if r.status is Status.FAIL}


def statuses(report: Report) -> dict[str, str]:
    return {r.id: r.status.value for r in report.results}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XKS_SECRET_ACCESS_KEY", None)
    return subprocess.run([sys.executable, "-m", "xks_proxy.conformance", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# --- the well-behaved reference passes everything ------------------------------------------------

EVERY_CHECK = {
    "config/uri-path", "config/credential", "config/key-id",
    "transport/https", "transport/port", "transport/reachable", "transport/tls-version", "transport/tls-cipher",
    "transport/cert-chain", "transport/cert-expiry", "transport/cert-name",
    "connection/health-create", "connection/health-connect", "connection/health-periodic", "connection/ekm-fleet",
    "connection/unknown-operation", "connection/unknown-fields", "key/metadata",
    "crypto/roundtrip-no-aad", "crypto/roundtrip-aad", "crypto/roundtrip-large-aad", "crypto/encoding",
    "crypto/ciphertext", "crypto/iv", "crypto/tag", "crypto/metadata", "crypto/cdiv", "crypto/iv-unique",
    *(f"crypto/tamper-{n}" for n in ("ciphertext", "iv", "tag", "aad", "aad-removed", "metadata", "metadata-removed")),
    *(f"errors/{n}" for n in ("wrong-secret", "unknown-access-key", "clock-skew", "wrong-region", "wrong-service",
                              "unknown-key", "unknown-prefix", "unknown-operation", "error-bodies")),
    *(f"errors/malformed-{n}" for n in ("not-json", "not-object", "no-request-metadata", "empty-request-metadata",
                                        "missing-plaintext", "bad-base64", "wrong-type", "bad-algorithm",
                                        "bad-cdiv-algorithm", "missing-iv", "content-type")),
    "probes/encrypt-only-encrypt", "probes/encrypt-only-decrypt", "probes/encrypt-only-cdiv",
    "probes/decrypt-only-encrypt", "probes/no-usage-encrypt", "probes/no-usage-decrypt",
    "probes/disabled-metadata", "probes/disabled-encrypt", "probes/disabled-decrypt", "latency/burst",
}


def test_reference_server_passes_every_check() -> None:
    with serve() as server:
        report = conformance(server)
    got = statuses(report)
    assert set(got) == EVERY_CHECK
    # The only non-PASS: the fixture cannot listen on 443, and the tester says so.
    assert {k: v for k, v in got.items() if v != "PASS"} == {"transport/port": "WARN"}
    assert not report.failed and not report.notes
    assert report.latency and report.latency["calls"] == 8 and report.latency["failed"] == 0


def test_reference_server_over_plain_http_with_allow_http() -> None:
    with serve(tls=None) as server:
        report = conformance(server, "--only", "transport,connection,crypto")
    got = statuses(report)
    assert got["transport/https"] == "WARN" and got["transport/tls-version"] == "SKIP"
    assert not report.failed
    assert all(v == "PASS" for k, v in got.items() if k.startswith(("connection/", "crypto/")))


# --- subprocess: the CLI module, happy path and a failure, with --json ----------------------------


def test_cli_subprocess_passes_reference_with_json() -> None:
    with serve() as server:
        done = cli(*server.args("--json", burst=6))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True and report["summary"]["fail"] == 0
    assert {c["id"] for c in report["checks"]} == EVERY_CHECK
    assert all({"expected", "actual", "kms_code", "kms_outcome"} <= set(c) for c in report["checks"])
    assert SECRET not in done.stdout + done.stderr


def test_cli_subprocess_reports_failure_with_json_and_exit_status() -> None:
    with serve({"ignore-aad"}) as server:
        args = server.args("--json", "--only", "crypto", burst=0)
        # Give the secret on the command line too: it must still never be printed.
        done = cli(*args, "--access-key-id", broken_xks.ACCESS_KEY_ID, "--secret-access-key", SECRET)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    failed = {c["id"]: c for c in report["checks"] if c["status"] == "FAIL"}
    assert set(failed) == {"crypto/tamper-aad", "crypto/tamper-aad-removed"}
    assert failed["crypto/tamper-aad"]["kms_code"] == "ACCEPTS_TAMPERED_CIPHERTEXT"
    assert failed["crypto/tamper-aad"]["expected"] == "HTTP 400 InvalidCiphertextException"
    assert "HTTP 200" in failed["crypto/tamper-aad"]["actual"]
    assert SECRET not in done.stdout + done.stderr


def test_cli_subprocess_table_has_no_colour_when_piped() -> None:
    with serve({"all-unavailable"}) as server:
        done = cli(*server.args("--only", "connection", burst=0))
    assert done.returncode == 1
    assert "\033[" not in done.stdout
    assert "FAIL  connection/health-connect" in done.stdout and "XKS_PROXY_NOT_REACHABLE" in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_cli_usage_errors_exit_2_without_echoing_the_secret() -> None:
    done = cli("--endpoint", "https://localhost:1", "--key-id", "k", "--secret-access-key", SECRET)
    assert done.returncode == 2
    assert "--uri-path" in done.stderr and "--access-key-id" in done.stderr
    assert SECRET not in done.stdout + done.stderr


# --- every fault caught by exactly the right checks, with the right KMS outcome ---------------------

AUTH_CHECKS = ("wrong-secret", "unknown-access-key", "clock-skew", "wrong-region", "wrong-service")
TAMPER = "ACCEPTS_TAMPERED_CIPHERTEXT"

FAULT_CASES = {
    "wrong-status": ("errors", {
        **{f"errors/{n}": "XKS_PROXY_INVALID_RESPONSE" for n in AUTH_CHECKS},
        "errors/unknown-key": "KMSInternalException",
        "errors/unknown-prefix": "XKS_PROXY_INVALID_RESPONSE",
        "errors/unknown-operation": "XKS_PROXY_INVALID_RESPONSE",
        "errors/error-bodies": "XKS_PROXY_INVALID_RESPONSE"}),
    "health-missing-fields": ("connection", {
        f"connection/health-{n}": "XKS_PROXY_INVALID_RESPONSE" for n in ("create", "connect", "periodic")}),
    "all-unavailable": ("connection", {
        f"connection/health-{n}": "XKS_PROXY_NOT_REACHABLE" for n in ("create", "connect", "periodic")}),
    "zero-iv": ("crypto", {"crypto/iv": "KMSInvalidStateException", "crypto/iv-unique": "IV_REUSE"}),
    "bad-cdiv": ("crypto", {"crypto/cdiv": "KMSInvalidStateException"}),
    "ignore-aad": ("crypto", {"crypto/tamper-aad": TAMPER, "crypto/tamper-aad-removed": TAMPER}),
    "ignore-metadata": ("crypto", {"crypto/tamper-metadata": TAMPER, "crypto/tamper-metadata-removed": TAMPER}),
    "long-metadata": ("crypto", {"crypto/metadata": "KMSInvalidStateException"}),
    "no-auth": ("errors", {f"errors/{n}": "ACCEPTS_UNAUTHENTICATED_REQUESTS" for n in AUTH_CHECKS}),
    "wrong-key-spec": ("key", {"key/metadata": "XksKeyInvalidConfigurationException"}),
    "ignore-usage": ("probes", {
        "probes/encrypt-only-decrypt": "ACCEPTS_FORBIDDEN_OPERATION",
        "probes/encrypt-only-cdiv": "ACCEPTS_FORBIDDEN_OPERATION",
        "probes/decrypt-only-encrypt": "ACCEPTS_FORBIDDEN_OPERATION",
        "probes/no-usage-encrypt": "ACCEPTS_FORBIDDEN_OPERATION",
        # Usage unchecked, the dummy ciphertext then fails authentication: still the wrong answer.
        "probes/no-usage-decrypt": "InvalidCiphertextException"}),
    "accept-malformed": ("errors", {
        **{f"errors/malformed-{n}": "ACCEPTS_MALFORMED_REQUESTS" for n in (
            "not-json", "not-object", "no-request-metadata", "empty-request-metadata", "missing-plaintext",
            "bad-base64", "wrong-type", "bad-algorithm", "bad-cdiv-algorithm")},
        "errors/malformed-missing-iv": "InvalidCiphertextException"}),
}


@pytest.mark.parametrize("fault", sorted(FAULT_CASES))
def test_fault_is_caught_named_and_mapped(fault: str) -> None:
    category, expected = FAULT_CASES[fault]
    with serve({fault}) as server:
        report = conformance(server, "--only", category, burst=0)
    assert failures(report) == expected
    assert report.failed


def test_error_body_fault_fails_every_error_check() -> None:
    with serve({"error-body"}) as server:
        report = conformance(server, "--only", "errors", burst=0)
    failed = failures(report)
    assert failed["errors/error-bodies"] == "XKS_PROXY_INVALID_RESPONSE"
    assert failed["errors/wrong-secret"] == "XKS_PROXY_INVALID_RESPONSE"
    assert failed["errors/unknown-key"] == "KMSInternalException"
    bodies = report.find("errors/error-bodies")
    assert bodies and "several lines" in bodies.actual and "printable ASCII" in bodies.actual
    # Advisory checks only warn, even when broken.
    assert statuses(report)["errors/malformed-content-type"] == "WARN"


def test_slow_answers_time_out_the_connection_and_the_burst() -> None:
    with serve({"slow"}) as server:
        report = conformance(server, "--only", "connection,latency", burst=4)
    failed = failures(report)
    for step in ("create", "connect", "periodic"):
        assert failed[f"connection/health-{step}"] == "XKS_PROXY_TIMED_OUT"
    assert failed["latency/burst"] == "XKS_PROXY_TIMED_OUT"
    health = report.find("connection/health-connect")
    assert health and "retried" in health.actual  # KMS retries once; so does the tester
    assert "XksProxyUriUnreachableException" in report.find("connection/health-create").kms.text  # type: ignore[union-attr]
    assert report.latency and report.latency["p99_ms"] > 250


# --- transport faults ----------------------------------------------------------------------------------

TLS_CASES = {
    "expired": {"transport/cert-expiry"},
    "wrong-name": {"transport/cert-name"},
    "untrusted": {"transport/cert-chain"},
    "weak-cipher": {"transport/tls-cipher"},
    # With TLS 1.1 available locally the fixture offers only TLS 1.1; otherwise it falls back to
    # the weak-cipher server (see broken_xks.Certificates.server_context).
    "tls11": {"transport/tls-version", "transport/tls-cipher"} if broken_xks.tls11_available() else {"transport/tls-cipher"},
}


@pytest.mark.parametrize("mode", sorted(TLS_CASES))
def test_tls_fault_is_caught_as_invalid_tls_configuration(mode: str) -> None:
    with serve(tls=mode) as server:
        report = conformance(server, "--only", "transport,connection", burst=0)
    assert failures(report) == {check: TLS_CODE for check in TLS_CASES[mode]}
    if mode in ("expired", "wrong-name", "untrusted"):
        # KMS would refuse the certificate, but the API is still checked for the operator.
        assert report.notes and "without certificate verification" in report.notes[0]
        assert statuses(report)["connection/health-connect"] == "PASS"
    if mode == "tls11" and broken_xks.tls11_available():
        assert statuses(report)["connection/not-run"] == "SKIP"
        assert "offered: TLS 1.1" in report.find("transport/tls-version").actual  # type: ignore[union-attr]
    if mode == "expired":
        assert "expired 3 days ago" in report.find("transport/cert-expiry").actual  # type: ignore[union-attr]


def test_plain_http_is_refused_as_kms_refuses_it() -> None:
    with serve(tls=None) as server:
        argv = [a for a in server.args(burst=0) if a != "--allow-http"]
        report = asyncio.run(run_checks(from_args(parse(argv))))
    assert failures(report) == {"transport/https": "ValidationException"}
    assert statuses(report)["connection/not-run"] == "SKIP"


def test_unreachable_proxy() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with serve() as server:
        argv = server.args(burst=0)
        argv[argv.index("--endpoint") + 1] = f"https://127.0.0.1:{port}"
        report = asyncio.run(run_checks(from_args(parse(argv))))
    assert failures(report) == {"transport/reachable": "XKS_PROXY_NOT_REACHABLE"}


def test_tls13_clienthello_probe_learns_the_suite() -> None:
    with serve() as server:
        chosen = asyncio.run(tls.tls13_suite("127.0.0.1", server.port, 3.0))
        refused = asyncio.run(tls.tls13_suite("127.0.0.1", server.port, 3.0, suites=[0x1304]))  # AES_128_CCM_SHA256
    assert chosen in tls.KMS_TLS13_SUITES
    assert refused is None


# --- small pieces -----------------------------------------------------------------------------------------


def test_name_matching_follows_rfc_6125() -> None:
    assert tls.name_matches("xks.example.com", ["*.example.com"])
    assert not tls.name_matches("a.b.example.com", ["*.example.com"])
    assert not tls.name_matches("example.com", ["*.example.com"])
    assert tls.name_matches("XKS.Example.com", ["xks.example.com"])
    assert tls.name_matches("127.0.0.1", ["localhost", "127.0.0.1"])
    assert not tls.name_matches("127.0.0.2", ["127.0.0.1"])


def test_health_validation_is_strict_about_types_and_ranges() -> None:
    good = {"xksProxyFleetSize": 1, "xksProxyVendor": "v", "xksProxyModel": "m", "ekmVendor": "e",
            "ekmFleetDetails": [{"id": "1", "model": "m", "healthStatus": "ACTIVE"}]}
    assert health_problems(good) == []
    assert health_problems({**good, "xksProxyFleetSize": True})
    assert health_problems({**good, "xksProxyFleetSize": 0})
    assert health_problems({**good, "ekmFleetDetails": []})
    assert health_problems({**good, "ekmFleetDetails": good["ekmFleetDetails"] * 11})
    assert health_problems({**good, "ekmFleetDetails": [{"id": "1", "model": "m", "healthStatus": "OK"}]})
    assert metadata_problems({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"] * 6, "keyStatus": "ENABLED"})[0]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0


def test_config_file_supplies_path_and_credential_and_hides_the_secret(tmp_path: Path) -> None:
    config = tmp_path / "proxy-config.json"
    config.write_text(json.dumps({"XksProxyUriPath": "/p/kms/xks/v1", "XksProxyAuthenticationCredential":
                                  {"AccessKeyId": "A" * 20, "RawSecretAccessKey": SECRET}}))
    settings = from_args(parse(["--endpoint", "https://xks.example.com", "--config", str(config), "--key-id", "k"]))
    assert (settings.uri_path, settings.host_header, settings.port) == ("/p/kms/xks/v1", "xks.example.com", 443)
    assert settings.credential.secret == SECRET and SECRET not in repr(settings)
    with pytest.raises(SettingsError):
        from_args(parse(["--endpoint", "https://h/some/path", "--config", str(config), "--key-id", "k"]))


def test_table_colours_only_when_asked() -> None:
    with serve() as server:
        report = conformance(server, "--only", "config", burst=0)
    assert "\033[32mPASS" in render_table(report, colour=True)
    assert "\033[" not in render_table(report, colour=False)
    assert SECRET not in render_table(report) + json.dumps(report.as_dict())


# --- our own proxy, as a real `xks-proxy serve` process -------------------------------------------------


def _xks_proxy(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"xks-proxy {args[0]}: {done.stderr}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    for _ in range(400):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "serve exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("xks-proxy serve did not start listening")


@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
def test_our_proxy_passes_conformance(tmp_path: Path, https: bool) -> None:
    """`xks-proxy init` + `serve`, then `xks-proxy conformance` through the real CLI, with every probe."""
    home, port = tmp_path / "home", _free_port()
    _xks_proxy("init", "--seal", "file", "--home", str(home), "--port", str(port))
    for key, usage in (("good", "ENCRYPT,DECRYPT"), ("enc", "ENCRYPT"), ("dec", "DECRYPT"), ("none", ""), ("dis", "ENCRYPT,DECRYPT")):
        _xks_proxy("keys", "create", key, "--usage", usage, "--home", str(home))
    _xks_proxy("keys", "disable", "dis", "--home", str(home))
    config = tmp_path / "proxy-config.json"
    config.write_text(_xks_proxy("stores", "export", "--home", str(home)))
    secret = json.loads(config.read_text())["XksProxyAuthenticationCredential"]["RawSecretAccessKey"]
    serve_args = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home)] + ([] if https else ["--http"])
    proc = subprocess.Popen(serve_args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_listening(port, proc)
        tls_args = ["--ca-bundle", str(home / "tls" / "ca.pem")] if https else ["--allow-http"]
        done = subprocess.run(
            [sys.executable, "-m", "xks_proxy.cli", "conformance", "--endpoint", f"{'https' if https else 'http'}://localhost:{port}",
             "--config", str(config), "--key-id", "good", "--encrypt-only-key", "enc", "--decrypt-only-key", "dec",
             "--no-usage-key", "none", "--disabled-key", "dis", "--burst", "20", "--concurrency", "4", "--json", *tls_args],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    report = json.loads(done.stdout)
    not_passed = {c["id"]: f"{c['status']}: {c['actual']}" for c in report["checks"] if c["status"] != "PASS"}
    allowed = {"transport/port"} | (set() if https else {"transport/https", "transport/tls-version", "transport/tls-cipher",
                                                         "transport/cert-chain", "transport/cert-expiry", "transport/cert-name"})
    assert set(not_passed) <= allowed, not_passed
    assert done.returncode == 0 and report["passed"] is True
    assert {c["id"] for c in report["checks"]} >= EVERY_CHECK - allowed
    assert secret not in done.stdout + done.stderr


def test_client_certificate_options_against_our_mtls_proxy(tmp_path: Path) -> None:
    """--client-cert/--client-key: our proxy requiring mutual TLS passes with KMS's certificate, fails without."""
    from tests.support.proxy import Pki, edit_config

    home, port = tmp_path / "home", _free_port()
    _xks_proxy("init", "--seal", "file", "--home", str(home), "--port", str(port))
    _xks_proxy("keys", "create", "good", "--home", str(home))
    pki = Pki(home)
    edit_config(home, pki.configure)
    (tmp_path / "kms.pem").write_bytes(pki.kms.cert_pem)
    (tmp_path / "kms.key").write_bytes(pki.kms.key_pem)
    (tmp_path / "server-ca.pem").write_bytes(pki.server_ca.pem)
    config = tmp_path / "proxy-config.json"
    config.write_text(_xks_proxy("stores", "export", "--home", str(home)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home), "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    base = [sys.executable, "-m", "xks_proxy.cli", "conformance", "--endpoint", f"https://localhost:{port}",
            "--config", str(config), "--key-id", "good", "--burst", "5", "--json", "--ca-bundle", str(tmp_path / "server-ca.pem")]  # fmt: skip
    try:
        _wait_listening(port, proc)
        with_cert = subprocess.run(base + ["--client-cert", str(tmp_path / "kms.pem"), "--client-key", str(tmp_path / "kms.key")],
                                   cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        without = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    report = json.loads(with_cert.stdout)
    failed = {c["id"]: c["actual"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed == {}, failed  # (warnings: port not 443; the tests' short-lived certificate)
    assert with_cert.returncode == 0 and report["passed"] is True
    refused = json.loads(without.stdout)
    assert without.returncode == 1 and refused["passed"] is False
    assert any(c["status"] == "FAIL" and c["id"].startswith(("connection/", "transport/")) for c in refused["checks"])


# --- a failing check shows the proxy's own error and hints at the cause (issue 15) ----------------------

HEALTH, AUTH = "connection/health-create", "AuthenticationFailedException"
#: A wrong setting, the first check it fails, what our proxy answers (errorName, words of its errorMessage), the hint.
WRONG_SETTINGS = {
    "region": (["--region", "eu-west-3"], HEALTH, AUTH, "region", "HINT_REGION"),
    "clock": (["--clock-offset", "900"], HEALTH, AUTH, "request time", "HINT_CLOCK"),
    "secret": (["--secret-access-key", "W" * 43], HEALTH, AUTH, "signature", "HINT_SECRET"),
    "access key": (["--access-key-id", "XKSCONFAAAAAAAAAAAAA"], HEALTH, AUTH, "not known", "HINT_ACCESS_KEY"),
    "path": (["--uri-path", "/no-such-prefix/kms/xks/v1"], HEALTH, "InvalidUriPathException", "no XKS API", "HINT_PATH"),
    "key": (["--key-id", "no-such-key"], "key/metadata", "KeyNotFoundException", "no-such-key", "HINT_KEY"),
}


@pytest.mark.vault_only
def test_failures_show_the_proxy_error_and_a_hint_for_each_wrong_setting(
    home: Any, served_proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wrong setting, caused for real against `xks-proxy serve`: the error KMS would get, its message, the hint.

    The right settings first: every check passes and none carries a proxy error or a hint.
    """
    from xks_proxy.conformance import diagnosis

    config = tmp_path / "proxy-config.json"
    config.write_text(_xks_proxy("stores", "export", "--home", str(home.path)))
    base = ["--endpoint", served_proxy.endpoint, "--ca-bundle", str(served_proxy.ca), "--config", str(config),
            "--key-id", "foo", "--only", "connection,key", "--burst", "0", "--json"]  # fmt: skip
    right = cli(*base)
    assert right.returncode == 0, right.stdout + right.stderr
    assert all(c["proxy_error"] is None and c["hint"] is None for c in json.loads(right.stdout)["checks"])
    with ThreadPoolExecutor(max_workers=3) as pool:  # each run is its own subprocess
        runs = dict(zip(WRONG_SETTINGS, pool.map(lambda setting: cli(*base, *setting[0]), WRONG_SETTINGS.values())))
    for name, (wrong, check_id, error_name, words, hint_name) in WRONG_SETTINGS.items():
        done = runs[name]
        assert done.returncode == 1, f"{name}: {done.stderr}"
        checks = {c["id"]: c for c in json.loads(done.stdout)["checks"]}
        failed = checks[check_id]
        assert failed["status"] == "FAIL", (name, failed)
        assert failed["proxy_error"]["errorName"] == error_name, (name, failed)
        assert words in failed["proxy_error"]["errorMessage"], (name, failed)
        assert failed["hint"] == getattr(diagnosis, hint_name), (name, failed)
        assert checks["key/metadata"]["hint"] == failed["hint"]
        assert home.secret not in done.stdout + done.stderr
    monkeypatch.setenv("COLUMNS", "1000")  # the table's GOT cell holds the whole message on one line
    table = cli(*[a for a in base if a != "--json"], "--region", "eu-west-3")
    assert "which this store does not serve" in table.stdout and f"): {diagnosis.HINT_REGION}" in table.stdout
    assert table.stdout.count(diagnosis.HINT_REGION) == 1  # one hint line for every check it explains


def test_hints_come_from_status_name_and_message_alone() -> None:
    """Another proxy's wording: the hint falls back to every suspect of a refused signature; 404 is the path."""
    from xks_proxy.conformance.diagnosis import HINT_KEY, HINT_PATH, HINT_SIGNATURE, hint

    assert hint(401, "AuthenticationFailedException", "Unauthorized") == HINT_SIGNATURE
    assert hint(404, "", "") == HINT_PATH
    assert hint(404, "KeyNotFoundException", "no such key") == HINT_KEY
    assert hint(400, "ValidationException", "bad plaintext") is None
