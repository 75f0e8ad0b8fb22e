"""`xks-proxy demo --with-kms`: the `aws kms encrypt` line it prints works as printed (run by bash).

The local KMS principal's secret shows only in those printed lines: in no file under the demo home.

The demo serves our proxy, starts the local KMS beside it, connects a custom key store to the
demo store and creates a KMS key for xks key `foo`; the printed lines go aws CLI → local KMS →
proxy → vault and back. Stopping the demo stops the local KMS too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT
from tests.support.localkms import free_port, listening, redact, wait_until


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "XKS_"))}
    return {**env, "PYTHONPATH": str(ROOT), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def test_demo_with_kms_prints_an_aws_line_that_works(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "xks_proxy.cli", "demo", "--with-kms", "--home", str(tmp_path / "home"),
            "--port", str(free_port()), "--workers", "1"]  # fmt: skip
    with log.open("wb") as out:
        demo = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=_clean_env(), start_new_session=True)

    def shown() -> str:
        return redact(log.read_text(errors="replace"))

    def printed(verb: str) -> str | None:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        return next((line for line in lines if line.startswith("AWS_ACCESS_KEY_ID=") and f" kms {verb} " in line), None)

    kms_port, kms_left = 0, False
    try:
        encrypt = wait_until(lambda: printed("encrypt") or demo.poll() is not None, 60, "the aws kms encrypt line", shown)
        assert demo.poll() is None and isinstance(encrypt, str), f"demo exited ({demo.returncode}):\n{shown()}"
        kms_port = int(re.search(r"--endpoint-url http://127\.0\.0\.1:(\d+)", encrypt)[1])  # type: ignore[index]

        done = subprocess.run(["bash", "-c", encrypt], capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path)
        assert done.returncode == 0, f"the printed encrypt line failed: {redact(done.stderr[-2000:])}"
        assert re.fullmatch(r"[A-Za-z0-9+/]{40,}={0,2}", done.stdout.strip()), "CiphertextBlob is base64"

        decrypt = printed("decrypt")
        assert decrypt is not None, shown()
        back = subprocess.run(["bash", "-c", decrypt], capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path)
        assert back.returncode == 0 and back.stdout == "hello\n", f"the printed decrypt line failed: {redact(back.stderr[-2000:])}"
        _assert_secret_only_on_the_terminal(encrypt, tmp_path / "home", log)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=30)
            kms_left = bool(kms_port) and not _closed(kms_port)
        finally:
            try:
                os.killpg(demo.pid, signal.SIGKILL)  # whatever of this demo's own session is still left
            except ProcessLookupError:
                pass
    assert demo.returncode == 0, shown()
    assert not kms_left, "the local KMS outlived the demo"


def _closed(port: int) -> bool:
    try:
        wait_until(lambda: not listening(port), 10, "the local KMS port closing")
        return True
    except AssertionError:
        return False


def _assert_secret_only_on_the_terminal(encrypt: str, home: Path, log: Path) -> None:
    """The local KMS principal's secret: in the printed aws lines, in no file under the demo home."""
    secret = re.search(r"AWS_SECRET_ACCESS_KEY=(\S+)", encrypt)[1].encode()  # type: ignore[index]
    files = [path for path in home.rglob("*") if path.is_file()]
    assert files and not [path for path in files if secret in path.read_bytes()], "the secret is in a file under the home"
    shown = log.read_bytes()
    assert b"aws_secret_access_key" not in shown, "the local KMS's own secret line is not passed on"
    assert shown.count(secret) == sum(line.count(secret) for line in shown.splitlines() if b" kms " in line), "only in the aws lines"
