"""Dockerfile and docker-compose.yml, checked on paper by the tools that run without Docker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import need
from tests.support import ROOT

#: yamllint's defaults, but the lines long enough for the compose file's commented commands.
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 180}, document-start: disable}}"


def _venv_tool(name: str) -> str:
    """A tool installed by a Python package of the test extra: beside this interpreter."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name}: pip install -e '.[test]'"
    return str(path)


def test_compose_file_matches_the_compose_spec() -> None:
    done = subprocess.run(
        [_venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_spec_check_refuses_a_wrong_file(tmp_path: Path) -> None:
    """The check above can fail: a service key the spec does not have is refused."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("    restart: unless-stopped\n", "    restarts: always\n", 1))
    done = subprocess.run(
        [_venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "restarts" in done.stdout + done.stderr


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([_venv_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_yaml_we_ship_passes_yamllint() -> None:
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy" / "prometheus").rglob("*.yml"))]
    assert len(files) >= 3
    done = subprocess.run(
        [need("yamllint"), "--strict", "-d", YAMLLINT_CONFIG, *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
