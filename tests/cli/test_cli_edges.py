"""Rough edges a newcomer hit (issue 15): --version, --home before the command, --workers 0, a
reader that goes away (`stores export | head`). Each through the real CLI in a subprocess, but for
config.toml's atomic write, which is called directly to make it fail."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

CLI = [sys.executable, "-m", "xks_proxy.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "h"
    assert _run("init", "--seal", "file", "--home", str(home), "--port", "0").returncode == 0
    return home


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"xks-proxy {importlib.metadata.version('xks-proxy')}"


def test_home_before_the_command_means_the_same_as_after(tmp_path: Path) -> None:
    home = _home(tmp_path)
    before, after = _run("--home", str(home), "stores", "export"), _run("stores", "export", "--home", str(home))
    assert before.returncode == after.returncode == 0, before.stderr
    assert json.loads(before.stdout)["XksProxyUriPath"] == json.loads(after.stdout)["XksProxyUriPath"]


def test_workers_zero_is_refused_before_anything_starts(tmp_path: Path) -> None:
    home = _home(tmp_path)
    for bad in ("0", "-1", "two"):
        done = _run("serve", "--home", str(home), "--workers", bad)
        assert done.returncode == 2 and "--workers" in done.stderr.splitlines()[-1] and "serving" not in done.stderr


def test_a_reader_that_goes_away_costs_no_traceback(tmp_path: Path) -> None:
    home = _home(tmp_path)
    for _ in range(5):  # the pipe is closed before the command writes: every write meets EPIPE
        proc = subprocess.Popen([*CLI, "stores", "export", "--home", str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 141 and err == "", err


def test_a_config_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """write_config writes a file of its own, then renames it over config.toml: a write that
    fails (here a value TOML cannot hold) leaves config.toml as it was and nothing beside it."""
    from xks_proxy.cli.home import write_config

    home = tmp_path / "home"
    home.mkdir()
    write_config(home, {"server": {"port": 8443}})
    before = (home / "config.toml").read_bytes()
    with pytest.raises(TypeError):
        write_config(home, {"server": {"port": object()}})
    assert (home / "config.toml").read_bytes() == before
    assert sorted(p.name for p in home.iterdir()) == ["config.toml"]
