"""`vault rotate-master-key`: a new master key while proxies serve signed traffic, one proxy or a
fleet of two on PostgreSQL; SIGKILLed at random instants, the vault always opens under exactly one
master key and serves every key; the next run finishes; old ciphertexts decrypt."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from keymanager.base import parse_usage
from keymanager.seal.home import auto_open, read_record
from keymanager.vault.model import material_context
from tests.conftest import Client, Home, unb64
from tests.support.fleet import Proxy, copy_home, free_port, pg_home
from tests.support.lifecycle import acli, cli_env, patch_config
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401 (fixtures)
from tests.support.sealing import (
    PASSPHRASE,
    assert_no_secrets,
    create_keys,
    init,
    keyring,
    loaded,
    master_texts,
    open_all,
    passphrase_file,
    seal_under,
    vault,
)
from xks_proxy import config as configmod

KEYS = ["k0", "k1", "k2"]


class Traffic:
    """Encrypt then decrypt, continuously, on every key through every client; every failure kept."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.failures: list[str] = []
        self.made: list[tuple[str, dict[str, Any]]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self, client: Client, key: str) -> None:
        while not self._stop.is_set():
            status, enc = await client.encrypt(key, key.encode())
            if status != 200:
                self.failures.append(f"encrypt {key}: {status} {enc}")
                continue
            other = self.clients[(self.clients.index(client) + 1) % len(self.clients)]  # another proxy, if any
            status, dec = await other.decrypt(key, enc)
            if status != 200 or unb64(dec["plaintext"]) != key.encode():
                self.failures.append(f"decrypt {key}: {status} {dec}")
            self.made.append((key, enc))

    def __enter__(self) -> "Traffic":
        self._tasks = [asyncio.create_task(self._run(c, k)) for c in self.clients for k in KEYS]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def __exit__(self, *exc: Any) -> None:
        for task in self._tasks:
            task.cancel()


def single_home(tmp_path: Path) -> tuple[Home, list[str]]:
    """A passphrase-sealed home that opens by itself (`[seal] passphrase_file`), with keys and BYOK parameters."""
    pfile = passphrase_file(tmp_path / "pass")
    made = init(tmp_path / "home", "--seal", "passphrase", "--passphrase-file", str(pfile))
    patch_config(made.path, seal={"passphrase_file": str(pfile)}, vault={"refresh_seconds": 0.2})
    ring = keyring(made.path)
    create_keys(made.path, ring, "test", KEYS)
    db = vault(made.path, ring)
    try:  # an import parameter's RSA key and the token signing key: sealed too
        db.create_key("test", "imported", parse_usage("ENCRYPT,DECRYPT"), material=False)
        db.import_params("test", "imported", "RSAES_OAEP_SHA_256", "RSA_2048")
    finally:
        db.close()
    return Home(path=made.path, prefix="test", access_key_id=made.access_key_id, secret=made.secret), made.outputs


async def test_rotation_under_signed_traffic_loses_no_request_and_no_key(tmp_path: Path) -> None:
    home, outputs = single_home(tmp_path)
    before_ring = keyring(home.path)
    old = seal_under(loaded(home.path, before_ring), "test", KEYS)
    proxy = Proxy(home=home, port=free_port(), log=tmp_path / "proxy.log").start(workers=2)
    seen_keys = list(master_texts(before_ring))
    try:
        await proxy.wait_serving()
        async with ClientSession() as session:
            client = Client(session, proxy.url, "/test/kms/xks/v1", home.access_key_id, home.secret)
            with Traffic([client]) as traffic:
                for _ in range(2):
                    rc, out, err = await acli("vault", "rotate-master-key", home=home.path)
                    outputs += [out, err]
                    assert rc == 0, err
                    summary = json.loads(out)
                    assert summary["resealed"]["keyVersions"] == len(KEYS) + 1  # and the internal health key
                    assert summary["resealed"]["importParams"] == 1 and summary["resealed"]["vaultSecrets"] == 1
                    assert summary["resealed"]["credentials"] == 1
                    seen_keys += master_texts(keyring(home.path))
                count = len(traffic.made)
                while len(traffic.made) < count + 20:  # traffic goes on after the last rotation
                    await asyncio.sleep(0.05)
                await traffic.stop()
            assert not traffic.failures, traffic.failures[:5]
            for key, enc in traffic.made[:: max(1, len(traffic.made) // 50)]:  # made before, during and after
                status, dec = await client.decrypt(key, enc)
                assert status == 200 and unb64(dec["plaintext"]) == key.encode()
    finally:
        proxy.stop()
    record = read_record(home.path)
    assert record is not None and len(record.keys) == 1 and record.current not in (before_ring.current.key_id,)
    ring = keyring(home.path)
    open_all(loaded(home.path, ring), "test", old)
    audits = list(home.path.glob("audit.log*"))
    assert audits, "the proxy wrote no audit log"
    logs = [proxy.log.read_text(), *(p.read_text() for p in audits)]
    assert_no_secrets(outputs + logs, [PASSPHRASE, *seen_keys])


KILL_ROUNDS = 24


def test_sigkill_during_rotation_at_random_points(tmp_path: Path) -> None:
    """A home from before seals (the first run converts it), killed at random instants, checked each time."""
    made = init(tmp_path / "home", "--seal", "file")
    ring = configmod.load(made.path).keyring
    assert ring is not None
    create_keys(made.path, ring, "test", KEYS)
    old = seal_under(loaded(made.path, ring), "test", KEYS)
    env = cli_env(made.path)
    command = [sys.executable, "-m", "xks_proxy.cli", "vault", "rotate-master-key"]
    started = time.monotonic()
    assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0
    full = time.monotonic() - started
    rng = random.Random(13)
    finished = 0
    for _ in range(KILL_ROUNDS):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, full * 1.1))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        finished += proc.returncode == 0
        assert_opens_under_one_key(made.path)
    assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0
    record = read_record(made.path)
    assert record is not None and len(record.keys) == 1
    keys = assert_opens_under_one_key(made.path)
    open_all(keys, "test", old)
    assert finished < KILL_ROUNDS, "no run was killed mid-way: the kill delays miss the rotation"


def assert_opens_under_one_key(home: Path) -> dict[tuple[str, str], Any]:
    """The record opens; every sealed blob of the vault opens under one and the same master key of it;
    the credentials open; every key loads with all its versions."""
    record = read_record(home)
    assert record is not None and 1 <= len(record.keys) <= 2
    ring = auto_open(home, None, record, {})
    assert ring is not None
    with sqlite3.connect(home / "vault.db") as db:
        rows = db.execute("SELECT store, key_id, version, sealed FROM key_versions").fetchall()
    under = set()
    for store, key_id, version, sealed in rows:
        opening = []
        for kid in ring.key_ids:
            try:
                ring.master(kid).unseal(sealed, material_context(store, key_id, version))
                opening.append(kid)
            except ValueError:
                pass
        assert len(opening) == 1, f"{store}/{key_id} v{version} opens under {len(opening)} keys"
        under.update(opening)
    assert len(under) == 1, "the vault is sealed under two master keys at once"
    configmod.load(home)  # the store credentials open
    keys = loaded(home, ring)
    assert all(key.versions for key in keys.values()) and {("test", k) for k in KEYS} <= set(keys)
    return keys


async def test_fleet_of_two_picks_up_rotations_and_a_rekey_without_restart(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    """Two proxies from before seals; two rotations (the first makes the fleet's record), a rekey to a
    passphrase and a third rotation, all from one home while both serve; then a proxy started after."""
    cluster, name, dsn = pg_database
    home_a = pg_home(tmp_path / "a", dsn, refresh_seconds=0.2)
    home_b = copy_home(home_a, tmp_path / "b")
    home_c = copy_home(home_a, tmp_path / "c")  # started at the end
    key_text = (home_a.path / "master.key").read_text().strip()
    pfile = passphrase_file(tmp_path / "pass")
    outputs: list[str] = []
    for key in KEYS:
        rc, _, err = await acli("keys", "create", key, home=home_a.path)
        assert rc == 0, err
    a = Proxy(home=home_a, port=free_port(), log=tmp_path / "a.log").start(workers=2)
    b = Proxy(home=home_b, port=free_port(), log=tmp_path / "b.log").start()
    try:
        await a.wait_serving()
        await b.wait_serving()
        async with ClientSession() as session:
            via_a = Client(session, a.url, "/test/kms/xks/v1", home_a.access_key_id, home_a.secret)
            via_b = Client(session, b.url, "/test/kms/xks/v1", home_a.access_key_id, home_a.secret)
            status, before = await via_a.encrypt("k0", b"k0")
            assert status == 200
            steps = [
                ("vault", "rotate-master-key"),
                ("vault", "rotate-master-key"),
                ("vault", "rekey", "--seal", "passphrase", "--passphrase-file", str(pfile)),
                ("vault", "rotate-master-key", "--current-passphrase-file", str(pfile)),
            ]
            with Traffic([via_a, via_b]) as traffic:  # each encrypts, the other decrypts
                for step in steps:
                    rc, out, err = await acli(*step, home=home_a.path)
                    outputs += [out, err]
                    assert rc == 0, err
                    if step[1] == "rotate-master-key":
                        assert json.loads(out)["resealed"]["credentials"] == 1
                count = len(traffic.made)
                while len(traffic.made) < count + 20:
                    await asyncio.sleep(0.05)
                await traffic.stop()
            assert not traffic.failures, traffic.failures[:5]
            status, dec = await via_b.decrypt("k0", before)
            assert status == 200 and unb64(dec["plaintext"]) == b"k0"
            # A proxy started afterwards opens the fleet's record with the passphrase, and serves the same keys.
            patch_config(home_c.path, seal={"passphrase_file": str(pfile)})
            c = Proxy(home=home_c, port=free_port(), log=tmp_path / "c.log").start()
            try:
                await c.wait_serving()
                via_c = Client(session, c.url, "/test/kms/xks/v1", home_a.access_key_id, home_a.secret)
                for key, enc in traffic.made[-10:]:
                    status, dec = await via_c.decrypt(key, enc)
                    assert status == 200 and unb64(dec["plaintext"]) == key.encode()
            finally:
                c.stop()
    finally:
        a.stop()
        b.stop()
    record = read_record(home_a.path, dsn)
    assert record is not None and record.kind == "passphrase" and len(record.keys) == 1
    assert not (home_a.path / "master.key").exists()  # the rekey removed this home's old key file
    ring = keyring(home_a.path, passphrase=PASSPHRASE, dsn=dsn)
    logs = [p.read_text() for p in [*tmp_path.glob("*.log"), *tmp_path.glob("*/audit.log*")]]
    assert any("audit.log" in str(p) for p in tmp_path.glob("*/audit.log*"))
    assert_no_secrets(logs + outputs, [key_text, PASSPHRASE, *master_texts(ring)])


def test_two_rotations_at_once_never_lose_a_key(tmp_path: Path) -> None:
    """Two commands started together: the record is replaced only if unchanged, so one waits its turn or is refused."""
    made = init(tmp_path / "home", "--seal", "file")
    ring = configmod.load(made.path).keyring
    assert ring is not None
    create_keys(made.path, ring, "test", KEYS)
    old = seal_under(loaded(made.path, ring), "test", KEYS)
    env = cli_env(made.path)
    command = [sys.executable, "-m", "xks_proxy.cli", "vault", "rotate-master-key"]
    for _ in range(3):
        procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(60), p.communicate()[1]) for p in procs]
        for rc, err in results:
            assert rc == 0 or "changed meanwhile" in err, err
        assert_opens_under_one_key(made.path)
    assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0
    record = read_record(made.path)
    assert record is not None and len(record.keys) == 1
    open_all(assert_opens_under_one_key(made.path), "test", old)
