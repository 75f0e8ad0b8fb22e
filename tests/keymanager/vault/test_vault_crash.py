"""Durability: a writer killed with SIGKILL at any instant loses nothing it committed, half-writes nothing."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from tests.support import ROOT
from pathlib import Path

from keymanager.vault.db import INTERNAL_STORE, VaultDB
from xks_proxy import config as configmod
from xks_proxy.cli.home import init_home

WRITER = r"""
import sys
from pathlib import Path
from keymanager.vault.db import VaultDB, parse_usage
from xks_proxy import config as configmod

cfg = configmod.load(Path(sys.argv[1]))
db = VaultDB(cfg.vault.path, cfg.master_key)
start = int(sys.argv[2])
for i in range(start, start + 100000):
    key_id = f"k{i}"
    db.create_key("s", key_id, parse_usage("ENCRYPT,DECRYPT"))
    if i % 3 == 0:
        db.rotate("s", key_id)
    if i % 5 == 0:
        db.set_state("s", key_id, "DISABLED")
    # Reported only after every change for this key has committed.
    print(key_id, 2 if i % 3 == 0 else 1, "DISABLED" if i % 5 == 0 else "ENABLED", flush=True)
"""


def test_sigkill_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home, "s", "us-east-1", 0)
    cfg = configmod.load(home)
    committed: dict[str, tuple[int, str]] = {}
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for round_no in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), str(round_no * 100000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        # Let it get going, then kill it at a random instant mid-stream.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        # Only whole lines: SIGKILL may land mid-print, and a cut line reports nothing.
        for line in (first + out).split("\n")[:-1]:
            key_id, versions, state = line.split()
            committed[key_id] = (int(versions), state)

        db = VaultDB(cfg.vault.path, cfg.master_key)
        try:
            with sqlite3.connect(cfg.vault.path) as check:
                assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            _, keys = db.load()  # opens every sealed version under the master key
        finally:
            db.close()
        for key_id, (versions, state) in committed.items():
            key = keys[("s", key_id)]
            assert (len(key.versions), key.state) == (versions, state), key_id
        for (store, key_id), key in keys.items():
            # Nothing half-written: every key row has its material, and all of it opens.
            assert key.versions, f"{store}/{key_id} has no material"
            assert store in ("s", INTERNAL_STORE)
    assert len(committed) > 8
