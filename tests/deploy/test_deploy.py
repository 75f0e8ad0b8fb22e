"""What ships around the code: the quick start's demo, the dev-cert script, the compose file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from pathlib import Path

import yaml
from cryptography import x509

from tests.support import ROOT
from tests.conftest import metadata, need
from tests.cli.test_cli import _signed_post, _wait_listening, free_port



def test_demo_prints_how_to_call_it_and_serves_key_foo(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xks_proxy.cli", "demo", "--home", str(tmp_path / "demo"), "--port", str(port), "--http"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(port, proc)
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(6)]
        text = "".join(lines)
        akid = re.search(r"access key id:\s+(\S+)", text)[1]  # type: ignore[index]
        secret = re.search(r"secret access key:\s+(\S+)", text)[1]  # type: ignore[index]
        assert f"http://localhost:{port}" in text and "/demo/kms/xks/v1" in text
        cred = {"AccessKeyId": akid, "RawSecretAccessKey": secret}
        status, body = _signed_post(
            f"http://localhost:{port}", "/demo/kms/xks/v1/keys/foo/metadata", {"requestMetadata": metadata("CreateKey")},
            cred, "us-east-1", None,
        )  # fmt: skip
        assert (status, body["keyStatus"]) == (200, "ENABLED")
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_make_dev_certs_script(tmp_path: Path) -> None:
    need("openssl")
    subprocess.run([str(ROOT / "certs" / "make-dev-certs.sh"), str(tmp_path), "xks.test", "alt.test"], check=True, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "server.pem"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    leaf = x509.load_pem_x509_certificates((tmp_path / "server.pem").read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["xks.test", "alt.test"]
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0


def test_compose_file_is_right_on_paper() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
            assert dockerfile.is_file(), name
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{dockerfile}: COPY {source} does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith(".") or source.startswith("/"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} is not declared"
        for script in _scripts_run_by(service):
            assert _host_path(service, script).is_file(), f"{name}: runs {script}, which no bind mount provides"
        for other in service.get("depends_on", {}):
            assert other in compose["services"], f"{name}: depends on unknown service {other}"
            assert not set(compose["services"][other].get("profiles", [])) - set(service.get("profiles", [])), (
                f"{name} depends on {other}, which its profiles do not start"
            )


def _scripts_run_by(service: dict) -> list[str]:
    command = (service.get("entrypoint") or []) + (service.get("command") or [])
    return [part for part in command if part.startswith("/deploy/")]


def _host_path(service: dict, container_path: str) -> Path:
    """The file a bind mount puts at `container_path` in the service's container."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (container_path + "/").startswith(target.rstrip("/") + "/"):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    return ROOT / "no-such-file"


def test_compose_fleet_profile() -> None:
    """The default `docker compose up` is still one proxy; the fleet is PostgreSQL, >= 2 proxies, HAProxy."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert [name for name, s in services.items() if "profiles" not in s] == ["xks-proxy"]
    fleet = {name: s for name, s in services.items() if "fleet" in s.get("profiles", [])}
    proxies = [name for name, s in fleet.items() if "/deploy/fleet/proxy.sh" in _scripts_run_by(s)]
    assert len(proxies) >= 2 and fleet["postgres"]["image"].startswith("postgres:")
    haproxy = fleet["haproxy"]
    assert set(haproxy["depends_on"]) == set(proxies)
    config = _host_path(haproxy, "/usr/local/etc/haproxy/haproxy.cfg").read_text()
    used = set(re.findall(r"\$\{(\w+)\}", config))
    assert used <= set(haproxy["environment"]), f"haproxy.cfg uses {used - set(haproxy['environment'])} unset"
    upstreams = {v for k, v in haproxy["environment"].items() if k.startswith("XKS_UPSTREAM_")}
    assert upstreams == {f"{services[p]['hostname']}:8080" for p in proxies}
    assert "option httpchk GET /ping" in config and "ssl crt" in config
    assert not re.search(r"(?im)^\s*http-request\s+(set|del|replace)-header\s+host\b", config)  # SigV4 signs Host


def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    """`haproxy -c` on deploy/haproxy.cfg, with the environment run-local.sh gives it."""
    from xks_proxy.devtls import make_dev_certs

    haproxy = need("haproxy")
    make_dev_certs(tmp_path)
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes((tmp_path / "server.pem").read_bytes() + (tmp_path / "server.key").read_bytes())
    env = dict(os.environ, XKS_TLS_PEM=str(pem), XKS_HTTPS_ADDR="127.0.0.1", XKS_HTTPS_PORT="8443", XKS_UPSTREAM_1="127.0.0.1:9001", XKS_UPSTREAM_2="127.0.0.1:9002")
    checked = subprocess.run([haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_fleet_scripts_parse() -> None:
    for script in sorted((ROOT / "deploy" / "fleet").glob("*.sh")):
        shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
        assert os.access(script, os.X_OK), f"{script} is not executable"
        checked = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script}: {checked.stderr}"

