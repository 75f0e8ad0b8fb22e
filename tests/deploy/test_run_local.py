"""deploy/fleet/run-local.sh `start` on a machine that lacks something: it says what, and leaves nothing running.

Before starting anything, `start` checks what it will run (xks-proxy, PostgreSQL's binaries,
HAProxy, curl); it finds xks-proxy on PATH or in the repository's .venv beside the script. A
failure after PostgreSQL started stops PostgreSQL again. The script runs as a real process with
a PATH that has no xks-proxy on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import need
from tests.support import ROOT
from tests.support.fleet import free_port
from tests.support.postgres import pg_bin

SCRIPT = ROOT / "deploy" / "fleet" / "run-local.sh"


def _path_without_xks_proxy() -> str:
    """This PATH minus every directory that holds an xks-proxy."""
    dirs = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if d and not (Path(d) / "xks-proxy").exists()]
    return os.pathsep.join(dirs)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XKS_")}
    env.update(PATH=_path_without_xks_proxy(), XKS_PG_PORT=str(free_port()), XKS_BASE_PORT=str(free_port()), XKS_HTTPS_PORT=str(free_port()))
    assert shutil.which("xks-proxy", path=env["PATH"]) is None
    return env


def _copy_script(repo: Path) -> Path:
    """run-local.sh where a repository checkout has it, without a .venv beside it (yet)."""
    script = repo / "deploy" / "fleet" / "run-local.sh"
    script.parent.mkdir(parents=True)
    shutil.copy2(SCRIPT, script)
    return script


@pytest.fixture
def fleet_dir() -> Iterator[Path]:
    """A directory the `postgres` user can reach (not pytest's 0700 tmp); PostgreSQL stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="xks-run-local-"))
    base.chmod(0o711)  # the postgres user passes through to its cluster
    try:
        yield base / "fleet"
    finally:
        data = base / "fleet" / "pg" / "data"
        if (data / "postmaster.pid").exists():
            as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
            subprocess.run([*as_pg, str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_start_without_xks_proxy_says_what_to_do_and_starts_nothing(tmp_path: Path, fleet_dir: Path) -> None:
    script = _copy_script(tmp_path / "repo")
    result = subprocess.run(["bash", str(script), "start", str(fleet_dir)], env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        "run-local: xks-proxy not found: run `make install` in the repository (this script then uses its "
        ".venv/bin/xks-proxy) or set XKS_PROXY"
    ], result.stderr
    assert not fleet_dir.exists(), "nothing made, so no PostgreSQL started"


def test_start_uses_the_repository_venv_and_a_later_failure_stops_postgresql(tmp_path: Path, fleet_dir: Path) -> None:
    """xks-proxy found in <repo>/.venv; its `init` refuses the prefix after PostgreSQL started: PostgreSQL is stopped."""
    pg_bin()
    need("haproxy")
    installed = Path(sys.executable).with_name("xks-proxy")
    assert installed.is_file(), f"xks-proxy is installed beside {sys.executable} (make install)"
    script = _copy_script(tmp_path / "repo")
    (tmp_path / "repo" / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "repo" / ".venv" / "bin" / "xks-proxy").symlink_to(installed)
    env = {**_env(), "XKS_PREFIX": "not a prefix!"}
    result = subprocess.run(["bash", str(script), "start", str(fleet_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result
    assert "command not found" not in result.stderr
    assert "--uri-prefix: 'not a prefix!'" in result.stderr, "xks-proxy from the .venv ran and refused the prefix"
    assert "run-local: start failed; stopping what it started" in result.stderr
    assert (fleet_dir / "pg" / "data" / "PG_VERSION").exists(), "PostgreSQL had been set up and started"
    assert not (fleet_dir / "pg" / "data" / "postmaster.pid").exists(), "PostgreSQL is no longer running"
