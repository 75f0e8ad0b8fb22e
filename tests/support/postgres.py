"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temporary directory.

Debian's `postgresql` package puts the server binaries in /usr/lib/postgresql/<version>/bin.
PostgreSQL refuses to run as root, so when the tests run as root (CI) the cluster runs as the
`postgres` system user the package creates. Under XKS_TEST_STRICT=1 a missing server fails.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import STRICT


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    path = Path(found[-1]).parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)
    if path is None:
        if STRICT:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are required (XKS_TEST_STRICT=1)")
        pytest.skip("PostgreSQL server binaries are not installed")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL server on 127.0.0.1:<port>, trust auth, database `xks`."""

    def __init__(self, base: Path) -> None:
        self.bin = pg_bin()
        self.dir = base / "pgdata"
        self.sock_dir = base / "pgsock"
        self.port = _free_port()
        self.as_user: list[str] = []
        self.sock_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            os.chmod(base, 0o777)  # the postgres user creates pgdata here
            shutil.chown(self.sock_dir, "postgres")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/xks"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, check=check, timeout=60)

    def init(self) -> "Cluster":
        self._run(str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "xks")
        return self

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.sock_dir} -c fsync=on -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("PostgreSQL did not start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop", check=False)

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database in this cluster; returns its DSN."""
        import psycopg

        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def set_connectable(self, name: str, allowed: bool) -> None:
        """Make one database refuse (and drop) every connection, or accept them again: that database is 'down'."""
        import psycopg

        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allowed else "false"}')
            if not allowed:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    def running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir), "status", check=False).returncode == 0


_databases = itertools.count(1)


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for a test module (tests get their own database in it: `pg_database`)."""
    pg_bin()  # skip, or fail under XKS_TEST_STRICT=1, before making anything
    base = Path(tempfile.mkdtemp(prefix="xks-pg-"))  # not under pytest's 0700 tmp: the postgres user must reach it
    cluster = Cluster(base).init()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_database(pg_cluster: Cluster) -> tuple[Cluster, str, str]:
    """(cluster, database name, DSN) of a fresh database for this test; the cluster is running."""
    if not pg_cluster.running():
        pg_cluster.start()
    name = f"t{os.getpid()}_{next(_databases)}"
    return pg_cluster, name, pg_cluster.create_database(name)
