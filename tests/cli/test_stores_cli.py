"""`credentials` and `stores` commands (real subprocesses) against a running proxy that picks them up."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from typing import Any

import pytest

from tests.conftest import Client, Home
from tests.support.proxy import cli, client_for, edit_config, eventually, running
from xks_proxy.cli.home import new_secret

# Stores and credentials live in config.toml whatever the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only

HEALTH = {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"}}


def printed(stdout: str, label: str) -> str:
    match = re.search(rf"^\s*{label}:\s+(\S+)$", stdout, re.M)
    assert match, stdout
    return match[1]


async def run_cli(home: Home, *args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    """The CLI in a thread, so the proxy on this event loop keeps serving meanwhile."""
    return await asyncio.to_thread(cli, home.path, *args, stdin=stdin)


async def status_of(client: Client) -> int:
    status, _ = await client.call("health", **HEALTH)
    return status


async def test_rotation_add_export_remove_without_restart(home: Home) -> None:
    edit_config(home.path, lambda raw: raw.update(custom_extension={"owner": "platform team", "levels": [1, 2]}))
    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as old:
        failures: list[Any] = []
        served = 0
        stop = asyncio.Event()

        async def steady_traffic() -> None:
            nonlocal served
            while not stop.is_set():
                status, body = await old.encrypt("foo", b"steady")
                served += 1
                if status != 200:
                    failures.append((status, body))

        traffic = asyncio.create_task(steady_traffic())
        added = await run_cli(home, "credentials", "add")
        assert added.returncode == 0, added.stderr
        akid, secret = printed(added.stdout, "access key id"), printed(added.stdout, "secret access key")
        assert secret not in (home.path / "config.toml").read_text(), "secrets are stored sealed"

        listed = await run_cli(home, "credentials", "list")
        assert listed.stdout.split() == [home.access_key_id, akid]
        assert secret not in listed.stdout and home.secret not in listed.stdout

        exported = await run_cli(home, "stores", "export")
        assert json.loads(exported.stdout) == {
            "XksProxyUriPath": "/test/kms/xks/v1",
            "XksProxyAuthenticationCredential": {"AccessKeyId": akid, "RawSecretAccessKey": secret},
        }
        async with client_for(home, proxy, access_key_id=akid, secret=secret) as new:
            await eventually(lambda: _is(status_of(new), 200), deadline=2.0, what="the new credential is accepted")
            stop.set()
            await traffic
            assert served > 0 and failures == [], "the old credential kept working while the new one was added"

            removed = await run_cli(home, "credentials", "remove", home.access_key_id)
            assert removed.returncode == 0, removed.stderr
            await eventually(lambda: _is(status_of(old), 401), deadline=2.0, what="the removed credential is refused")
            assert await status_of(new) == 200

            last = await run_cli(home, "credentials", "remove", akid)
            assert last.returncode == 1 and "last credential" in last.stderr
            assert await status_of(new) == 200
    raw = tomllib.loads((home.path / "config.toml").read_text())
    assert raw["custom_extension"] == {"owner": "platform team", "levels": [1, 2]}, "unknown sections survive"
    audit_text = (home.path / "audit.log").read_text()
    changes = [r for r in map(json.loads, audit_text.splitlines()) if r.get("event") == "access-admin"]
    assert [(r["action"], r["accessKeyId"], r["store"]) for r in changes] == [
        ("credentials-add", akid, "test"),
        ("credentials-remove", home.access_key_id, "test"),
    ]
    assert all(r["actor"].startswith("cli:") and r["time"] for r in changes)
    leaked = secret in audit_text or home.secret in audit_text
    assert not leaked, "no secret in the audit log"


async def _is(call, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return await call == expected


async def test_add_a_given_credential_and_refuse_bad_ones(home: Home) -> None:
    akid, secret = "ABCDEFGHIJKLMNOPQRSTUVW234", new_secret()
    async with running(home.path, plain_http=True) as proxy:
        added = await run_cli(home, "credentials", "add", "--access-key-id", akid, "--secret-access-key-stdin", stdin=secret + "\n")
        assert added.returncode == 0, added.stderr
        assert secret not in added.stdout + added.stderr, "a secret the operator supplied is not echoed"
        async with client_for(home, proxy, access_key_id=akid, secret=secret) as client:
            await eventually(lambda: _is(status_of(client), 200), deadline=2.0, what="the given credential is accepted")

    bad_secret = "too-short-" + secret[:20]
    refusals = [
        (("--access-key-id", "lowercase-not-base32-id"), None, "--access-key-id"),
        (("--access-key-id", akid), None, "already a credential"),
        (("--secret-access-key-stdin",), bad_secret + "\n", "--secret-access-key-stdin"),
    ]
    for args, stdin, message in refusals:
        result = await run_cli(home, "credentials", "add", *args, stdin=stdin)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert bad_secret not in result.stdout + result.stderr
    listed = await run_cli(home, "credentials", "list")
    assert listed.stdout.split() == [home.access_key_id, akid]


async def test_concurrent_commands_do_not_lose_changes(home: Home) -> None:
    results = await asyncio.gather(*(run_cli(home, "credentials", "add") for _ in range(3)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    listed = await run_cli(home, "credentials", "list")
    assert len(listed.stdout.split()) == 4


async def test_stores_add_list_remove_in_a_running_proxy(home: Home) -> None:
    async with running(home.path, plain_http=True) as proxy:
        added = await run_cli(home, "stores", "add", "payments/eu", "--region", "eu-west-1", "--key-ids", "k1,k9")
        assert added.returncode == 0, added.stderr
        akid, secret = printed(added.stdout, "access key id"), printed(added.stdout, "secret access key")
        home.create_key("k1", store="payments/eu")
        home.create_key("k2", store="payments/eu")

        listed = await run_cli(home, "stores", "list")
        assert listed.stdout.splitlines() == [
            "/test/kms/xks/v1\tregions=us-east-1\tcredentials=1\tpolicy_rules=0\tkey_ids=all",
            "/payments/eu/kms/xks/v1\tregions=eu-west-1\tcredentials=1\tpolicy_rules=0\tkey_ids=k1,k9",
        ]
        assert secret not in listed.stdout

        async with client_for(home, proxy, access_key_id=akid, secret=secret, prefix="payments/eu") as client:
            client.region = "eu-west-1"
            await eventually(lambda: _is(status_of(client), 200), deadline=2.0, what="the new store answers")
            status, enc = await client.encrypt("k1", b"in the new store")
            assert status == 200, enc
            status, body = await client.encrypt("k2", b"not in its key_ids")
            assert (status, body["errorName"]) == (404, "KeyNotFoundException")
            with_store = await run_cli(home, "credentials", "list")
            assert with_store.returncode == 2 and "--store" in with_store.stderr
            exported = json.loads((await run_cli(home, "stores", "export", "payments/eu")).stdout)
            assert exported["XksProxyUriPath"] == "/payments/eu/kms/xks/v1"
            assert exported["XksProxyAuthenticationCredential"] == {"AccessKeyId": akid, "RawSecretAccessKey": secret}

            unconfirmed = await run_cli(home, "stores", "remove", "payments/eu")
            assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
            assert await status_of(client) == 200
            removed = await run_cli(home, "stores", "remove", "payments/eu", "--yes")
            assert removed.returncode == 0, removed.stderr

            async def gone() -> bool:
                status, body = await client.call("health", **HEALTH)
                return status == 404 and body["errorName"] == "InvalidUriPathException"

            await eventually(gone, deadline=2.0, what="the removed store is gone")

        duplicate = await run_cli(home, "stores", "add", "test", "--region", "us-east-1")
        assert duplicate.returncode == 1 and "already" in duplicate.stderr
        only = await run_cli(home, "stores", "remove", "test", "--yes")
        assert only.returncode == 1 and "only key store" in only.stderr
        bad = await run_cli(home, "stores", "add", "bad prefix!", "--region", "us-east-1")
        assert bad.returncode == 2 and "prefix" in bad.stderr
