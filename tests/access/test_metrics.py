"""Prometheus metrics, scraped over HTTP from their own listener after real traffic."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import ssl
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from keymanager.base import iso_time
from keymanager.vault.model import MAX_ENCRYPTIONS
from tests.conftest import Home, metadata
from tests.keymanager.vault.test_byok import get_params, import_material, wrap_oaep256
from tests.keymanager.vault.test_usage_counts import _reserved
from tests.support.lifecycle import cli_json, patch_config
from tests.support.fleet import Proxy, free_port, pg_home
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401 (fixtures)
from tests.support.proxy import Pki, cli, client_for, edit_config, eventually, running, scrape, value

DAY = 86400.0


async def test_metrics_are_off_by_default(home: Home) -> None:
    async with running(home.path, plain_http=True) as proxy:
        assert proxy.metrics_port is None


async def test_scrape_after_traffic(home: Home) -> None:
    pki = Pki(home.path)
    home.create_key("blocked")

    def configure(raw: dict[str, Any]) -> None:
        pki.configure(raw)
        raw["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
        raw["stores"][0]["throttle"] = {"rate": 0.001, "burst": 8}
        raw["stores"][0]["policy"] = [{"name": "no-blocked", "effect": "deny", "keys": "blocked"}]

    edit_config(home.path, configure)
    async with running(home.path, reload_interval=0.1) as proxy, client_for(home, proxy, pki.context(pki.kms)) as client:
        assert proxy.metrics_port is not None and proxy.metrics_port != proxy.port
        statuses = []
        for _ in range(4):
            status, enc = await client.encrypt("foo", b"counted")
            statuses.append(status)
        statuses.append((await client.decrypt("foo", enc))[0])
        statuses.append((await client.call("metadata", "foo", requestMetadata=metadata("CreateKey")))[0])
        statuses.append((await client.encrypt("blocked", b"x"))[0])
        for _ in range(3):
            statuses.append((await client.encrypt("foo", b"late"))[0])
        statuses.append((await client.call("health", requestMetadata={"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}))[0])
        assert statuses == [200] * 6 + [403, 200, 429, 429, 200]

        # Refused TLS clients: no certificate, and a chaining certificate with another name.
        for leaf in (None, pki.client_ca.leaf(dns=("evil.example",))):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(leaf, tls12=True))
                await asyncio.sleep(0)
                writer.close()
            except (ssl.SSLError, ConnectionError):
                pass

        # The XKS listener does not serve metrics.
        status, _, _ = await client.post_raw("/metrics", b"{}")
        assert status == 404

        async def refusals_counted() -> bool:
            s = await scrape(proxy.metrics_port)  # type: ignore[arg-type]
            return value(s, "xks_tls_refused_total", reason="handshake") == 1 and value(
                s, "xks_tls_refused_total", reason="client_name"
            ) == 1

        await eventually(refusals_counted, what="TLS refusals counted")
        s = await scrape(proxy.metrics_port)
        requests = "xks_requests_total"
        assert value(s, requests, store="test", operation="encrypt", outcome="OK") == 5
        assert value(s, requests, store="test", operation="encrypt", outcome="AccessDeniedException") == 1
        assert value(s, requests, store="test", operation="encrypt", outcome="ThrottlingException") == 2
        assert value(s, requests, store="test", operation="decrypt", outcome="OK") == 1
        assert value(s, requests, store="test", operation="metadata", outcome="OK") == 1
        assert value(s, requests, store="test", operation="health", outcome="OK") == 1
        assert value(s, requests, store="-", operation="-", outcome="InvalidUriPathException") == 1
        assert value(s, "xks_request_duration_seconds_count", operation="encrypt") == 8
        assert value(s, "xks_keymanager_duration_seconds_count", operation="encrypt") == 5
        assert value(s, "xks_keymanager_duration_seconds_count", operation="decrypt") == 1
        assert value(s, "xks_keymanager_duration_seconds_count", operation="health") == 1
        assert value(s, "xks_throttled_total", store="test", reason="rate") == 2
        assert value(s, "xks_denied_total", store="test", rule="no-blocked") == 1
        health = [v for (name, _), v in s.items() if name == "xks_keymanager_health"]
        assert health and all(v == 2 for v in health), health  # ACTIVE, for each key manager entry
        # The vault counts AES-GCM invocations; an HSM makes its own IVs, so pkcs11 has no sample.
        assert (value(s, "xks_key_gcm_invocations_ratio") is None) == (home.backend == "pkcs11")
        server_days = value(s, "xks_tls_certificate_expiry_days", certificate="server")
        assert server_days is not None and 9.9 < server_days <= 10.0
        ca_days = value(s, "xks_tls_certificate_expiry_days", certificate="client_ca:client CA")
        assert ca_days is not None and 29.9 < ca_days <= 30.0

        # Reloads are counted too.
        edit_config(home.path, lambda raw: raw["stores"][0].update(policy=[]))

        async def reload_counted() -> bool:
            return value(await scrape(proxy.metrics_port), "xks_reloads_total", what="config", result="ok") == 1  # type: ignore[arg-type]

        await eventually(reload_counted, what="config reload counted")
        # A reload that leaves a store's quota alone keeps its bucket: still spent, not refilled.
        assert (await client.encrypt("foo", b"x"))[0] == 429



@asynccontextmanager
async def served_with_metrics(home: Home, tmp_path: Path) -> AsyncIterator[int]:
    """`xks-proxy serve --workers 2`: the supervisor, its workers, the sidecar serving metrics; yields the metrics port.

    (One worker on a file seal serves in-process, process/worker.py, and does not report credential age.)
    """
    port = free_port()
    edit_config(home.path, lambda raw: raw.update(metrics={"enabled": True, "host": "127.0.0.1", "port": port}))
    proxy = Proxy(home, free_port(), tmp_path / "serve.log").start(workers=2)
    try:
        await proxy.wait_serving()

        async def answers() -> bool:  # the sidecar's listener
            try:
                return bool(await scrape(port))
            except aiohttp.ClientError:
                return False

        await eventually(answers, deadline=15, what="the sidecar serves metrics")
        yield port
    finally:
        proxy.stop()


@pytest.mark.vault_only
async def test_served_proxy_reports_credential_age(home: Home, tmp_path: Path) -> None:
    """KMS's XksProxyCredentialAge, from a real `serve` at scrape time: N days after it was made, ~N."""
    added = cli(home.path, "credentials", "add")
    assert added.returncode == 0, added.stderr
    new_akid = re.search(r"access key id:\s+(\S+)", added.stdout)[1]  # type: ignore[index]

    def configure(raw: dict[str, Any]) -> None:
        first = raw["stores"][0]["credentials"][0]
        assert first["access_key_id"] == home.access_key_id  # made by init (which records it now: backdated here)
        first["created_at"] = iso_time(time.time() - 40 * DAY)

    edit_config(home.path, configure)
    async with served_with_metrics(home, tmp_path) as port:
        s = await scrape(port)
        old_age = value(s, "xks_proxy_credential_age_days", store="test", access_key_id=home.access_key_id)
        new_age = value(s, "xks_proxy_credential_age_days", store="test", access_key_id=new_akid)
        assert old_age is not None and 39.99 < old_age < 40.01, old_age
        assert new_age is not None and 0 <= new_age < 0.01, new_age  # `credentials add` recorded when

        # Rotation's last step: the old credential goes, and with it its age (no restart).
        removed = cli(home.path, "credentials", "remove", home.access_key_id)
        assert removed.returncode == 0, removed.stderr
        ages = {dict(labels)["access_key_id"] for (name, labels) in await scrape(port) if name == "xks_proxy_credential_age_days"}
        assert ages == {new_akid}


@pytest.mark.vault_only
async def test_fleet_database_up_follows_the_database(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    """xks_vault_database_up: 1 while the shared vault answers, 0 once it refuses connections, 1 again after."""
    cluster, name, dsn = pg_database
    home = pg_home(tmp_path / "a", dsn)
    edit_config(home.path, lambda raw: raw.update(metrics={"enabled": True, "host": "127.0.0.1", "port": 0}))
    database = f"postgres@127.0.0.1:{cluster.port}/{name}"
    async with running(home.path, plain_http=True) as proxy:
        port = proxy.metrics_port
        assert port is not None

        def database_up(up: float) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return value(await scrape(port), "xks_vault_database_up", database=database) == up

            return check

        await eventually(database_up(1), deadline=10, what="database up")
        cluster.set_connectable(name, False)
        try:
            await eventually(database_up(0), deadline=15, what="database down reported")
        finally:
            cluster.set_connectable(name, True)
        await eventually(database_up(1), deadline=15, what="database up again")


@pytest.mark.vault_only
async def test_gcm_invocations_ratio_reaches_one_with_imported_material(home: Home, tmp_path: Path) -> None:
    """xks_key_gcm_invocations_ratio is the vault's reserved count over 2^32 for the most used key.

    Imported material cannot be rotated, so it is the key that reaches NIST SP 800-38D's limit.
    2^32 encryptions cannot run in a test: with the proxy stopped, the vault's stored count of
    the imported key is set as a long service would have left it, six short of the limit. The
    gauge must report that history at start (this process did none of it), then exactly 1.0
    once six signed encrypts have used the rest, when the next encrypt is refused.
    """
    assert cli_json("keys", "create", "ext", "--no-material", home=home.path)["keyStatus"] == "PENDING_IMPORT"
    params = tmp_path / "params"
    get_params(home, "ext", params, "RSAES_OAEP_SHA_256")
    wrap_oaep256(params, os.urandom(32))
    imported = import_material(home, "ext", params)
    assert imported.returncode == 0, imported.stderr
    history = MAX_ENCRYPTIONS - 6
    with sqlite3.connect(home.path / "vault.db") as conn:
        conn.execute("UPDATE key_versions SET reserved = ? WHERE key_id = 'ext'", (history,))
    conn.close()
    assert _reserved(home, "ext") == {1: history}
    patch_config(home.path, vault={"count_block": 4}, metrics={"enabled": True, "host": "127.0.0.1", "port": 0})

    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as client:
        port = proxy.metrics_port
        assert port is not None

        def ratio_is(expected: float) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return value(await scrape(port), "xks_key_gcm_invocations_ratio") == expected

            return check

        # The imported key's history, not the vault key "foo" (0 reserved): the highest wins.
        await eventually(ratio_is(history / MAX_ENCRYPTIONS), deadline=10, what="the stored count reported")
        for i in range(6):
            assert (await client.encrypt("ext", b"n%d" % i))[0] == 200
        status, body = await client.encrypt("ext", b"one too many")
        assert (status, body["errorName"]) == (400, "InvalidStateException")
        assert _reserved(home, "ext") == {1: MAX_ENCRYPTIONS}
        await eventually(ratio_is(1.0), deadline=10, what="the limit reported")
        versions = cli_json("keys", "versions", "ext", "--json", home=home.path)["versions"]
        assert [v["encryptionsReserved"] for v in versions] == [MAX_ENCRYPTIONS]
