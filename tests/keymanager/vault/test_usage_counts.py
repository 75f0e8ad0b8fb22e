"""Versions, rotation and the AES-GCM usage limit: counted through real encrypts over HTTP."""

from __future__ import annotations

import pytest

import asyncio
import base64
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from collections import Counter

from aiohttp import ClientSession

from keymanager.vault.manager import VaultKeyManager
from tests.conftest import Client, Home, unb64
from tests.support.lifecycle import acli, cli_env, cli_json, patch_config, serving, wait_for

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM


def _version(enc: dict[str, str]) -> int:
    fmt, version = struct.unpack(">BI", base64.b64decode(enc["ciphertextMetadata"]))
    assert fmt == 1
    return version


def _reserved(home: Home, key_id: str = "foo") -> dict[int, int]:
    conn = sqlite3.connect(home.path / "vault.db")
    try:
        rows = conn.execute("SELECT version, reserved FROM key_versions WHERE key_id = ? ORDER BY version", (key_id,))
        return dict(rows.fetchall())
    finally:
        conn.close()


async def test_rotate_and_versions(home: Home) -> None:
    async with serving(home) as live:
        client = live.client
        status, old = await client.encrypt("foo", b"v1 data")
        assert status == 200 and _version(old) == 1
        rc, out, err = await acli("keys", "rotate", "foo", home=home.path)
        assert rc == 0, err
        assert json.loads(out)["currentVersion"] == 2

        made = [old]

        async def on_v2() -> dict | None:
            status, enc = await client.encrypt("foo", b"v2 data")
            assert status == 200
            made.append(enc)
            return enc if _version(enc) == 2 else None

        new = await wait_for(on_v2)
        for enc, plain in ((old, b"v1 data"), (new, b"v2 data")):
            status, body = await client.decrypt("foo", enc)
            assert status == 200 and unb64(body["plaintext"]) == plain
        rc, out, err = await acli("keys", "versions", "foo", "--json", home=home.path)
        assert rc == 0, err
        versions = json.loads(out)["versions"]
        assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]
        assert all(v["created"] and v["encryptionsReserved"] >= 1 for v in versions)
    # After a clean shutdown the unused reservations are given back: the counts are exact.
    versions = cli_json("keys", "versions", "foo", "--json", home=home.path)["versions"]
    assert {v["version"]: v["encryptionsReserved"] for v in versions} == Counter(_version(e) for e in made)


async def test_automatic_rotation_at_the_threshold(home: Home) -> None:
    patch_config(home.path, vault={"rotate_after_encryptions": 5, "count_block": 2})
    made: list[dict] = []
    async with serving(home) as live:
        client = live.client
        for i in range(12):
            status, enc = await client.encrypt("foo", b"n%d" % i)
            assert status == 200, enc
            made.append(enc)
        # and a burst, all at once
        results = await asyncio.gather(*(client.encrypt("foo", b"burst") for _ in range(20)))
        assert all(status == 200 for status, _ in results)
        made += [enc for _, enc in results]
        versions = [_version(e) for e in made]
        assert versions[:12] == sorted(versions[:12]), "new encryptions never go back to an older version"
        per_version = Counter(versions)
        assert max(per_version.values()) <= 5, per_version
        assert max(per_version) >= 7  # 32 encryptions at <= 5 per version
        assert set(per_version) == set(range(1, max(per_version) + 1))
        for i, enc in enumerate(made[:12]):
            status, body = await client.decrypt("foo", enc)
            assert status == 200 and unb64(body["plaintext"]) == b"n%d" % i
        assert all(r <= 5 for r in _reserved(home).values())
    exact = _reserved(home)
    assert {v: n for v, n in exact.items() if n} == dict(per_version)  # exact after a clean shutdown
    listed = cli_json("keys", "versions", "foo", "--json", home=home.path)["versions"]
    assert [v["current"] for v in listed].count(True) == 1 and listed[-1]["current"]


async def test_several_servers_rotate_once(home: Home) -> None:
    """Two key managers over one vault (as two worker processes): each version filled exactly once."""
    cfg = home.config
    managers = [VaultKeyManager(cfg.vault.path, cfg.master_key, 0.05, rotate_after=7, count_block=3) for _ in range(2)]
    for manager in managers:
        await manager.start()
    try:
        results = await asyncio.gather(*(managers[i % 2].encrypt(home.prefix, "foo", b"x", None) for i in range(90)))
        reserved = _reserved(home)
        assert sorted(reserved) == list(range(1, len(reserved) + 1))
        assert all(n == 7 for v, n in reserved.items() if v != max(reserved)), reserved  # no premature or second rotation
        per_version = Counter(r.key_version for r in results)
        assert max(per_version.values()) <= 7, per_version
        for result in results[:10]:
            assert await managers[1].decrypt(home.prefix, "foo", result.ciphertext, result.iv, result.tag, None, result.metadata) == b"x"
    finally:
        for manager in managers:
            await manager.close()
    assert {v: n for v, n in _reserved(home).items() if n} == dict(per_version)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_counts_survive_a_crash(home: Home) -> None:
    """SIGKILL a serving process group (two workers): the stored count never falls below the answers."""
    patch_config(home.path, vault={"count_block": 4})
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xks_proxy.cli", "serve", "--http", "--port", str(port), "--workers", "2",
        "--log-level", "warning", env=cli_env(home.path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        async with ClientSession() as session:
            client = Client(session, f"http://127.0.0.1:{port}", f"/{home.prefix}/kms/xks/v1", home.access_key_id, home.secret)

            async def up() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/ping") as resp:
                        return resp.status == 200
                except OSError:
                    return False

            await wait_for(up, timeout=15)
            done = 0
            for _ in range(4):
                results = await asyncio.gather(*(client.encrypt("foo", os.urandom(16)) for _ in range(5)))
                assert all(status == 200 for status, _ in results)
                done += len(results)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # supervisor and workers at once: nobody gives counts back
        await proc.wait()
    reserved = _reserved(home)[1]
    assert done <= reserved <= done + 2 * 2 * 4  # an upper bound, off by at most two blocks per worker
