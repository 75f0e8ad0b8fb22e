"""TLS probing: the proxy's versions, cipher suites and certificate, as KMS meets them.

Every probe is a real handshake (asyncio streams, so the tester never blocks an event loop it may
share with a server under test). Versions are probed one at a time with the widest cipher list
and security level 0, so an old-only server is seen as old-only, not as unreachable. TLS 1.3
suites cannot be restricted through Python's ssl module, so when the negotiated 1.3 suite is not
one KMS accepts, a hand-built ClientHello offering only KMS's suites asks the server directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
import struct
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from xks_proxy.conformance import outcomes
from xks_proxy.conformance.settings import Settings

KMS_TLS12_CIPHERS = ("ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384")
KMS_TLS13_SUITES = {0x1302: "TLS_AES_256_GCM_SHA384", 0x1303: "TLS_CHACHA20_POLY1305_SHA256"}
EXPIRY_WARNING_DAYS = 30

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    VERSIONS = (("TLS 1.0", ssl.TLSVersion.TLSv1), ("TLS 1.1", ssl.TLSVersion.TLSv1_1),
                ("TLS 1.2", ssl.TLSVersion.TLSv1_2), ("TLS 1.3", ssl.TLSVersion.TLSv1_3))


@dataclass
class Handshake:
    """The result of one TLS handshake attempt."""

    ok: bool
    version: str | None = None
    cipher: str | None = None
    der: bytes | None = None
    kind: str | None = None  # outcomes.UNREACHABLE / TIMEOUT / TLS on failure
    error: str = ""
    verify_code: int | None = None


def client_context(settings: Settings, *, verify: bool, check_name: bool = False) -> ssl.SSLContext:
    """A client context trusting --ca-bundle (else the system store), presenting the mTLS cert if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = verify and check_name
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if verify:
        if settings.ca_bundle:
            ctx.load_verify_locations(cafile=settings.ca_bundle)
        else:
            ctx.load_default_certs()
    if settings.client_cert:
        ctx.load_cert_chain(settings.client_cert, settings.client_key)
    return ctx


def verify_context(settings: Settings, version_name: str) -> ssl.SSLContext:
    """A verifying context pinned to a version the server speaks, so the certificate gets judged
    even on a server whose versions KMS refuses (that failure is reported separately)."""
    ctx = client_context(settings, verify=True)
    version = dict(VERSIONS)[version_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def probe_context(settings: Settings, version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
    """Unverified context pinned to one version; security level 0 so old versions can be seen at all."""
    ctx = client_context(settings, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    return ctx


async def tcp_connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return f"no TCP connection to {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    writer.transport.abort()
    return None


async def handshake(settings: Settings, ctx: ssl.SSLContext) -> Handshake:
    """One TLS handshake to the endpoint with `ctx`; never raises for network or TLS trouble."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port, ssl=ctx, server_hostname=settings.host),
            settings.timeout)
    except ssl.SSLCertVerificationError as exc:
        return Handshake(False, kind=outcomes.TLS, error=exc.verify_message or str(exc), verify_code=exc.verify_code)
    except ssl.SSLError as exc:
        return Handshake(False, kind=outcomes.TLS, error=exc.reason or str(exc))
    except (asyncio.TimeoutError, TimeoutError):
        return Handshake(False, kind=outcomes.TIMEOUT, error="handshake timed out")
    except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
        return Handshake(False, kind=outcomes.TLS, error=f"connection closed during handshake ({type(exc).__name__})")
    except OSError as exc:
        return Handshake(False, kind=outcomes.UNREACHABLE, error=exc.strerror or str(exc))
    ssl_object = writer.get_extra_info("ssl_object")
    try:
        result = Handshake(True, ssl_object.version(), ssl_object.cipher()[0], ssl_object.getpeercert(binary_form=True))
    except (AttributeError, ValueError):
        # TLS 1.3: the client finishes first, then the server checks the client certificate and
        # may refuse it with an alert, closing the connection before it can be inspected here.
        result = Handshake(False, kind=outcomes.TLS, error="the server closed the connection right after the handshake")
    writer.transport.abort()
    return result


async def probe_versions(settings: Settings) -> dict[str, Handshake]:
    """Handshake once per protocol version the local OpenSSL can speak."""
    results = {}
    for name, version in VERSIONS:
        try:
            ctx = probe_context(settings, version)
        except (ssl.SSLError, ValueError) as exc:
            results[name] = Handshake(False, kind="NOT_PROBED", error=f"local OpenSSL cannot offer {name}: {exc}")
            continue
        results[name] = await handshake(settings, ctx)
    return results


async def accepted_ciphers(settings: Settings, versions: dict[str, Handshake]) -> tuple[list[str], list[str]]:
    """(KMS-acceptable suites the server takes, notes). Checked per suite, not just the negotiated one."""
    accepted, notes = [], []
    if versions["TLS 1.2"].ok:
        for cipher in KMS_TLS12_CIPHERS:
            if (await handshake(settings, probe_context(settings, ssl.TLSVersion.TLSv1_2, cipher))).ok:
                accepted.append(f"TLS 1.2 {cipher}")
    tls13 = versions["TLS 1.3"]
    if tls13.ok and tls13.cipher in KMS_TLS13_SUITES.values():
        accepted.append(f"TLS 1.3 {tls13.cipher}")
    elif tls13.ok:
        chosen = await tls13_suite(settings.host, settings.port, settings.timeout)
        if chosen in KMS_TLS13_SUITES:
            accepted.append(f"TLS 1.3 {KMS_TLS13_SUITES[chosen]}")
        else:
            notes.append(f"TLS 1.3 negotiates {tls13.cipher}, and refuses {' and '.join(KMS_TLS13_SUITES.values())}")
    return accepted, notes


# --- a minimal TLS 1.3 ClientHello, to learn which suite the server picks from KMS's two --------


def client_hello(server_name: str, suites: list[int]) -> bytes:
    """A TLS 1.3-only ClientHello (RFC 8446) offering exactly `suites`, with an x25519 key share."""
    share = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    extensions = [
        (10, struct.pack(">HHH", 4, 0x001D, 0x0017)),  # supported_groups: x25519, secp256r1
        (13, _u16_list([0x0403, 0x0503, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807])),
        (43, b"\x02\x03\x04"),  # supported_versions: TLS 1.3 only
        (45, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        (51, struct.pack(">HHH", 36, 0x001D, 32) + share),  # key_share
    ]
    if server_name and not _is_ip(server_name):
        name = server_name.encode("idna")
        extensions.insert(0, (0, struct.pack(">HBH", len(name) + 3, 0, len(name)) + name))
    ext = b"".join(struct.pack(">HH", kind, len(data)) + data for kind, data in extensions)
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + _u16_list(suites)
            + b"\x01\x00" + struct.pack(">H", len(ext)) + ext)
    handshake_msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake_msg)) + handshake_msg


def _u16_list(values: list[int]) -> bytes:
    return struct.pack(">H", 2 * len(values)) + b"".join(struct.pack(">H", v) for v in values)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def tls13_suite(host: str, port: int, timeout: float, suites: list[int] | None = None) -> int | None:
    """The suite a server picks from `suites` (default KMS's two), or None if it refuses them all."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(client_hello(host, suites or list(KMS_TLS13_SUITES)))
        header = await asyncio.wait_for(reader.readexactly(5), timeout)
        record = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", header[3:5])[0]), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.transport.abort()
    if header[0] != 0x16 or len(record) < 39 or record[0] != 0x02:
        return None  # an alert (no shared suite) or not a ServerHello
    session_id_len = record[38]
    offset = 39 + session_id_len
    return struct.unpack(">H", record[offset : offset + 2])[0] if len(record) >= offset + 2 else None


# --- certificate ------------------------------------------------------------------------------


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    moment = now or dt.datetime.now(dt.timezone.utc)
    return (cert.not_valid_after_utc - moment).total_seconds() / 86400.0


def not_yet_valid(cert: x509.Certificate) -> bool:
    return cert.not_valid_before_utc > dt.datetime.now(dt.timezone.utc)


def cert_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName entries (DNS names and IPs); KMS, like browsers, ignores the subject CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def name_matches(host: str, names: list[str]) -> bool:
    """RFC 6125 matching: exact, or a wildcard standing for exactly the leftmost label."""
    if _is_ip(host):
        return any(_is_ip(name) and ipaddress.ip_address(name) == ipaddress.ip_address(host) for name in names)
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in names):
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:] and host.split(".", 1)[0]:
            return True
    return False
