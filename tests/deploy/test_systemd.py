"""deploy/systemd/xks-proxy.service: a unit systemd itself accepts, hardened, reloadable.

systemd-analyze verify also checks that ExecStart's program exists, and /opt/xks-proxy is
not installed here: the unit is verified as a copy whose ExecStart names this checkout's real
xks-proxy, every other line unchanged.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Client, Home, need
from tests.deploy.test_fleet_haproxy import _members
from tests.support import ROOT
from tests.support.fleet import free_port
from tests.support.proxy import WORKTREE, eventually

UNIT = ROOT / "deploy" / "systemd" / "xks-proxy.service"
INSTALLED = "/opt/xks-proxy/bin/xks-proxy"

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "MemoryDenyWriteExecute": "yes",
    "LimitCORE": "0",
    "StateDirectory": "xks-proxy",
    "User": "xks-proxy",
    "CapabilityBoundingSet": "",
}


#: Run a program with the kernel's MDWE (PR_SET_MDWE, REFUSE_EXEC_GAIN: no memory both writable and
#: executable, kept across fork and exec), what MemoryDenyWriteExecute=yes enforces with seccomp.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE refused: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""
PR_GET_MDWE = 66


def _service_settings() -> dict[str, list[str]]:
    """The [Service] section's settings (a name set twice keeps both values, in order)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart naming this checkout's xks-proxy (which exists); nothing else changed."""
    real = shutil.which("xks-proxy", path=str(Path(sys.executable).parent))
    assert real is not None, "the venv has no xks-proxy script"
    shipped = f"ExecStart={INSTALLED} "
    text = UNIT.read_text()
    assert text.count(shipped) == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(shipped, f"ExecStart={real} "))
    return copy


def test_unit_is_hardened_and_reloads_with_sighup() -> None:
    settings = _service_settings()
    for name, value in HARDENING.items():
        assert settings.get(name) == [value], f"{name}={settings.get(name)}"
    assert settings["ExecStart"] == [f"{INSTALLED} serve --home /var/lib/xks-proxy"]
    # SIGHUP is the proxy's reload (process/reload.py): config.toml and the TLS files, every worker.
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The home is the state directory: the one place ProtectSystem=strict leaves writable.
    assert "XKS_PROXY_HOME=/var/lib/xks-proxy" in settings["Environment"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    done = subprocess.run([tool, "verify", str(_runnable_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # The unit as shipped differs only by a program this machine lacks: verify names exactly that.
    shipped = subprocess.run([tool, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert shipped.returncode != 0 and f"Command {INSTALLED} is not executable" in shipped.stderr


def test_security_exposure_is_low(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    done = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(_runnable_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    # systemd's scale: 0 most restricted, 10 none; below 2 is what it calls OK.
    assert float(match[1]) < 2.0, done.stdout


def _mdwe_supported() -> bool:
    """PR_GET_MDWE answers on Linux 6.3 and later."""
    return int(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0


def test_mdwe_wrapper_refuses_writable_executable_memory() -> None:
    """The stand-in is real: under it, a mapping both writable and executable is refused."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to stand in for MemoryDenyWriteExecute")
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    assert subprocess.run([sys.executable, "-c", wx], capture_output=True).returncode == 0
    refused = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", wx], capture_output=True, text=True)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr


@pytest.mark.vault_only
async def test_proxy_serves_under_memory_deny_write_execute(home: Home, tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is compatible: `serve --workers 2` (supervisor, sidecar, workers; Python,
    OpenSSL, the vault) answers HTTPS encrypt and decrypt with writable-executable memory refused."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to stand in for MemoryDenyWriteExecute")
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home.path), "--port", str(port), "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", MDWE_EXEC, *argv], stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(WORKTREE)), start_new_session=True,
        )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(home.path / "tls" / "ca.pem"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            client = Client(session, f"https://localhost:{port}", f"/{home.prefix}/kms/xks/v1", home.access_key_id, home.secret)

            async def serving() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return (await client.encrypt("foo", b"under MDWE"))[0] == 200
                except aiohttp.ClientError:
                    return False

            await eventually(serving, deadline=20, what="serve answering under MDWE")
            status, encrypted = await client.encrypt("foo", b"under MDWE")
            assert status == 200
            status, decrypted = await client.decrypt("foo", encrypted)
            assert status == 200 and decrypted["plaintext"] == "dW5kZXIgTURXRQ=="  # b"under MDWE"
        # Supervisor, sidecar and two workers, forked from the one process MDWE was set in (it is inherited).
        assert len(_members(proc.pid)) >= 4  # its own process group: start_new_session
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
