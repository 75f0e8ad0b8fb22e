"""AWS Signature Version 4 for the XKS API: verification on the hot path, and signing for clients.

Every decision here is tested against botocore's signer (tests/server/test_sigv4.py). Verification
runs on every request, so the HMAC chain that derives the signing key from (secret, date,
region, service) is cached: it changes once a day per credential, not per request.
"""

from __future__ import annotations

import calendar
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

_NAME = r"[a-z0-9!#$%&'*+.^_`|~\-]+"  # a lower-case HTTP token
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<akid>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)/aws4_request\s*,\s*"
    rf"SignedHeaders=(?P<signed>{_NAME}(?:;{_NAME})*)\s*,\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*$",
    re.ASCII,
)
_AMZ_DATE = re.compile(r"(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z", re.ASCII)


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


@lru_cache(maxsize=4096)  # a proxy sees few distinct paths (store x key x operation): 2.5% of a worker
def canonical_uri(path: str) -> str:
    """The canonical URI of a request path as sent on the wire (already percent-encoded once).

    botocore's rule for every service but S3: drop empty and "." segments, let ".." drop the
    segment before it, keep a leading and a trailing "/", then percent-encode once more (which
    makes "twice" of the unencoded path). XKS paths are plain ASCII, so `quote` takes its fast
    path. Note that the signature therefore covers the normalised path, not the raw one: the
    router must not treat paths that normalise alike as the same resource (it matches exactly).
    """
    if not path:
        return "/"
    if "//" in path or "/." in path or path[0] == ".":
        segments: list[str] = []
        for segment in path.split("/"):
            if segment == "..":
                if segments:
                    segments.pop()
            elif segment and segment != ".":
                segments.append(segment)
        lead = "/" if path[0] == "/" else ""
        trail = "/" if path[-1] == "/" and segments else ""
        path = lead + "/".join(segments) + trail
    return quote(path, safe="/~")


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    if not query:  # XKS requests carry none
        return ""
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_headers(headers: Mapping[str, list[str]], names: Iterable[str]) -> str:
    lines = []
    for name in names:
        values = headers.get(name)
        if values is None:
            raise AuthenticationFailedException(f"signed header {name} is missing from the request")
        # Trim, and collapse runs of whitespace to one space (str.split, exactly as botocore).
        lines.append(name + ":" + ",".join(" ".join(v.split()) for v in values) + "\n")
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
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            body_sha256,
        )
    )
    try:
        encoded = request.encode()
    except UnicodeEncodeError:  # bytes >= 0x80 that are not UTF-8 (HTTP parsers keep them as surrogates)
        raise AuthenticationFailedException("a signed header or the path holds bytes that are not UTF-8") from None
    return "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(encoded).hexdigest()))


def parse_amz_date(value: str | None) -> float:
    if not value:
        raise AuthenticationFailedException("missing X-Amz-Date header")
    return _amz_timestamp(value)


@lru_cache(maxsize=256)  # requests of the same second share one parse (2% of a worker)
def _amz_timestamp(value: str) -> float:
    if not value:
        raise AuthenticationFailedException("missing X-Amz-Date header")
    match = _AMZ_DATE.fullmatch(value)
    try:
        if match is None:
            raise ValueError
        fields = tuple(map(int, match.groups()))
        datetime(*fields)  # range checks (month 13, Feb 30, hour 24, ...)
    except ValueError:
        raise AuthenticationFailedException("X-Amz-Date is not in the form YYYYMMDDTHHMMSSZ") from None
    return float(calendar.timegm(fields))


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
    service: str = SERVICE,
) -> Authorization:
    """Check a request's signature. `headers` maps lower-case names to all their values.

    `lookup_secret` returns the secret for an access key id of the store the path names, or
    None when that store has no such credential. Raises AuthenticationFailedException.
    `service` is the credential scope's service: `kms-xks-proxy` here, `kms` for the local KMS.
    """
    auth = parse_authorization(_only(headers, "authorization"))
    if auth.service != service:
        raise AuthenticationFailedException(f"credential scope names service {auth.service!r}, expected {service!r}")
    if auth.region not in regions:
        raise AuthenticationFailedException(f"credential scope names region {auth.region!r}, which this store does not serve")
    if "host" not in auth.signed_headers or "x-amz-date" not in auth.signed_headers:
        raise AuthenticationFailedException("SignedHeaders must include host and x-amz-date")
    if list(auth.signed_headers) != sorted(set(auth.signed_headers)):
        raise AuthenticationFailedException("SignedHeaders must be sorted and unique")
    amz_date = _only(headers, "x-amz-date")
    moment = parse_amz_date(amz_date)
    if abs((time.time() if now is None else now) - moment) > MAX_SKEW_SECONDS:
        raise AuthenticationFailedException("request time is more than 5 minutes from server time")
    if amz_date[:8] != auth.date:
        raise AuthenticationFailedException("credential scope date does not match X-Amz-Date")
    secret = lookup_secret(auth.access_key_id)
    if secret is None:
        raise AuthenticationFailedException(f"access key id {auth.access_key_id} is not known to this key store")
    body_sha256 = hashlib.sha256(body).hexdigest()
    declared = _only(headers, "x-amz-content-sha256")
    if declared is not None and declared != body_sha256:
        raise AuthenticationFailedException("X-Amz-Content-Sha256 does not match the body")
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    to_sign = string_to_sign(method, path, query, headers, auth.signed_headers, body_sha256, amz_date, scope)
    key = signing_key(secret, auth.date, auth.region, auth.service)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise AuthenticationFailedException("signature does not match")
    return auth


def _only(headers: Mapping[str, list[str]], name: str) -> str | None:
    """The value of a header that must appear at most once; a repeated one is refused, not guessed at."""
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationFailedException(f"{name} header appears more than once")
    return values[0]


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
