"""Load shedding: a burst far over a store's quota, and the global in-flight cap, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from keymanager.base import Encrypted
from keymanager.vault.db import VaultDB
from keymanager.vault.manager import VaultKeyManager
import pytest

from tests.conftest import Client, Home, b64, unb64
from tests.support.proxy import client_for, edit_config, eventually, running
from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential
from xks_proxy.server import XksServer

# Admission is decided before any backend is called; the in-flight test gates the vault: run once, on the vault.
pytestmark = pytest.mark.vault_only

BURST = 5


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
