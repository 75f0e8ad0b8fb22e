"""A sealed home becomes a fleet: `fleet init` moves its seal record into the database, and every
proxy home of the fleet (config.toml and TLS files, nothing that opens the vault) unseals from it
with the same shares."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from keymanager.seal.home import read_record
from tests.support import ROOT
from tests.support.fleet import DSN_PASSWORD, write_dsn_file
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401  (fixtures)
from xks_proxy import config as configmod


def _cli(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", *args, "--home", str(home)],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_fleet_init_moves_the_seal_record_and_every_proxy_unseals_from_the_database(
    tmp_path: Path, pg_database: tuple[Cluster, str, str]
) -> None:
    _, _, dsn = pg_database
    home, shares = tmp_path / "home-1", tmp_path / "shares"
    assert _cli(home, "init", "--share-dir", str(shares), "--shares", "3", "--threshold", "2").returncode == 0
    two = (shares / "share-1.txt").read_text() + (shares / "share-3.txt").read_text()
    made = _cli(home, "keys", "create", "foo", stdin=two)
    assert made.returncode == 0, made.stderr
    dsn_file = write_dsn_file(tmp_path / "pg.dsn", dsn)

    moved = _cli(home, "fleet", "init", "--dsn-file", str(dsn_file), stdin=two)
    assert moved.returncode == 0, moved.stderr
    assert not (home / "seal.json").exists() and not (home / "master.key").exists()
    record = read_record(home, configmod.load(home, shared=False).vault.dsn)
    assert record is not None and record.kind == "shamir"

    other = tmp_path / "home-2"  # what an operator copies to the next proxy: no key, no share
    other.mkdir(mode=0o700)
    shutil.copy2(home / "config.toml", other / "config.toml")
    shutil.copytree(home / "tls", other / "tls")
    assert configmod.load(other).sealed
    refused = _cli(other, "keys", "list", stdin="")
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    listed = _cli(other, "keys", "list", stdin=(shares / "share-2.txt").read_text() + (shares / "share-3.txt").read_text())
    assert listed.returncode == 0 and "foo" in listed.stdout, listed.stderr
    again = _cli(home, "fleet", "init", stdin=two)  # run again: nothing more to do, the record stays
    assert again.returncode == 0, again.stderr
    for result in (made, moved, refused, listed, again):
        output = result.stdout + result.stderr
        assert DSN_PASSWORD not in output
        assert not any(line.strip() and line.strip() in output for line in two.splitlines())
