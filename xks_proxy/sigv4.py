"""AWS Signature Version 4 for the XKS API: verification on the hot path, and signing for clients.

Every decision here is tested against botocore's signer (tests/test_sigv4.py). Verification
runs on every request, so the HMAC chain that derives the signing key from (secret, date,
region, service) is cached: it changes once a day per credential, not per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Callable, Iterable, Mapping
from urllib.parse import quote

from xks_proxy.errors import AuthenticationFailedException

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms-xks-proxy"
MAX_SKEW_SECONDS = 300

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<akid>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)/aws4_request\s*,\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9\-;]+)\s*,\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*$"
)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Authorization:
    """A parsed Authorization header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str | None) -> Authorization:
    if not header:
        raise AuthenticationFailedException("missing Authorization header")
    match = _AUTH_RE.match(header.strip())
    if match is None:
        raise AuthenticationFailedException("Authorization header is not a well-formed AWS4-HMAC-SHA256 signature")
    signed = tuple(match["signed"].split(";"))
    return Authorization(
        access_key_id=match["akid"],
        date=match["date"],
        region=match["region"],
        service=match["service"],
        signed_headers=signed,
        signature=match["signature"],
    )


@lru_cache(maxsize=1024)
def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """kSigning = HMAC chain over date, region, service. Cached: it changes once a day."""
    key = _hmac(("AWS4" + secret).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_uri(path: str) -> str:
    """Non-S3 services encode each path segment twice; XKS paths are plain ASCII, so this is cheap."""
    return quote(quote(path, safe="/~"), safe="/~") if path else "/"


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_headers(headers: Mapping[str, list[str]], names: Iterable[str]) -> str:
    lines = []
    for name in names:
        values = headers.get(name)
        if values is None:
            raise AuthenticationFailedException(f"signed header {name} is missing from the request")
        lines.append(name + ":" + ",".join(_SPACES.sub(" ", v.strip()) for v in values) + "\n")
    return "".join(lines)


def string_to_sign(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, list[str]],
    signed_headers: tuple[str, ...],
    body_sha256: str,
    amz_date: str,
    scope: str,
) -> str:
    request = "\n".join(
        (
            method,
            canonical_uri(path),
            canonical_query(query),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            body_sha256,
        )
    )
    return "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()))


def parse_amz_date(value: str | None) -> float:
    if not value:
        raise AuthenticationFailedException("missing X-Amz-Date header")
    try:
        moment = datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise AuthenticationFailedException("X-Amz-Date is not in the form YYYYMMDDTHHMMSSZ") from None
    return moment.timestamp()


def verify(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, list[str]],
    body: bytes,
    lookup_secret: Callable[[str], str | None],
    regions: frozenset[str],
    now: float | None = None,
) -> Authorization:
    """Check a request's signature. `headers` maps lower-case names to all their values.

    `lookup_secret` returns the secret for an access key id of the store the path names, or
    None when that store has no such credential. Raises AuthenticationFailedException.
    """
    auth = parse_authorization(_first(headers, "authorization"))
    if auth.service != SERVICE:
        raise AuthenticationFailedException(f"credential scope names service {auth.service!r}, expected {SERVICE!r}")
    if auth.region not in regions:
        raise AuthenticationFailedException(f"credential scope names region {auth.region!r}, which this store does not serve")
    if "host" not in auth.signed_headers or "x-amz-date" not in auth.signed_headers:
        raise AuthenticationFailedException("SignedHeaders must include host and x-amz-date")
    if list(auth.signed_headers) != sorted(set(auth.signed_headers)):
        raise AuthenticationFailedException("SignedHeaders must be sorted and unique")
    amz_date = _first(headers, "x-amz-date")
    moment = parse_amz_date(amz_date)
    if abs((time.time() if now is None else now) - moment) > MAX_SKEW_SECONDS:
        raise AuthenticationFailedException("request time is more than 5 minutes from server time")
    if amz_date[:8] != auth.date:
        raise AuthenticationFailedException("credential scope date does not match X-Amz-Date")
    secret = lookup_secret(auth.access_key_id)
    if secret is None:
        raise AuthenticationFailedException(f"access key id {auth.access_key_id} is not known to this key store")
    body_sha256 = hashlib.sha256(body).hexdigest()
    declared = _first(headers, "x-amz-content-sha256")
    if declared is not None and declared != body_sha256:
        raise AuthenticationFailedException("X-Amz-Content-Sha256 does not match the body")
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    to_sign = string_to_sign(method, path, query, headers, auth.signed_headers, body_sha256, amz_date, scope)
    key = signing_key(secret, auth.date, auth.region, auth.service)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise AuthenticationFailedException("signature does not match")
    return auth


def _first(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def sign(
    *,
    method: str,
    url_path: str,
    host: str,
    body: bytes,
    access_key_id: str,
    secret: str,
    region: str,
    service: str = SERVICE,
    now: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers to send for a signed request (Host, X-Amz-Date, Authorization, and the extras signed).

    Used by our own clients (conformance tester, benchmark, tests). The tests check it against
    botocore, so it is as good a reference as the verifier.
    """
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers = {"host": host, "x-amz-date": amz_date}
    for name, value in (extra_headers or {}).items():
        headers[name.lower()] = value
    names = tuple(sorted(headers))
    scope = f"{date}/{region}/{service}/aws4_request"
    as_lists = {k: [v] for k, v in headers.items()}
    to_sign = string_to_sign(method, url_path, (), as_lists, names, hashlib.sha256(body).hexdigest(), amz_date, scope)
    signature = hmac.new(signing_key(secret, date, region, service), to_sign.encode(), hashlib.sha256).hexdigest()
    out = {("Host" if k == "host" else "X-Amz-Date" if k == "x-amz-date" else k): v for k, v in headers.items()}
    out["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out
