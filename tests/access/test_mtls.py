"""Mutual TLS on the real listener (runner.start): who gets in, who is refused where, and reload."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.certs import CA, Leaf
from tests.conftest import Home, need, unb64
from tests.support.proxy import KMS_NAME, Pki, client_for, edit_config, eventually, running
from xks_proxy import config as configmod
from xks_proxy.config import ConfigError
from xks_proxy.process.worker import start

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


async def test_largest_requests_on_many_connections_at_once_arrive_intact(home: Home, pki: Pki) -> None:
    """Every TLS connection of a worker reads the socket into one shared 16 KiB buffer (tls_transport's
    `_LeanSslProtocol`, issue 16): requests of ~22 KB (8 KiB plaintext and 8 KiB AAD, base64) take
    several reads each, on 24 connections (TLS 1.3 and 1.2) in flight together. A byte taken from
    another connection's read would fail a signature, the JSON or the decryption."""
    async with running(home.path) as proxy:

        async def round_trips(index: int) -> None:
            async with client_for(home, proxy, pki.context(pki.kms, tls12=index % 2 == 1)) as client:
                for attempt in range(3):
                    plaintext, aad = os.urandom(8192), os.urandom(8192)
                    status, enc = await client.encrypt("foo", plaintext, aad=aad)
                    assert status == 200, (index, attempt, enc)
                    status, dec = await client.decrypt("foo", enc, aad=aad)
                    assert status == 200 and unb64(dec["plaintext"]) == plaintext, (index, attempt, dec)

        await asyncio.gather(*(round_trips(i) for i in range(24)))


def _slow_client_ping(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect, say nothing for a while, then send the ClientHello in two pieces, finish the handshake and ping."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        time.sleep(0.3)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outgoing.read()
        sock.sendall(hello[:1])
        time.sleep(0.3)
        sock.sendall(hello[1:])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536) or b"")
        tls.write(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while not answer.endswith(b"OK\n"):
            data = sock.recv(65536)
            assert data, answer
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        return answer


async def test_a_client_slow_to_send_its_hello_is_served(home: Home, pki: Pki) -> None:
    """The server takes its first handshake step when the client's first bytes arrive, not at accept
    (tls_transport's `_LeanSslProtocol._do_handshake`, issue 16): a ClientHello late and in pieces still works."""
    async with running(home.path) as proxy:
        for tls12 in (False, True):
            answer = await asyncio.to_thread(_slow_client_ping, proxy.port, pki.context(pki.kms, tls12=tls12))
            assert answer.startswith(b"HTTP/1.1 200"), answer


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


async def test_chaining_certificate_with_another_name_is_refused_in_the_handshake(
    home: Home, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    # The CN is the right name, but the SAN's DNS name decides when there is one.
    impostor = pki.client_ca.leaf(dns=("evil.example",), cn=KMS_NAME)
    async with running(home.path) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=pki.context(impostor))
        writer.write(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        with pytest.raises(ssl.SSLError, match="ALERT_BAD_CERTIFICATE"):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        async with client_for(home, proxy, pki.context(impostor)) as client:
            with pytest.raises(aiohttp.ClientError):
                await client.encrypt("foo", b"never processed")
    messages = [r.getMessage() for r in caplog.records if r.name == "xks_proxy.tls"]
    assert len(messages) == 2, messages
    assert all("TLS handshake from 127.0.0.1" in m and "'evil.example'" in m and KMS_NAME in m for m in messages), messages
    assert access_records(caplog) == []


# --- TLS alerts: a refused client learns why -------------------------------------------------

#: case -> (client certificate, the alert a TLS 1.2 client gets, the one a TLS 1.3 client gets)
ALERTS: dict[str, tuple[Callable[[Pki], Leaf | None], str, str]] = {
    "no certificate": (lambda pki: None, "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    "unknown CA": (lambda pki: CA("rogue CA").leaf(dns=(KMS_NAME,)), "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_UNKNOWN_CA"),
    "expired": (
        lambda pki: pki.client_ca.leaf(dns=(KMS_NAME,), expired=True),
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    ),
    # OpenSSL 3.0 maps no verification error to access_denied; a name mismatch is bad_certificate.
    "another name": (lambda pki: pki.client_ca.leaf(dns=("evil.example",)), "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_BAD_CERTIFICATE"),
}
REPEAT = 20


def _alert_received(port: int, ctx: ssl.SSLContext) -> str:
    """What a client that sends its request at once (as KMS does) learns: the alert's reason."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")  # TLS 1.3: the handshake is done for the client
            answer = tls.recv(1024)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return f"no alert: {exc!r}"
    return f"no alert: answered {answer[:20]!r}"


@pytest.mark.parametrize("case", ALERTS, ids=list(ALERTS))
async def test_every_refusal_sends_an_alert_naming_the_reason(
    home: Home, pki: Pki, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    make_leaf, alert12, alert13 = ALERTS[case]
    leaf = make_leaf(pki)
    async with running(home.path) as proxy:
        for tls12, alert in ((True, alert12), (False, alert13)):
            ctx = pki.context(leaf, tls12=tls12)
            got = [await asyncio.to_thread(_alert_received, proxy.port, ctx) for _ in range(REPEAT)]
            assert got == [alert] * REPEAT, (tls12, got)
    refusals = [r for r in caplog.records if r.name == "xks_proxy.tls"]
    assert len(refusals) == 2 * REPEAT, [r.getMessage() for r in refusals]
    assert {r.levelno for r in refusals} == {logging.INFO}, "every refusal at one level"
    assert all(r.getMessage().startswith("TLS handshake from 127.0.0.1:") for r in refusals)
    assert access_records(caplog) == []


OPENSSL_ALERTS = {
    "no certificate": ("sslv3 alert handshake failure", "tlsv13 alert certificate required"),
    "unknown CA": ("tlsv1 alert unknown ca", "tlsv1 alert unknown ca"),
    "expired": ("sslv3 alert certificate expired", "sslv3 alert certificate expired"),
    "another name": ("sslv3 alert bad certificate", "sslv3 alert bad certificate"),
}


async def s_client(port: int, ca: Path, *args: str) -> str:
    """`openssl s_client` sending a request at once; its whole output (alerts, the suite negotiated)."""
    openssl = need("openssl")
    cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-ign_eof", *args]
    done = await asyncio.to_thread(
        subprocess.run, cmd, input=b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=20,
    )  # fmt: skip
    return (done.stdout + done.stderr).decode(errors="replace")


async def test_openssl_s_client_names_the_alert(home: Home, pki: Pki, tmp_path: Path) -> None:
    ca = tmp_path / "server-ca.pem"
    ca.write_bytes(pki.server_ca.pem)
    async with running(home.path) as proxy:
        for case, alerts in OPENSSL_ALERTS.items():
            leaf = ALERTS[case][0](pki)
            cert = [] if leaf is None else ["-cert", str(leaf.write(tmp_path, case.replace(" ", "-"))[0]), "-key", str(tmp_path / f"{case.replace(' ', '-')}.key")]
            for version, alert in zip(("-tls1_2", "-tls1_3"), alerts):
                out = await s_client(proxy.port, ca, version, *cert)
                assert alert in out and "HTTP/1.1 200" not in out, (case, version, out)
        cert, key = pki.kms.write(tmp_path, "kms")
        for version in ("-tls1_2", "-tls1_3"):
            out = await s_client(proxy.port, ca, version, "-cert", str(cert), "-key", str(key))
            assert "HTTP/1.1 200" in out and "alert" not in out, out


async def test_resumed_session_is_still_checked_against_the_names_now_allowed(home: Home, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A resumed TLS session verifies no certificate: the check after the handshake covers it."""
    caplog.set_level(logging.INFO, logger="xks_proxy")

    def ping(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as tls:
            tls.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            try:
                answer = tls.recv(1024)
            except (ssl.SSLError, OSError):
                answer = b""
            return answer, tls.session, tls.session_reused

    ctx = pki.context(pki.kms)
    async with running(home.path, reload_interval=0.1) as proxy:
        answer, session, _ = await asyncio.to_thread(ping, proxy.port, ctx, None)
        assert answer.startswith(b"HTTP/1.1 200") and session is not None
        edit_config(home.path, lambda raw: raw["tls"].update(client_names=["xks-client.bank.example"]))
        await eventually(lambda: asyncio.to_thread(lambda: not ping(proxy.port, ctx, None)[0]), what="the name is refused")
        answer, _, reused = await asyncio.to_thread(ping, proxy.port, ctx, session)
        assert reused and answer == b"", "a resumed session of a name no longer allowed gets no answer"
    assert any("closed before any request" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


# --- suites: exactly the specification's, on both listeners ----------------------------------

#: (openssl s_client arguments, the suite negotiated or None when the handshake must fail)
SUITES: list[tuple[tuple[str, ...], str | None]] = [
    (("-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"), "TLS_AES_256_GCM_SHA384"),
    (("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"), "TLS_CHACHA20_POLY1305_SHA256"),
    (("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"), None),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"), "ECDHE-ECDSA-AES256-GCM-SHA384"),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), None),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"), None),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"), None),  # CBC
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA"), None),  # CBC, SHA-1
    (("-tls1_1", "-cipher", "ALL:@SECLEVEL=0"), None),
]
RSA_SUITES: list[tuple[tuple[str, ...], str | None]] = [
    (("-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"), "ECDHE-RSA-AES256-GCM-SHA384"),
    (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), None),
    (("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"), None),
    (("-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA384"), None),
    (("-tls1_2", "-cipher", "AES256-GCM-SHA384"), None),  # no forward secrecy
]


async def _check_suites(port: int, ca: Path, cases: list[tuple[tuple[str, ...], str | None]]) -> None:
    for args, expected in cases:
        out = await s_client(port, ca, *args)
        negotiated = re.search(r"Cipher is (\S+)", out)
        got = negotiated.group(1) if negotiated and negotiated.group(1) != "(NONE)" else None
        assert got == expected, (args, out)
        assert ("HTTP/1.1 200" in out) == (expected is not None), (args, out)


def _python_suite(port: int, ca: Path, tls12_cipher: str | None) -> tuple[str, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if tls12_cipher:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(tls12_cipher)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        name, version, _ = tls.cipher()  # type: ignore[misc]
        return name, version


async def test_xks_listener_offers_exactly_the_spec_suites(home: Home, pki: Pki, tmp_path: Path) -> None:
    edit_config(home.path, lambda raw: raw.pop("tls"))  # plain TLS: s_client needs no client certificate
    ca = tmp_path / "server-ca.pem"
    ca.write_bytes(pki.server_ca.pem)
    async with running(home.path) as proxy:
        await _check_suites(proxy.port, ca, SUITES)
        # Python's client (OpenSSL defaults, as most clients): TLS 1.3 with the server's first choice.
        assert await asyncio.to_thread(_python_suite, proxy.port, ca, None) == ("TLS_AES_256_GCM_SHA384", "TLSv1.3")
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            await asyncio.to_thread(_python_suite, proxy.port, ca, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305")
    pki.install_server_cert(pki.server_ca.leaf(dns=("localhost",), client=False, ip=True, rsa_key=True))
    async with running(home.path) as proxy:  # an RSA certificate, as many public CAs issue
        await _check_suites(proxy.port, ca, RSA_SUITES)
        assert await asyncio.to_thread(_python_suite, proxy.port, ca, "ECDHE-RSA-AES256-GCM-SHA384") == (
            "ECDHE-RSA-AES256-GCM-SHA384", "TLSv1.2",
        )  # fmt: skip


async def test_admin_listener_offers_the_same_suites(home: Home, pki: Pki, tmp_path: Path) -> None:
    (home.path / "admin-jwt.secret").write_text("x" * 64 + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    admin = {
        "enabled": True, "host": "127.0.0.1", "port": admin_port, "tls_cert": "server-cert.pem", "tls_key": "server-key.pem",
        "jwt": {"audience": "a", "issuer": "i", "hs256_secret_file": "admin-jwt.secret"},
    }  # fmt: skip
    edit_config(home.path, lambda raw: raw.update(admin=admin))
    ca = tmp_path / "server-ca.pem"
    ca.write_bytes(pki.server_ca.pem)
    async with running(home.path):
        # The admin API answers 401 to /ping without a token; what counts here is the suite.
        for args, expected in SUITES:
            out = await s_client(admin_port, ca, *args)
            negotiated = re.search(r"Cipher is (\S+)", out)
            got = negotiated.group(1) if negotiated and negotiated.group(1) != "(NONE)" else None
            assert got == expected, (args, out)


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
