"""TLS for the listeners: server contexts as KMS accepts them, mutual TLS with a client name check, reload.

`TlsManager` holds the context that serves new connections and the client names allowed; a
reload swaps both whole (a broken or expired new certificate is refused at reload, and the old
context keeps serving). How a connection gets TLS with whichever context is current, and why
the listener starts TLS itself, is tls_transport.py's part.

The client certificate's names are checked inside the handshake (an OpenSSL verify callback,
see tlshooks), so a certificate that chains to the trusted CA but names someone else gets a
`bad_certificate` alert; they are checked again after the handshake, before a single byte of
HTTP reaches aiohttp, for resumed sessions (which verify no certificate).

Refusals are logged at INFO with the peer address and the reason (for a name mismatch, the
names presented), and counted in metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from xks_proxy.access import tlshooks
from xks_proxy.access.metrics import NoMetrics
from xks_proxy.access.tls_transport import refused_in_handshake
from xks_proxy.config import Config

log = logging.getLogger("xks_proxy.tls")

#: Exactly the suites the XKS specification says KMS accepts, nothing more: KMS offers no other,
#: so another suite could only ever serve some other client. All AEAD, all forward secret.
#: TLS 1.2: no CHACHA20 (not on the list), no AES128-GCM (not on it either).
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
#: TLS 1.3: without TLS_AES_128_GCM_SHA256, which OpenSSL offers by default (set through tlshooks).
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


class TlsError(Exception):
    """A certificate, key or CA bundle that cannot be served, as one line."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None

    @classmethod
    def of(cls, config: Config) -> "TlsFiles":
        server = config.server
        if server.tls_cert is None or server.tls_key is None:
            raise TlsError("server.tls_cert and server.tls_key are needed for HTTPS (or serve with --http)")
        return cls(server.tls_cert, server.tls_key, config.tls.client_ca)

    def signature(self) -> tuple[object, ...]:
        """Changes whenever a file is replaced or rewritten (inode, mtime, size), or a path changes."""
        out: list[object] = [self]
        for path in (self.cert, self.key, self.client_ca):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else None)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class LoadedTls:
    context: ssl.SSLContext
    mutual: bool
    #: certificate label -> notAfter as a POSIX timestamp (for the expiry metric).
    expiry: dict[str, float]
    #: The ctypes verify callback checking client names in the handshake: referenced here, since
    #: OpenSSL calls it for as long as the context serves (None: names checked after the handshake).
    name_hook: object = None


def server_context() -> ssl.SSLContext:
    """The base of every server context we make (XKS and admin listeners): TLS 1.2+, the spec's suites.

    One function, so the two listeners cannot drift apart. Without the ctypes hook (see
    tlshooks), TLS 1.3 keeps OpenSSL's default suites, which are AEAD too; logged once.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        tlshooks.set_tls13_suites(ctx, TLS13_SUITES)
    except tlshooks.HookError as exc:
        _once(f"TLS 1.3 offers OpenSSL's default suites (TLS_AES_128_GCM_SHA256 too): {exc}")
    return ctx


_said: set[str] = set()


def _once(message: str) -> None:
    """A warning about this process's OpenSSL: once, not once per context or connection."""
    if message not in _said:
        _said.add(message)
        log.warning("%s", message)


def load_tls(files: TlsFiles) -> LoadedTls:
    """A server context as KMS accepts it: `server_context`, the certificate, client cert if configured."""
    ctx = server_context()
    leaf = _first_cert(files.cert, "server.tls_cert")
    try:
        ctx.load_cert_chain(files.cert, files.key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"server certificate {files.cert} / key {files.key}: {_reason(exc)}") from None
    _check_valid(leaf, f"server certificate {files.cert}")
    expiry = {"server": leaf.not_valid_after_utc.timestamp()}
    if files.client_ca is not None:
        cas = _certs(files.client_ca, "tls.client_ca")
        try:
            ctx.load_verify_locations(cafile=str(files.client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"client CA bundle {files.client_ca}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        expiry.update(_ca_expiry(cas))
    return LoadedTls(context=ctx, mutual=files.client_ca is not None, expiry=expiry)


def _no_password() -> str:
    """Without this, OpenSSL would ask for a passphrase on the terminal and block the server."""
    raise TlsError("the private key is encrypted; give the proxy an unencrypted key file only it can read")


def _ca_expiry(cas: list[x509.Certificate]) -> dict[str, float]:
    expiry: dict[str, float] = {}
    for ca in cas:
        label = "client_ca:" + _common_name(ca)
        expiry[label] = min(expiry.get(label, float("inf")), ca.not_valid_after_utc.timestamp())
    return expiry


def expiry_of_files(files: TlsFiles) -> dict[str, float]:
    """Certificate expiry read from the files (the sidecar's view; workers serve what they loaded)."""
    try:
        expiry = {"server": _first_cert(files.cert, "server.tls_cert").not_valid_after_utc.timestamp()}
        if files.client_ca:
            expiry.update(_ca_expiry(_certs(files.client_ca, "tls.client_ca")))
        return expiry
    except TlsError:
        return {}


def _certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"{what} {path}: not a PEM certificate file ({exc})") from None
    if not certs:
        raise TlsError(f"{what} {path}: holds no certificate")
    return certs


def _first_cert(path: Path, what: str) -> x509.Certificate:
    return _certs(path, what)[0]


def _check_valid(cert: x509.Certificate, what: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise TlsError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise TlsError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "handshake did not complete in time" if "timeout" in str(exc).lower() else str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def presented_names(peercert: dict[str, Any] | None) -> tuple[str, ...]:
    """SAN DNS names; the subject CN only when the certificate has no DNS name (RFC 6125)."""
    if not peercert:
        return ()
    dns = tuple(value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS")
    if dns:
        return dns
    return tuple(value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName")


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """`presented_names` of a parsed certificate (the handshake's check sees DER, not Python's dict)."""
    try:
        dns = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns = ()
    if dns:
        return dns
    return tuple(str(attr.value) for attr in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))


class TlsManager:
    """The current TLS context and allowed client names, swapped whole on reload."""

    def __init__(self, config: Config, metrics: NoMetrics) -> None:
        self._metrics = metrics
        self._files = TlsFiles.of(config)
        self._signature = self._files.signature()
        self.allowed_names = config.tls.client_names
        self.current = self._load()

    def _load(self) -> LoadedTls:
        """`load_tls`, plus the client name check inside the handshake when mutual TLS is on.

        The check reads `allowed_names` at each handshake, so a reload of the names needs no
        new context. If the hook cannot be installed, the check after the handshake (which
        always runs too, and also covers resumed sessions) is the only one: logged once.
        """
        loaded = load_tls(self._files)
        if not loaded.mutual:
            return loaded
        try:
            hook = tlshooks.check_leaf_in_handshake(loaded.context, self._leaf_allowed)
        except tlshooks.HookError as exc:
            _once(f"client names are checked after the TLS handshake (a refusal is a close without an alert): {exc}")
            return loaded
        return replace(loaded, name_hook=hook)

    def _leaf_allowed(self, der: bytes) -> bool:
        """The handshake's name check, called by OpenSSL on the event loop's thread."""
        names = certificate_names(x509.load_der_x509_certificate(der))
        if self._allows(names):
            return True
        refused_in_handshake(names)
        return False

    def _allows(self, names: tuple[str, ...]) -> bool:
        return any(name.lower() in self.allowed_names for name in names)

    def _names_refused(self, names: tuple[str, ...]) -> str:
        presented = ", ".join(repr(n) for n in names) or "(none)"
        return f"client certificate names {presented}; allowed: {', '.join(sorted(self.allowed_names))}"

    def configure(self, config: Config) -> None:
        """A new configuration: new allowed names now; new file paths at the next `poll`."""
        self.allowed_names = config.tls.client_names
        try:
            self._files = TlsFiles.of(config)
        except TlsError as exc:
            log.error("TLS settings not applied, still serving the previous certificate: %s", exc)

    def poll(self, force: bool = False) -> LoadedTls | None:
        """Load the files again if they changed (or `force`). Blocking: run it in a thread.

        Returns the new context, None when nothing changed, or raises TlsError when the new
        files cannot be served (then they are not retried until they change again).
        """
        signature = self._files.signature()
        if signature == self._signature and not force:
            return None
        self._signature = signature
        return self._load()

    def install(self, loaded: LoadedTls) -> None:
        self.current = loaded

    def expiry(self) -> dict[str, float]:
        return self.current.expiry

    # Every refusal is one INFO line with the peer and the reason. INFO, not WARNING: anyone who
    # can reach the port causes refusals at will, so they must not look like (or page as) our
    # own trouble; `xks_tls_refused_total{reason}` is what to alert on.

    def handshake_refused(self, peer: str, exc: BaseException) -> None:
        names = getattr(exc, "client_names", None)
        if names is None:
            log.info("TLS handshake from %s refused: %s", peer, _reason(exc))
            self._metrics.tls_refused("handshake")
        else:
            log.info("TLS handshake from %s refused: %s", peer, self._names_refused(names))
            self._metrics.tls_refused("client_name")

    def name_allowed(self, peercert: dict[str, Any] | None, peer: str) -> bool:
        """The check after the handshake: for a resumed session, or when the hook is missing."""
        names = presented_names(peercert)
        if self._allows(names):
            return True
        log.info("TLS connection from %s closed before any request: %s", peer, self._names_refused(names))
        self._metrics.tls_refused("client_name")
        return False
