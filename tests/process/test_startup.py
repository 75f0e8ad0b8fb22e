"""Start-up failures as an operator meets them: `serve` and `demo` as real processes that cannot bind.

A port another process listens on, and an address that is not this machine's (192.0.2.1,
TEST-NET-1: the bind fails with EADDRNOTAVAIL without a packet sent). Each must be one line on
stderr, a non-zero exit, no traceback, and nothing before it that claims success: no
"serving" line, and for the demo no credentials, no curl line, and no home left behind.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.localkms import Process, free_port, wait_until
from tests.support.proxy import WORKTREE, cli

FOREIGN_ADDRESS = "192.0.2.1"


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A port another process (here: this one) listens on."""
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        yield occupant.getsockname()[1]


@pytest.fixture
def foreign_address() -> str:
    with socket.socket() as probe:
        try:
            probe.bind((FOREIGN_ADDRESS, 0))
        except OSError as exc:
            assert exc.errno == errno.EADDRNOTAVAIL
            return FOREIGN_ADDRESS
    pytest.skip(f"{FOREIGN_ADDRESS} is an address of this machine")


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI with its own TMPDIR, so a demo home it leaves behind would show there."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(WORKTREE), TMPDIR=str(tmp / "tmp"), XKS_PROXY_HOME=str(tmp / "home"), XDG_STATE_HOME=str(tmp / "state"))
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], where: str, why: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "", "nothing printed before the failure (no credentials, no curl line)"
    assert result.stderr.splitlines() == [f"xks-proxy: cannot listen on {where}: {why}"], result.stderr


WHY_IN_USE = "Address already in use (another process listens there)"
WHY_FOREIGN = "Cannot assign requested address (not an address of this machine)"


@pytest.mark.parametrize("workers", [1, 3])
def test_serve_on_a_port_in_use(tmp_path: Path, port_in_use: int, workers: int) -> None:
    assert cli(tmp_path / "home", "init", "--seal", "file").returncode == 0
    result = _run(["serve", "--port", str(port_in_use), "--workers", str(workers)], tmp_path)
    _assert_one_line_failure(result, f"127.0.0.1:{port_in_use}", WHY_IN_USE)


@pytest.mark.parametrize("workers", [1, 3])
def test_serve_on_an_address_not_on_this_machine(tmp_path: Path, foreign_address: str, workers: int) -> None:
    assert cli(tmp_path / "home", "init", "--seal", "file").returncode == 0
    result = _run(["serve", "--host", foreign_address, "--port", "8443", "--workers", str(workers), "--http"], tmp_path)
    _assert_one_line_failure(result, f"{foreign_address}:8443", WHY_FOREIGN)


@pytest.mark.parametrize("http", [False, True], ids=["https", "http"])
def test_demo_on_a_port_in_use_prints_no_credentials_and_leaves_no_home(tmp_path: Path, port_in_use: int, http: bool) -> None:
    result = _run(["demo", "--port", str(port_in_use), *(["--http"] if http else [])], tmp_path)
    _assert_one_line_failure(result, f"127.0.0.1:{port_in_use}", WHY_IN_USE)
    assert list((tmp_path / "tmp").iterdir()) == [], "no half-made demo home in TMPDIR"
    assert not (tmp_path / "state" / "xks-proxy" / "demo").exists(), "nor at the default demo home"


@pytest.mark.parametrize("http", [False, True], ids=["https", "http"])
def test_demo_on_an_address_not_on_this_machine(tmp_path: Path, foreign_address: str, http: bool) -> None:
    home = tmp_path / "demo-home"
    result = _run(["demo", "--home", str(home), "--host", foreign_address, "--port", "8443", *(["--http"] if http else [])], tmp_path)
    _assert_one_line_failure(result, f"{foreign_address}:8443", WHY_FOREIGN)
    assert not home.exists(), "no demo home made"


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_its_metrics_port_in_use(tmp_path: Path, port_in_use: int, workers: int) -> None:
    """The metrics listener is bound like the XKS one: one line, no traceback, no "serving" line."""
    from tests.support.lifecycle import patch_config

    assert cli(tmp_path / "home", "init", "--seal", "file").returncode == 0
    patch_config(tmp_path / "home", metrics={"enabled": True, "port": port_in_use})
    result = _run(["serve", "--port", "0", "--workers", str(workers), "--http"], tmp_path)
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr and "serving" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port_in_use}: {WHY_IN_USE}" in lines[0], result.stderr


def _start_demo(tmp: Path, name: str) -> Process:
    """`xks-proxy demo` as `make demo` runs it (the venv's executable), its default home under tmp's XDG_STATE_HOME."""
    env = dict(os.environ, PYTHONPATH=str(WORKTREE), TMPDIR=str(tmp / "tmp"), XDG_STATE_HOME=str(tmp / "state"))
    env.pop("XKS_PROXY_HOME", None)
    (tmp / "tmp").mkdir(exist_ok=True)
    argv = [str(Path(sys.executable).with_name("xks-proxy")), "demo", "--http", "--port", str(free_port()), "--workers", "1"]
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        return Process(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT), log)


def _printed(demo: Process, label: str) -> str:
    """The value the running demo printed after `label`, once it is serving."""
    found = wait_until(lambda: re.search(rf"{re.escape(label)}\s*(.+)", demo.text()) or not demo.alive(), 60, label, demo.shown)
    assert demo.alive() and isinstance(found, re.Match), demo.shown()
    return found[1].strip()


def test_demo_replaces_its_one_default_home_and_prints_commands_a_new_shell_can_run(tmp_path: Path) -> None:
    first = _start_demo(tmp_path, "first")
    try:
        home = Path(_printed(first, "xks-proxy demo home:").split("  (")[0])
        first_key = _printed(first, "access key id:")
    finally:
        first.stop()
    assert home == tmp_path / "state" / "xks-proxy" / "demo"
    (home / "left-from-the-first-run").touch()

    second = _start_demo(tmp_path, "second")
    try:
        other = _printed(second, "(other commands:").removesuffix(")")
        assert _printed(second, "access key id:") != first_key, "a new home, with a new credential"
        assert not (home / "left-from-the-first-run").exists(), "the first run's home was replaced"
        third = _start_demo(tmp_path, "third")  # the default home is in use: refused, nothing printed
        assert third.proc.wait(timeout=60) == 1
        assert third.text().strip() == f"xks-proxy: another demo is running on {home}; give this one its own --home"
        new_shell = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
        listed = subprocess.run(["bash", "-c", other], env=new_shell, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "foo" in listed.stdout, f"{other!r}: {listed.stderr}"
    finally:
        second.stop()
    assert sorted(p.name for p in home.parent.iterdir()) == ["demo", "demo.lock"], "one demo home"
    assert list((tmp_path / "tmp").iterdir()) == [], "nothing in TMPDIR"
