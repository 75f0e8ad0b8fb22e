"""Load shedding: a burst far over a store's quota, and the in-flight cap, over real HTTP; the bucket table the
workers share (issue 15), with a real lock-holding process (tests/access/test_throttle_workers.py: real workers)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from keymanager.base import Encrypted
from keymanager.vault.db import VaultDB
from keymanager.vault.manager import VaultKeyManager
import pytest

from tests.conftest import Client, Home, b64, unb64
from tests.support.proxy import client_for, edit_config, eventually, running
from xks_proxy.access.throttle import BucketTable, SharedBucket, Throttle
from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential
from xks_proxy.config import Quota
from xks_proxy.server import XksServer

# Admission is decided before any backend is called; the in-flight test gates the vault: run once, on the vault.
pytestmark = pytest.mark.vault_only

BURST = 5
STUCK = "a throttle lock was held over 0.05 s (a stopped worker?): admitting without the quota meanwhile"


def _throttled(status: int, text: str) -> bool:
    """A proper 429: one line of JSON naming ThrottlingException."""
    body = json.loads(text)
    return status == 429 and "\n" not in text.strip() and body["errorName"] == "ThrottlingException" and body["errorMessage"]


async def test_burst_far_over_the_quota(home: Home) -> None:
    other_akid, other_secret = new_access_key_id(), new_secret()
    master = home.config.master_key

    def configure(raw: dict[str, Any]) -> None:
        raw["throttle"] = {"max_in_flight": 0}
        # A refill of one request per 1000 s: within this test the bucket holds exactly BURST.
        raw["stores"][0]["throttle"] = {"rate": 0.001, "burst": BURST}
        raw["stores"].append(
            {"prefix": "other", "regions": ["us-east-1"], "credentials": [sealed_credential(master, other_akid, other_secret)]}
        )

    edit_config(home.path, configure)
    home.create_key("foo", store="other")
    plaintexts = [f"request {i}".encode() for i in range(60)]
    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as client:

        async def encrypt(plaintext: bytes) -> tuple[int, str]:
            body = {"requestMetadata": {"kmsRequestId": "b", "kmsOperation": "Encrypt", "awsPrincipalArn": "p", "kmsKeyArn": "k"},
                    "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
            status, text, _ = await client.post_raw(client.uri_path + "/keys/foo/encrypt", json.dumps(body).encode())
            return status, text

        answers = await asyncio.gather(*(encrypt(p) for p in plaintexts))
        admitted = [(p, json.loads(text)) for p, (status, text) in zip(plaintexts, answers) if status == 200]
        refused = [(status, text) for status, text in answers if status != 200]
        assert len(admitted) == BURST
        assert len(refused) == len(plaintexts) - BURST and all(_throttled(s, t) for s, t in refused), refused[:3]

        # Health is exempt from the quota; another store has its own.
        status, _ = await client.call("health", requestMetadata={"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"})
        assert status == 200
        async with client_for(home, proxy, access_key_id=other_akid, secret=other_secret, prefix="other") as other:
            status, _ = await other.encrypt("foo", b"unaffected")
            assert status == 200

    # What was admitted is real ciphertext under the store's key.
    db = VaultDB(home.config.vault.path, master)
    _, keys = db.load()
    db.close()
    key = keys[("test", "foo")]
    for plaintext, enc in admitted:
        version = key.current
        opened = key.versions[version].decrypt(
            unb64(enc["initializationVector"]), unb64(enc["ciphertext"]), unb64(enc["authenticationTag"]), None,
            unb64(enc["ciphertextMetadata"]),
        )
        assert opened == plaintext


class GatedVault(VaultKeyManager):
    """The local vault, but encrypt waits at a gate the test opens: requests stay in flight."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def encrypt(self, store: str, key_id: str, plaintext: bytes, aad: bytes | None) -> Encrypted:
        self.waiting += 1
        await self.gate.wait()
        return await super().encrypt(store, key_id, plaintext, aad)


async def test_in_flight_cap_answers_429_at_once_instead_of_queueing(home: Home) -> None:
    edit_config(home.path, lambda raw: raw.update(throttle={"max_in_flight": 3, "rate": 0}))
    cfg = home.config
    vault = GatedVault(cfg.vault.path, cfg.master_key, cfg.vault.refresh_seconds)
    server = TestServer(XksServer(cfg, vault).app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as session:
            client = Client(session, str(server.make_url("")).rstrip("/"), "/test/kms/xks/v1", home.access_key_id, home.secret)
            tasks = [asyncio.create_task(client.encrypt("foo", b"in flight")) for _ in range(10)]

            async def shed() -> bool:
                return vault.waiting == 3 and sum(t.done() for t in tasks) == 7

            # While three requests are stuck in the key manager, the other seven are already answered.
            await eventually(shed, deadline=10, what="seven requests answered while three are in flight")
            for task in (t for t in tasks if t.done()):
                status, body = task.result()
                assert (status, body["errorName"]) == (429, "ThrottlingException")
            vault.gate.set()
            results = await asyncio.gather(*tasks)
            assert sorted(status for status, _ in results) == [200] * 3 + [429] * 7
            status, _ = await client.encrypt("foo", b"after the burst")
            assert status == 200, "finished requests leave the in-flight count"
    finally:
        await server.close()


def _quota(home: Home, rate: float, burst: int) -> None:
    edit_config(home.path, lambda raw: raw["stores"][0].update(throttle={"rate": rate, "burst": burst}))


def test_workers_charge_one_bucket_which_a_reload_or_a_restart_keeps(home: Home) -> None:
    """Two workers' throttles on one table admit the store's burst once between them (a refill of
    one request per 1000 s is nil here); a reload to a larger burst or a new worker refills nothing,
    nor does a reload refill a single process's own bucket."""
    _quota(home, 0.001, 6)
    table = BucketTable()
    workers = [Throttle(home.config, workers=2) for _ in range(2)]
    for worker in workers:
        worker.share(table)
    single = Throttle(home.config)
    assert sum(worker.take("test") for _ in range(10) for worker in workers) == 6
    assert sum(single.take("test") for _ in range(10)) == 6
    _quota(home, 0.001, 20)
    for worker in [*workers, single]:
        worker.configure(home.config)
    assert not single.take("test")
    restarted = Throttle(home.config, workers=2)
    restarted.share(table)
    assert sum(worker.take("test") for _ in range(10) for worker in [*workers, restarted]) == 0


def test_a_lock_holder_that_stops_fails_open_and_one_that_dies_wedges_nobody(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds every lock of the table: a take waits LOCK_WAIT_SECONDS, then admits (the
    documented fail-open) with a warning; SIGKILLed, its locks go with it and the quota counts again."""
    _quota(home, 0.001, 1)
    table = BucketTable()
    throttle = Throttle(home.config, workers=2)
    throttle.share(table)
    assert throttle.take("test") and not throttle.take("test")
    hold = "import fcntl, sys; fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(table.fileno())], pass_fds=[table.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        holder.send_signal(signal.SIGSTOP)
        with caplog.at_level(logging.WARNING, logger="xks_proxy"):
            assert throttle.take("test") and throttle.take("test"), "a stuck lock admits"
        assert [r.message for r in caplog.records].count(STUCK) == 1, "one warning a minute, not one a request"
    finally:
        holder.kill()
        holder.wait()
    assert not throttle.take("test"), "the dead holder's lock is gone: the exhausted bucket refuses again"


def test_a_full_table_reuses_a_refilled_slot_first() -> None:
    """Two slots, three stores: the third takes the slot of the one whose bucket is full (it loses
    nothing), not the spent one's, which a new worker's handle still finds. With every bucket spent,
    a store that lost its slot gets a full one again: the documented tolerance beyond SLOTS stores."""
    table = BucketTable(slots=2)
    quota = Quota(0.001, 2)
    spent = SharedBucket(table, "spent", quota)
    assert [spent.take() for _ in range(3)] == [True, True, False]
    SharedBucket(table, "idle", quota)  # claimed, full, never charged
    third = SharedBucket(table, "third", quota)
    assert [third.take() for _ in range(3)] == [True, True, False]
    assert not spent.take() and not SharedBucket(table, "spent", quota).take()
    assert [SharedBucket(table, "idle", quota).take() for _ in range(3)] == [True, True, False]
