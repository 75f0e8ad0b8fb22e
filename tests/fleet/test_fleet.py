"""A fleet for real: `xks-proxy serve` processes on their own ports over one PostgreSQL vault.

Each test gets its own database in the module's cluster; proxies are separate homes (copies of
the first, as an operator makes them), driven with botocore-signed requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import struct
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import tomli_w
from aiohttp import ClientSession

from tests.conftest import Client, Home, metadata, unb64
from tests.support.fleet import DSN_PASSWORD, Proxy, copy_home, free_port, pg_home
from tests.support.lifecycle import acli, patch_config, wait_for
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401 (fixtures)
from xks_proxy import config as configmod
from xks_proxy.fleet import shared_settings

HEALTH_META = {"kmsRequestId": "fleet-health", "kmsOperation": "KmsHealthCheck"}


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as s:
        yield s


@pytest.fixture
def proxies(tmp_path: Path) -> Any:
    """Start proxies over homes; every one is stopped at the end, and its log checked for the DSN password."""
    started: list[Proxy] = []

    def start(home: Home, workers: int = 1, wait: bool = True) -> Proxy:
        proxy = Proxy(home=home, port=free_port(), log=tmp_path / f"proxy-{len(started)}.log").start(workers)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    for proxy in started:
        assert DSN_PASSWORD not in proxy.log.read_text(), f"{proxy.log} shows the DSN's password"


def client_for(session: ClientSession, proxy: Proxy, access_key_id: str | None = None, secret: str | None = None) -> Client:
    home = proxy.home
    return Client(session, proxy.url, f"/{home.prefix}/kms/xks/v1", access_key_id or home.access_key_id, secret or home.secret)


async def health(client: Client) -> dict[str, Any]:
    status, body = await client.call("health", requestMetadata=HEALTH_META)
    assert status == 200, body
    return body


def version_of(enc: dict[str, str]) -> int:
    return struct.unpack(">BI", base64.b64decode(enc["ciphertextMetadata"]))[1]


async def propagated(check: Callable[[], Any], since: float) -> None:
    """`check()` holds within the fleet's 2-second promise, counted from `since` (when the change committed)."""
    await wait_for(check, timeout=max(0.0, 2.0 - (time.monotonic() - since)), interval=0.05)


async def test_two_proxies_share_keys_credentials_and_health(
    tmp_path: Path, pg_database: tuple[Cluster, str, str], proxies: Any, session: ClientSession
) -> None:
    cluster, name, dsn = pg_database
    home_a = pg_home(tmp_path / "a", dsn)
    home_b = copy_home(home_a, tmp_path / "b")
    a, b = proxies(home_a, workers=2), proxies(home_b)
    await a.wait_serving()
    await b.wait_serving()
    via_a, via_b = client_for(session, a), client_for(session, b)

    async def fleet_of(n: int) -> bool:
        return (await health(via_a))["xksProxyFleetSize"] == n and (await health(via_b))["xksProxyFleetSize"] == n

    await wait_for(lambda: fleet_of(2), timeout=5)  # two proxies, whatever their worker counts
    details = (await health(via_b))["ekmFleetDetails"]
    assert [d["healthStatus"] for d in details] == ["ACTIVE", "ACTIVE"]
    assert details[1]["id"] == f"postgres@127.0.0.1:{cluster.port}/{name}" and details[1]["model"].startswith("PostgreSQL 1")

    # A key created through one proxy's home (the CLI on the shared database) is used through the other.
    rc, out, err = await acli("keys", "create", "shared", home=home_a.path)
    assert rc == 0, err
    created = time.monotonic()
    made: dict[str, Any] = {}

    async def encrypts_on_b() -> bool:
        status, made["enc"] = await via_b.encrypt("shared", b"from b")
        return status == 200

    await propagated(encrypts_on_b, created)

    async def decrypts_on_a() -> bool:  # every worker of a, within the same 2 seconds
        results = [await via_a.decrypt("shared", made["enc"]) for _ in range(6)]
        return all(status == 200 and unb64(body["plaintext"]) == b"from b" for status, body in results)

    await propagated(decrypts_on_a, created)

    # Disabled through one, refused by the other (every worker of it) within 2 seconds.
    rc, out, err = await acli("keys", "disable", "shared", home=home_b.path)
    assert rc == 0, err
    disabled = time.monotonic()

    async def refused_on_a() -> bool:
        results = [await via_a.encrypt("shared", b"x") for _ in range(6)]  # both workers answer some
        return all(status == 400 and body["errorName"] == "InvalidStateException" for status, body in results)

    await propagated(refused_on_a, disabled)

    # A credential added through one proxy's home serves on every proxy; the one removed stops.
    rc, out, err = await acli("credentials", "add", home=home_a.path)
    assert rc == 0, err
    added = time.monotonic()
    akid = re.search(r"access key id:\s+(\S+)", out)[1]  # type: ignore[index]
    secret = re.search(r"secret access key:\s+(\S+)", out)[1]  # type: ignore[index]
    new_on_b = client_for(session, b, akid, secret)
    await propagated(lambda: _status_is(new_on_b, 200), added)
    rc, out, err = await acli("credentials", "remove", home_a.access_key_id, home=home_b.path)
    assert rc == 0, err
    removed = time.monotonic()
    await propagated(lambda: _status_is(via_b, 401), removed)
    assert await _status_is(new_on_b, 200)
    stored = shared_settings.stores_raw(configmod.load(home_a.path, shared=False))
    assert [c["access_key_id"] for c in stored[0]["credentials"]] == [akid]
    assert secret not in json.dumps(stored) and "stores" not in configmod.read_raw(home_b.path)
    rc, out, err = await acli("stores", "add", "second", "--region", "eu-west-1", home=home_b.path)
    assert rc == 0, err
    added = time.monotonic()
    second = Client(session, a.url, "/second/kms/xks/v1",
                    re.search(r"access key id:\s+(\S+)", out)[1], re.search(r"secret access key:\s+(\S+)", out)[1],  # type: ignore[index]
                    region="eu-west-1")  # fmt: skip
    await propagated(lambda: _status_is(second, 200), added)

    # A policy, edited as the fleet's [[stores]] document, is enforced by every proxy.
    rc, out, err = await acli("fleet", "get-stores", home=home_b.path)
    assert rc == 0 and out.startswith("# revision ") and secret not in out, err
    doc = tomllib.loads(out)
    doc["stores"][0]["policy"] = [{"name": "no-encrypt-for-mallory", "effect": "deny", "kmsOperation": "Encrypt",
                                   "awsPrincipalArn": "arn:aws:iam::*:user/mallory"}]  # fmt: skip
    edited = tmp_path / "stores.toml"
    edited.write_text(out.split("\n[[stores]]")[0] + "\n" + tomli_w.dumps(doc))
    rc, out, err = await acli("fleet", "put-stores", str(edited), home=home_a.path)
    assert rc == 0, err
    put = time.monotonic()
    mallory = metadata("Encrypt", awsPrincipalArn="arn:aws:iam::123456789012:user/mallory")

    async def denied_on_b() -> bool:
        status, body = await new_on_b.encrypt("shared-2", b"x", requestMetadata=mallory)
        return status == 403 and "no-encrypt-for-mallory" in body.get("errorMessage", "")

    rc, _, err = await acli("keys", "create", "shared-2", "--store", "test", home=home_a.path)
    assert rc == 0, err
    await propagated(denied_on_b, put)
    await wait_for(lambda: _encrypt_ok(new_on_b, "shared-2"), timeout=2)  # others are still served
    rc, out, err = await acli("fleet", "put-stores", str(edited), home=home_a.path)  # a stale edit
    assert rc == 1 and "changed since revision" in err, err

    rc, out, err = await acli("fleet", "status", home=home_a.path)
    assert rc == 0, err
    status_doc = json.loads(out)
    assert status_doc["fleetSize"] == 2 and len(status_doc["processes"]) == 3  # proxy a has two workers
    assert DSN_PASSWORD not in out + err

    b.stop()  # a clean stop leaves the fleet at once
    stopped = time.monotonic()
    await wait_for(lambda: _fleet_size_is(client_for(session, a, akid, secret), 1), timeout=3)
    assert time.monotonic() - stopped < 3


async def _encrypt_ok(client: Client, key_id: str) -> bool:
    return (await client.encrypt(key_id, b"ok"))[0] == 200


async def _status_is(client: Client, expected: int) -> bool:
    status, _ = await client.call("health", requestMetadata=HEALTH_META)
    return status == expected


async def _fleet_size_is(client: Client, n: int) -> bool:
    return (await health(client))["xksProxyFleetSize"] == n


async def test_encryption_limit_holds_across_two_proxies(
    tmp_path: Path, pg_database: tuple[Cluster, str, str], proxies: Any, session: ClientSession
) -> None:
    """Both proxies (two workers each) encrypt at once under small blocks: no version ever exceeds the limit."""
    _, _, dsn = pg_database
    home_a = pg_home(tmp_path / "a", dsn, rotate_after_encryptions=40, count_block=6)
    home_a.create_key("foo")
    home_b = copy_home(home_a, tmp_path / "b")
    a, b = proxies(home_a, workers=2), proxies(home_b, workers=2)
    await a.wait_serving()
    await b.wait_serving()
    clients = [client_for(session, a), client_for(session, b)]
    results = await asyncio.gather(*(clients[i % 2].encrypt("foo", b"n%d" % i) for i in range(240)))
    assert all(status == 200 for status, _ in results), Counter(status for status, _ in results)
    per_version = Counter(version_of(enc) for _, enc in results)
    assert max(per_version.values()) <= 40, per_version
    assert len(per_version) >= 6  # 240 encryptions at <= 40 per version: rotated, once each time
    for i, (_, enc) in enumerate(results[:20]):
        status, body = await clients[(i + 1) % 2].decrypt("foo", enc)  # through the other proxy
        assert status == 200 and unb64(body["plaintext"]) == b"n%d" % i
    a.stop()
    b.stop()
    rc, out, err = await acli("keys", "versions", "foo", "--json", home=home_a.path)
    assert rc == 0, err
    reserved = {v["version"]: v["encryptionsReserved"] for v in json.loads(out)["versions"]}
    assert all(n <= 40 for n in reserved.values()), reserved
    assert {v: n for v, n in reserved.items() if n} == dict(per_version)  # exact after clean stops


async def test_database_stopped_mid_traffic_then_started_again(
    tmp_path: Path, pg_database: tuple[Cluster, str, str], proxies: Any, session: ClientSession
) -> None:
    """No request for a loaded key fails while PostgreSQL is down; a proxy started meanwhile waits; nothing is lost."""
    cluster, _, dsn = pg_database
    home_a = pg_home(tmp_path / "a", dsn)
    patch_config(home_a.path, fleet={"heartbeat_seconds": 0.3})
    home_a.create_key("foo")
    home_b, home_c = copy_home(home_a, tmp_path / "b"), copy_home(home_a, tmp_path / "c")
    a, b = proxies(home_a), proxies(home_b)
    await a.wait_serving()
    await b.wait_serving()
    clients = [client_for(session, a), client_for(session, b)]
    made: list[tuple[bytes, dict[str, Any]]] = []
    failures: list[Any] = []
    running = True

    async def traffic(client: Client, other: Client) -> None:
        n = 0
        while running:
            plaintext = b"%d-%d" % (id(client), n)
            status, enc = await client.encrypt("foo", plaintext)
            if status != 200:
                failures.append(("encrypt", status, enc))
                continue
            made.append((plaintext, enc))
            status, body = await other.decrypt("foo", enc)
            if status != 200 or unb64(body["plaintext"]) != plaintext:
                failures.append(("decrypt", status, body))
            n += 1

    workers = [asyncio.create_task(traffic(clients[i], clients[1 - i])) for i in range(2)]
    try:
        await asyncio.sleep(0.5)
        before_outage = len(made)
        await asyncio.to_thread(cluster.stop, "fast")
        await wait_for(lambda: _states_are(clients[0], ["DEGRADED", "UNAVAILABLE"]), timeout=5)
        rc, out, err = await acli("keys", "disable", "foo", home=home_a.path)
        assert rc == 1 and err.count("\n") == 1 and "unreachable" in err and DSN_PASSWORD not in err, err
        c = proxies(home_c)  # a proxy started while the database is down says why, once, and waits
        await wait_for(lambda: _log_has(c, "cannot start serving yet"), timeout=10)
        await asyncio.sleep(1.0)
        assert not c.listening() and c.proc is not None and c.proc.poll() is None
        during_outage = len(made) - before_outage
        await asyncio.to_thread(cluster.start)
        await c.wait_serving()
        for client in clients:
            await wait_for(lambda: _states_are(client, ["ACTIVE", "ACTIVE"]), timeout=5)
        await asyncio.sleep(0.3)
    finally:
        running = False
        await asyncio.gather(*workers)
    assert failures == []
    assert during_outage > 20 and len(made) > during_outage + before_outage
    assert c.log.read_text().count("cannot start serving yet") == 1
    via_c = client_for(session, c)
    for plaintext, enc in made[:: max(1, len(made) // 50)]:  # a proxy that loaded after the restart reads them all
        status, body = await via_c.decrypt("foo", enc)
        assert status == 200 and unb64(body["plaintext"]) == plaintext
    rc, out, err = await acli("keys", "disable", "foo", home=home_b.path)  # lifecycle works again...
    assert rc == 0, err
    disabled = time.monotonic()
    await propagated(lambda: _encrypt_refused(clients[0]), disabled)  # ...and reaches every proxy
    await wait_for(lambda: _fleet_size_is(clients[0], 3), timeout=3)
    b.stop(signal.SIGKILL)  # no goodbye: it drops out after 3 missed heartbeats
    await wait_for(lambda: _fleet_size_is(clients[0], 2), timeout=3)


async def _states_are(client: Client, states: list[str]) -> bool:
    return [d["healthStatus"] for d in (await health(client))["ekmFleetDetails"]] == states


async def _encrypt_refused(client: Client) -> bool:
    status, body = await client.encrypt("foo", b"x")
    return status == 400 and body["errorName"] == "InvalidStateException"


async def _log_has(proxy: Proxy, text: str) -> bool:
    return text in proxy.log.read_text()


def test_config_with_stores_and_dsn_points_at_fleet_init(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    _, _, dsn = pg_database
    home = pg_home(tmp_path / "a", dsn)
    raw = configmod.read_raw(home.path)
    assert "stores" not in raw and raw["vault"]["dsn_file"].endswith("a.dsn")
    patch_config(home.path, stores={})  # someone puts [stores] back into config.toml
    with pytest.raises(configmod.ConfigError, match="fleet init"):
        configmod.load(home.path)
