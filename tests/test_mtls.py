"""Mutual TLS on the real listener (runner.start): who gets in, who is refused where, and reload."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.certs import CA
from tests.conftest import Home, unb64
from tests.proxy import KMS_NAME, Pki, client_for, edit_config, eventually, running
from xks_proxy import config as configmod
from xks_proxy.config import ConfigError
from xks_proxy.process.runner import start

# TLS is the same whatever the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only


@pytest.fixture
def pki(home: Home) -> Pki:
    pki = Pki(home.path)
    edit_config(home.path, pki.configure)
    return pki


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xks_proxy.access"]


async def test_kms_certificate_gets_requests_served(home: Home, pki: Pki) -> None:
    async with running(home.path) as proxy, client_for(home, proxy, pki.context(pki.kms)) as client:
        status, enc = await client.encrypt("foo", b"over mutual TLS", aad=b"ctx")
        assert status == 200, enc
        status, dec = await client.decrypt("foo", enc, aad=b"ctx")
        assert status == 200 and unb64(dec["plaintext"]) == b"over mutual TLS"


async def test_common_name_is_the_fallback_when_there_is_no_dns_name(home: Home, pki: Pki) -> None:
    cn_only = pki.client_ca.leaf(cn=KMS_NAME)
    async with running(home.path) as proxy, client_for(home, proxy, pki.context(cn_only)) as client:
        status, body = await client.call("health", requestMetadata={"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"})
        assert status == 200, body


REFUSED_IN_HANDSHAKE = {
    "no certificate": (lambda pki: None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    "expired": (lambda pki: pki.client_ca.leaf(dns=(KMS_NAME,), expired=True), "certificate has expired"),
    "not chaining to the client CA": (lambda pki: CA("rogue CA").leaf(dns=(KMS_NAME,)), "CERTIFICATE_VERIFY_FAILED"),
}


@pytest.mark.parametrize("case", REFUSED_IN_HANDSHAKE, ids=list(REFUSED_IN_HANDSHAKE))
async def test_refused_in_the_handshake(home: Home, pki: Pki, caplog: pytest.LogCaptureFixture, case: str) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    make_leaf, reason = REFUSED_IN_HANDSHAKE[case]
    leaf = make_leaf(pki)
    async with running(home.path) as proxy:
        # Over TLS 1.2 the refusal arrives inside the handshake, before the client can send a byte
        # (as an alert, or as the connection closing under it).
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(leaf, tls12=True))
        # Over TLS 1.3 (what KMS negotiates) the client learns it on its first read: no answer.
        async with client_for(home, proxy, pki.context(leaf)) as client:
            with pytest.raises(aiohttp.ClientError):
                await client.encrypt("foo", b"never processed")
    refusals = [r.getMessage() for r in caplog.records if "TLS handshake from 127.0.0.1" in r.getMessage()]
    assert refusals and all(reason in m for m in refusals), refusals
    assert access_records(caplog) == [], "no request may reach the server"


async def test_chaining_certificate_with_another_name_is_cut_before_any_request(
    home: Home, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    # The CN is the right name, but the SAN's DNS name decides when there is one.
    impostor = pki.client_ca.leaf(dns=("evil.example",), cn=KMS_NAME)
    async with running(home.path) as proxy:
        # The handshake itself succeeds (the certificate chains), then the connection is cut unread.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(impostor))
        writer.write(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except (ConnectionResetError, ssl.SSLError):
            answer = b""
        writer.close()
        assert answer == b"", "a refused client must get no HTTP answer"
        async with client_for(home, proxy, pki.context(impostor)) as client:
            with pytest.raises(aiohttp.ClientError):
                await client.encrypt("foo", b"never processed")
    messages = [r.getMessage() for r in caplog.records if r.name == "xks_proxy.tls"]
    assert any("'evil.example'" in m and "closed before any request" in m and KMS_NAME in m for m in messages), messages
    assert access_records(caplog) == []


async def test_allowed_names_are_configurable_and_reload(home: Home, pki: Pki) -> None:
    bank = pki.client_ca.leaf(dns=("xks-client.bank.example",))
    async with running(home.path, reload_interval=0.1) as proxy:

        async def works(leaf) -> bool:  # type: ignore[no-untyped-def]
            async with client_for(home, proxy, pki.context(leaf)) as client:
                try:
                    status, _ = await client.call("health", requestMetadata={"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"})
                except aiohttp.ClientError:
                    return False
                return status == 200

        assert await works(pki.kms) and not await works(bank)
        edit_config(home.path, lambda raw: raw["tls"].update(client_names=["xks-client.bank.example"]))
        await eventually(lambda: works(bank), what="the new allowed name is accepted")
        assert not await works(pki.kms)


async def _served_serial(port: int, pki: Pki) -> int:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.context(pki.kms))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"OK\n"), 5)
    return answer.startswith(b"HTTP/1.1 200")


async def test_server_certificate_reloads_without_dropping_connections(
    home: Home, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    async with running(home.path, reload_interval=0.1) as proxy:
        first = await _served_serial(proxy.port, pki)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(pki.kms))
        assert await _ping(reader, writer)

        renewed = pki.server_ca.leaf(dns=("localhost",), client=False, ip=True)
        pki.install_server_cert(renewed)

        async def renewed_served() -> bool:
            return await _served_serial(proxy.port, pki) != first

        await eventually(renewed_served, what="the renewed certificate is served")
        second = await _served_serial(proxy.port, pki)
        assert await _ping(reader, writer), "a connection opened before the reload keeps working"

        # Broken replacements are refused; the certificate in service stays.
        other = pki.server_ca.leaf(dns=("localhost",), client=False, ip=True)
        expired = pki.server_ca.leaf(dns=("localhost",), client=False, ip=True, expired=True)
        broken = {
            "garbage": (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", renewed.key_pem),
            "key of another certificate": (renewed.cert_pem, other.key_pem),
            "expired": (expired.cert_pem, expired.key_pem),
        }
        for name, (cert_pem, key_pem) in broken.items():
            before = len([r for r in caplog.records if "TLS reload refused" in r.getMessage()])
            (home.path / "server-key.pem").write_bytes(key_pem)
            (home.path / "server-cert.pem").write_bytes(cert_pem)

            async def refused() -> bool:
                return len([r for r in caplog.records if "TLS reload refused" in r.getMessage()]) > before

            await eventually(refused, what=f"the {name} replacement is refused")
            assert await _served_serial(proxy.port, pki) == second, name
        assert "expired on" in caplog.text
        assert await _ping(reader, writer)
        writer.close()


async def test_client_ca_rotation_drops_the_old_ca(home: Home, pki: Pki) -> None:
    successor = CA("successor client CA")
    new_kms = successor.leaf(dns=(KMS_NAME,))
    async with running(home.path, reload_interval=0.1) as proxy:

        async def accepted(leaf) -> bool:  # type: ignore[no-untyped-def]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(leaf))
                ok = await _ping(reader, writer)
                writer.close()
                return ok
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                return False

        assert await accepted(pki.kms) and not await accepted(new_kms)
        (home.path / "client-ca.pem").write_bytes(successor.pem)
        await eventually(lambda: accepted(new_kms), what="the new client CA is trusted")
        assert not await accepted(pki.kms), "a CA removed from the bundle is no longer trusted"


def _encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"passphrase")
    )


@pytest.mark.parametrize("problem", ["key of another certificate", "encrypted key"])
async def test_unservable_certificate_stops_the_start(home: Home, pki: Pki, problem: str) -> None:
    key_path = home.path / "server-key.pem"
    if problem == "encrypted key":
        key_path.write_bytes(_encrypted(key_path.read_bytes()))
    else:
        key_path.write_bytes(pki.server_ca.leaf(client=False).key_pem)
    with pytest.raises(ConfigError, match="encrypted" if problem == "encrypted key" else "server certificate"):
        await start(configmod.load(home.path), port=0)
