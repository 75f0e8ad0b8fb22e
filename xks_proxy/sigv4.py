"""AWS Signature Version 4 for the XKS API: verification on the hot path, and signing for clients.

Every decision here is tested against botocore's signer (tests/server/test_sigv4.py, with a
randomized differential test). Verification runs on every request, so what repeats is done once:
the HMAC chain that derives the signing key from (secret, date, region, service) and its two HMAC
contexts (they change once a day per credential), the parse of the Authorization header up to
its signature (it changes with the client's key, day or signed headers). verify() reads the
request's headers in place (aiohttp's multidict: only the signed ones and three more) and builds
the canonical request in one join; hashing copies ready OpenSSL contexts (see _SHA256).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, NamedTuple, Sequence
from urllib.parse import quote

from xks_proxy.errors import AuthenticationFailedException

if TYPE_CHECKING:
    from multidict import MultiMapping

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
_NOT_UTF8 = "a signed header, the path or the query holds bytes that are not UTF-8"
_AMZ_DATE = re.compile(r"(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z", re.ASCII)


class Authorization(NamedTuple):
    """A parsed Authorization header (a NamedTuple: immutable, and built in 0.4 us, not a frozen dataclass's 2.3)."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str | None) -> Authorization:
    head, signature = _split_authorization(header)
    return Authorization(head.access_key_id, head.date, head.region, head.service, head.signed_headers, signature)


def _split_authorization(header: str | None) -> tuple[_Head, str]:
    if not header:
        raise AuthenticationFailedException("missing Authorization header")
    header = header.strip()
    # Everything but the signature repeats on every request of a client (same key, day, region,
    # headers): parse that once. The last "Signature=" is the one the regex splits at (the
    # signature after it is hex), so head + tail match exactly when the whole regex would.
    head, found, signature = header.rpartition("Signature=")
    if not found or _SIGNATURE.fullmatch(signature) is None:
        raise AuthenticationFailedException(_MALFORMED)
    return (_parse_head(head) if len(head) <= _HEAD_CACHED_CHARS else _parse_head.__wrapped__(head)), signature


_MALFORMED = "Authorization header is not a well-formed AWS4-HMAC-SHA256 signature"
_SIGNATURE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HEAD_RE = re.compile(_AUTH_RE.pattern.split("Signature=")[0], re.ASCII)  # used with fullmatch
_HEAD_CACHED_CHARS = 512  # longer heads (no client sends one) are parsed every time: the cache stays < 1 MB


class _Head(NamedTuple):
    """What an Authorization header says before its signature, checked once per distinct header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signed_joined: str  # "a;b;c", as the canonical request repeats it
    scope: str  # date/region/service/aws4_request
    problem: str | None  # why SignedHeaders is refused (checked after service and region, as before)


@lru_cache(maxsize=1024)  # keyed on the whole head (access key id included): a pure function of its text
def _parse_head(head: str) -> _Head:
    match = _HEAD_RE.fullmatch(head)
    if match is None:
        raise AuthenticationFailedException(_MALFORMED)
    signed = tuple(match["signed"].split(";"))
    problem = None
    if "host" not in signed or "x-amz-date" not in signed:
        problem = "SignedHeaders must include host and x-amz-date"
    elif list(signed) != sorted(set(signed)):
        problem = "SignedHeaders must be sorted and unique"
    date, region, service = match["date"], match["region"], match["service"]
    return _Head(match["akid"], date, region, service, signed, match["signed"], f"{date}/{region}/{service}/aws4_request",
                 problem)  # fmt: skip


@lru_cache(maxsize=1024)
def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """kSigning = HMAC chain over date, region, service. Cached: it changes once a day."""
    key = _hmac(("AWS4" + secret).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")  # OpenSSL's one-shot; hmac.new(..) builds a Python object


# OpenSSL 3 looks a digest up by name each time a context is made (hashlib.sha256(), hmac.digest:
# 1.5-3 us each here); copying a context made once skips that. So the hot path hashes with copies of
# an empty SHA-256 context, and signs with copies of the two HMAC contexts of each signing key,
# made once per credential and day (RFC 2104: H(K^opad || H(K^ipad || m)), K padded to the block).
_SHA256 = hashlib.sha256()
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _sha256_hex(data: bytes) -> str:
    h = _SHA256.copy()
    h.update(data)
    return h.hexdigest()


def _hmac_contexts(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    block = _SHA256.block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


@lru_cache(maxsize=1024)
def _signer(secret: str, date: str, region: str, service: str) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The HMAC contexts of signing_key(...): never updated, only copied."""
    return _hmac_contexts(signing_key(secret, date, region, service))


def _hmac_hex(contexts: tuple[hashlib._Hash, hashlib._Hash], msg: bytes) -> str:
    """hmac.new(key, msg, sha256).hexdigest(), from _hmac_contexts(key)."""
    inner = contexts[0].copy()
    inner.update(msg)
    outer = contexts[1].copy()
    outer.update(inner.digest())
    return outer.hexdigest()


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
    try:
        return quote(path, safe="/~")
    except UnicodeEncodeError:  # a byte >= 0x80 that is not UTF-8, kept as a surrogate: no client signed that
        raise AuthenticationFailedException(_NOT_UTF8) from None


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    if not query:  # XKS requests carry none
        return ""
    try:
        pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    except UnicodeEncodeError:
        raise AuthenticationFailedException(_NOT_UTF8) from None
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
        raise AuthenticationFailedException(_NOT_UTF8) from None
    return "\n".join((ALGORITHM, amz_date, scope, _sha256_hex(encoded)))


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
    headers: Mapping[str, Sequence[str]] | MultiMapping[str],
    body: bytes,
    lookup_secret: Callable[[str], str | None],
    regions: frozenset[str],
    now: float | None = None,
    service: str = SERVICE,
) -> Authorization:
    """Check a request's signature. Raises AuthenticationFailedException.

    `headers` gives every value of a header by its lower-case name: a mapping (name -> values),
    or a multidict such as aiohttp's `request.headers` (case-insensitive), read with its getall.
    Only the signed headers and the three verify reads are looked up: the server passes its
    request's headers as they are rather than copying them all into a dict.
    `lookup_secret` returns the secret for an access key id of the store the path names, or
    None when that store has no such credential.
    `service` is the credential scope's service: `kms-xks-proxy` here, `kms` for the local KMS.
    """
    get = getattr(headers, "getall", None) or headers.get  # called get(name, None): both take a default
    head, signature = _split_authorization(_only(get, "authorization"))
    if head.service != service:
        raise AuthenticationFailedException(f"credential scope names service {head.service!r}, expected {service!r}")
    if head.region not in regions:
        raise AuthenticationFailedException(f"credential scope names region {head.region!r}, which this store does not serve")
    if head.problem is not None:
        raise AuthenticationFailedException(head.problem)
    amz_date = _only(get, "x-amz-date")
    moment = parse_amz_date(amz_date)
    if abs((time.time() if now is None else now) - moment) > MAX_SKEW_SECONDS:
        raise AuthenticationFailedException("request time is more than 5 minutes from server time")
    if amz_date[:8] != head.date:
        raise AuthenticationFailedException("credential scope date does not match X-Amz-Date")
    secret = lookup_secret(head.access_key_id)
    if secret is None:
        raise AuthenticationFailedException(f"access key id {head.access_key_id} is not known to this key store")
    body_sha256 = _sha256_hex(body)
    declared = _only(get, "x-amz-content-sha256")
    if declared is not None and declared != body_sha256:
        raise AuthenticationFailedException("X-Amz-Content-Sha256 does not match the body")
    # The canonical request in one join (string_to_sign's, without its intermediate strings).
    parts = [method.upper(), canonical_uri(path), canonical_query(query) if query else ""]
    for name in head.signed_headers:
        if name == "x-amz-date":  # read and checked above: one value
            parts.append("x-amz-date:" + amz_date)  # digits and T, Z: nothing to trim
            continue
        values = get(name, None)
        if not values:
            raise AuthenticationFailedException(f"signed header {name} is missing from the request")
        if len(values) == 1:
            parts.append(name + ":" + " ".join(values[0].split()))
        else:
            parts.append(name + ":" + ",".join(" ".join(v.split()) for v in values))
    parts.append("")  # canonical_headers ends every line in "\n", the last one too
    parts.append(head.signed_joined)
    parts.append(body_sha256)
    try:
        encoded = "\n".join(parts).encode()
    except UnicodeEncodeError:  # bytes >= 0x80 that are not UTF-8 (HTTP parsers keep them as surrogates)
        raise AuthenticationFailedException(_NOT_UTF8) from None
    to_sign = f"{ALGORITHM}\n{amz_date}\n{head.scope}\n{_sha256_hex(encoded)}"
    expected = _hmac_hex(_signer(secret, head.date, head.region, head.service), to_sign.encode())
    if not hmac.compare_digest(expected, signature):
        raise AuthenticationFailedException("signature does not match")
    return Authorization(head.access_key_id, head.date, head.region, head.service, head.signed_headers, signature)


def _only(get: Callable[[str, None], Sequence[str] | None], name: str) -> str | None:
    """The value of a header that must appear at most once; a repeated one is refused, not guessed at."""
    values = get(name, None)
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
    signature = _hmac_hex(_signer(secret, date, region, service), to_sign.encode())
    out = {("Host" if k == "host" else "X-Amz-Date" if k == "x-amz-date" else k): v for k, v in headers.items()}
    out["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out
