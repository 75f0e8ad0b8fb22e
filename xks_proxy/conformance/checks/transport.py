"""Transport checks: HTTPS, port, reachability, TLS versions, cipher suites, certificate.

These decide whether KMS can open a connection at all, so they also decide how the API checks
run: over a verified TLS context when the certificate is good, over an unverified one (with a
note) when only the certificate is wrong, or not at all when no handshake KMS could make works.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509

from xks_proxy.conformance import outcomes, tls
from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.results import Outcome

TLS_CODE = outcomes.connection_code(outcomes.TLS)


@dataclass
class Channel:
    """Whether the API checks can run, and over which TLS context (None for plain HTTP)."""

    usable: bool
    ssl_context: ssl.SSLContext | None = None
    reason: str = ""


def _tls_failure(text: str) -> Outcome:
    return Outcome(TLS_CODE, f"{text}: ConnectCustomKeyStore FAILED with {TLS_CODE} "
                             "(CreateCustomKeyStore: XksProxyUriUnreachableException)")


async def check(run: Run) -> Channel:
    settings = run.settings
    if settings.scheme == "http":
        return await _plain_http(run)
    run.check("transport/https", "HTTPS endpoint", ok=True, expected="https:// endpoint",
              actual=f"https://{settings.host_header}", kms=Outcome("OK", "CreateCustomKeyStore accepts the endpoint"))
    _port(run)
    if not await _reachable(run):
        return Channel(False, reason="the proxy is not reachable")
    versions = await tls.probe_versions(settings)
    kms_versions = _versions(run, versions)
    await _ciphers(run, versions)
    handshakes = [h for h in versions.values() if h.ok and h.der]
    if not handshakes:
        for name in ("chain", "expiry", "name"):
            run.skip(f"transport/cert-{name}", f"certificate {name}", "no TLS handshake completed")
        return Channel(False, reason="no TLS handshake with the proxy completed")
    version = next(name for name, h in reversed(versions.items()) if h.ok and h.der)
    trusted = await _certificate(run, x509.load_der_x509_certificate(handshakes[-1].der), version)
    if not kms_versions:
        return Channel(False, reason="the proxy offers neither TLS 1.2 nor TLS 1.3, so KMS cannot connect")
    if trusted:
        return Channel(True, tls.client_context(settings, verify=True, check_name=True))
    run.report.notes.append("API checks ran over TLS without certificate verification, because KMS would refuse "
                            "the certificate; fix it before connecting KMS")
    return Channel(True, tls.client_context(settings, verify=False))


async def _plain_http(run: Run) -> Channel:
    settings = run.settings
    run.check("transport/https", "HTTPS endpoint", ok=False, advisory=settings.allow_http,
              expected="https:// endpoint (KMS speaks only HTTPS)",
              actual="http:// endpoint" + (", allowed by --allow-http for local testing" if settings.allow_http else ""),
              kms=outcomes.http_refused())
    for name in ("tls-version", "tls-cipher", "cert-chain", "cert-expiry", "cert-name"):
        run.skip(f"transport/{name}", name, "plain HTTP: no TLS to check")
    if not settings.allow_http:
        return Channel(False, reason="KMS cannot use a plain HTTP endpoint (rerun with --allow-http to test the API anyway)")
    _port(run)
    if not await _reachable(run):
        return Channel(False, reason="the proxy is not reachable")
    return Channel(True, None)


def _port(run: Run) -> None:
    port = run.settings.port
    run.check("transport/port", "port KMS connects to", ok=port == 443, advisory=True,
              expected="443 (KMS always connects on port 443)", actual=f"port {port}",
              kms=Outcome("OK", "KMS reaches this port") if port == 443 else Outcome(
                  outcomes.connection_code(outcomes.UNREACHABLE), "KMS connects only on port 443: unless a load balancer "
                  f"forwards 443 here, ConnectCustomKeyStore FAILED with {outcomes.connection_code(outcomes.UNREACHABLE)}"))


async def _reachable(run: Run) -> bool:
    settings = run.settings
    problem = await tls.tcp_connect(settings.host, settings.port, settings.timeout)
    run.check("transport/reachable", "TCP connection", ok=problem is None,
              expected=f"a TCP connection to {settings.host}:{settings.port}",
              actual=problem or "connected", kms=outcomes.connect(outcomes.OK if problem is None else outcomes.UNREACHABLE))
    return problem is None


def _versions(run: Run, versions: dict[str, tls.Handshake]) -> list[str]:
    offered = [name for name, h in versions.items() if h.ok]
    refused = [name for name, h in versions.items() if not h.ok and h.kind != "NOT_PROBED"]
    unprobed = [name for name, h in versions.items() if h.kind == "NOT_PROBED"]
    kms_ok = [name for name in offered if name in ("TLS 1.2", "TLS 1.3")]
    actual = f"offered: {', '.join(offered) or 'none'}; refused: {', '.join(refused) or 'none'}"
    if unprobed:
        actual += f"; not probed (local OpenSSL cannot): {', '.join(unprobed)}"
    if not offered:
        errors = sorted({h.error for h in versions.values() if h.error and h.kind != 'NOT_PROBED'})
        actual += f" ({'; '.join(errors)[:200]})"
    run.check("transport/tls-version", "TLS 1.2 or 1.3 offered", ok=bool(kms_ok), expected="TLS 1.2 and/or TLS 1.3",
              actual=actual, kms=outcomes.connect(outcomes.OK) if kms_ok else
              _tls_failure("KMS offers only TLS 1.2 and 1.3, and the proxy accepts neither"))
    return kms_ok


async def _ciphers(run: Run, versions: dict[str, tls.Handshake]) -> None:
    accepted, notes = await tls.accepted_ciphers(run.settings, versions)
    wanted = ", ".join([*tls.KMS_TLS12_CIPHERS, *tls.KMS_TLS13_SUITES.values()])
    negotiated = [f"{name} {h.cipher}" for name, h in versions.items() if h.ok]
    actual = f"accepted: {', '.join(accepted)}" if accepted else f"none of KMS's suites accepted (negotiates: {', '.join(negotiated) or 'nothing'})"
    if notes:
        actual += "; " + "; ".join(notes)
    run.check("transport/tls-cipher", "a cipher suite KMS accepts", ok=bool(accepted), expected=f"at least one of {wanted}",
              actual=actual, kms=outcomes.connect(outcomes.OK) if accepted else
              _tls_failure("no cipher suite in common with KMS"))


async def _certificate(run: Run, cert: x509.Certificate, version: str) -> bool:
    """Chain, expiry and name as three checks; True when KMS-style verification would succeed."""
    chain_ok = await _chain(run, version)
    expiry_ok = _expiry(run, cert)
    name_ok = _name(run, cert)
    return chain_ok and expiry_ok and name_ok


async def _chain(run: Run, version: str) -> bool:
    settings = run.settings
    source = f"the CA bundle {settings.ca_bundle}" if settings.ca_bundle else "the system trust store"
    result = await tls.handshake(settings, tls.verify_context(settings, version))
    # 9/10: not yet valid / expired. OpenSSL checks validity only after building a trusted chain,
    # so these codes mean the chain itself is fine; the expiry check reports the dates.
    ok = result.ok or result.verify_code in (9, 10)
    actual = f"chains to a CA in {source}" if ok else f"verification failed: {result.error}"
    run.check("transport/cert-chain", "certificate chain trusted", ok=ok,
              expected=f"a chain to a trusted CA ({source}; KMS trusts only the public CAs on its list)",
              actual=actual, kms=outcomes.connect(outcomes.OK) if ok else
              _tls_failure("the certificate is not signed by a CA KMS trusts"))
    return result.ok


def _expiry(run: Run, cert: x509.Certificate) -> bool:
    left = tls.days_left(cert)
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    if tls.not_yet_valid(cert):
        ok, actual = False, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    elif left < 0:
        ok, actual = False, f"expired {-left:.0f} days ago ({until})"
    else:
        ok, actual = True, f"{left:.0f} days left (until {until})"
    soon = ok and left < tls.EXPIRY_WARNING_DAYS
    if soon:
        kms = _tls_failure(f"in {left:.0f} days the certificate expires")
    else:
        kms = outcomes.connect(outcomes.OK) if ok else _tls_failure("the certificate is expired or not yet valid")
    run.check("transport/cert-expiry", "certificate within its validity period", ok=ok and not soon, advisory=soon,
              expected=f"valid now, with more than {tls.EXPIRY_WARNING_DAYS} days left", actual=actual, kms=kms)
    return ok


def _name(run: Run, cert: x509.Certificate) -> bool:
    names = tls.cert_names(cert)
    host = run.settings.host
    ok = tls.name_matches(host, names)
    run.check("transport/cert-name", "certificate names the endpoint host", ok=ok,
              expected=f"a subjectAltName matching {host} (wildcards allowed)",
              actual=f"subjectAltName: {', '.join(names) or 'none'}",
              kms=outcomes.connect(outcomes.OK) if ok else
              _tls_failure(f"the certificate does not name {host}"))
    return ok
