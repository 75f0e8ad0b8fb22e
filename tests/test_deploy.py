"""What ships around the code: the quick start's demo, the dev-cert script, the compose file."""

from __future__ import annotations

import re
import subprocess
import sys

from pathlib import Path

import yaml
from cryptography import x509

from tests.conftest import metadata, need
from tests.test_cli import _signed_post, _wait_listening, free_port

ROOT = Path(__file__).resolve().parent.parent


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

