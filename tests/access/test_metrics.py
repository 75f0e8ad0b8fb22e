"""Prometheus metrics, scraped over HTTP from their own listener after real traffic."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any


from tests.conftest import Home, metadata
from tests.support.proxy import Pki, client_for, edit_config, eventually, running, scrape, value


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

