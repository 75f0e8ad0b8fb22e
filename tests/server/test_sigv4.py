"""xks_proxy.sigv4 against botocore's SigV4 signer (the reference) and against curl --aws-sigv4.

Everything here is deterministic (seeded `random.Random`, frozen clocks) except the curl test,
which signs with the real clock against a loopback server. Credentials are synthetic.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import random
import shutil
import string
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from unittest import mock
from urllib.parse import parse_qsl

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from xks_proxy import sigv4
from xks_proxy.errors import AuthenticationFailedException

SERVICE = "kms-xks-proxy"
N_CASES = 250
SEED = 0x5167_0004

AKID_ALPHABET = string.ascii_uppercase + "234567"
SECRET_ALPHABET = string.ascii_letters + string.digits + "/+="
PREFIX_ALPHABET = string.ascii_letters + string.digits + "/_-"
KEY_ID_ALPHABET = string.ascii_letters + string.digits + "._-"
REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2", "me-south-1", "us-gov-west-1"]
HOSTS = ["xks.example.com", "hsm-proxy.internal:8443", "127.0.0.1:4443", "xks-proxy.eu-west-1.example.org"]
# Values with leading, trailing and repeated internal whitespace (spaces and tabs): SigV4
# canonicalises them (trim, collapse runs to one space), and so must we.
CONTENT_TYPES = [
    "application/json",
    "application/x-amz-json-1.1",
    "application/json; charset=utf-8",
    "application/json;    charset=utf-8",
    "  application/json\t;\t\tcharset=UTF-8  ",
]
EXTRA_VALUES = ["a", "a  b", "\ta \t  b\t", "1,2,3", "x=y; z=w", "  padded  ", "tab\there", "many     spaces   inside"]


# --------------------------------------------------------------------------- random inputs


@dataclass
class Case:
    method: str
    host: str
    path: str
    body: bytes
    access_key_id: str
    secret: str
    region: str
    now: float
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://{self.host}{self.path}"


def _word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def random_key_id(rng: random.Random) -> str:
    roll = rng.random()
    # Dot segments are legal key ids and botocore (like every AWS SDK) removes them from the
    # canonical URI, so the verifier must as well.
    if roll < 0.04:
        return "."
    if roll < 0.08:
        return ".."
    return _word(rng, KEY_ID_ALPHABET, 1, 64)


def random_path(rng: random.Random) -> str:
    # Prefixes drawn from [a-zA-Z0-9/_-] may contain "//" and trailing "/", which SigV4
    # (botocore) collapses in the canonical URI.
    prefix = _word(rng, PREFIX_ALPHABET, 0, 24)
    base = ("/" + prefix if prefix else "") + "/kms/xks/v1"
    if rng.random() < 0.15:
        return base + "/health"
    return f"{base}/keys/{random_key_id(rng)}/{rng.choice(['encrypt', 'decrypt', 'metadata'])}"


def random_body(rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 1, rng.randint(2, 64), rng.randint(65, 1024), rng.randint(1025, 9000)])
    return rng.randbytes(size)


def random_extra(rng: random.Random) -> dict[str, str]:
    extra: dict[str, str] = {}
    if rng.random() < 0.6:
        extra[rng.choice(["Content-Type", "content-type", "CONTENT-TYPE"])] = rng.choice(CONTENT_TYPES)
    if rng.random() < 0.3:
        extra[rng.choice(["X-Xks-Note", "x-amz-meta-trace", "X-Request-Id"])] = rng.choice(EXTRA_VALUES)
    return extra


def random_case(rng: random.Random) -> Case:
    return Case(
        method=rng.choice(["POST"] * 9 + ["GET"]),
        host=rng.choice(HOSTS),
        path=random_path(rng),
        body=random_body(rng),
        access_key_id=_word(rng, AKID_ALPHABET, 20, 30),
        secret=_word(rng, SECRET_ALPHABET, 43, 64),
        region=rng.choice(REGIONS + [f"xx-{_word(rng, string.ascii_lowercase, 3, 9)}-{rng.randint(1, 9)}"]),
        # 2001..2096, with a fractional part: both signers must truncate to whole seconds.
        now=rng.uniform(1e9, 4e9),
        extra=random_extra(rng),
    )


CASES = [random_case(random.Random(SEED + i)) for i in range(N_CASES)]


# --------------------------------------------------------------------------- botocore as the reference


@contextmanager
def botocore_clock(now: float):
    """Freeze the clock botocore.auth reads when it signs."""
    aware = datetime.fromtimestamp(now, tz=timezone.utc)
    naive = aware.replace(tzinfo=None)
    if hasattr(botocore.auth, "get_current_datetime"):  # botocore >= 1.33
        fake = lambda remove_tzinfo=True: naive if remove_tzinfo else aware  # noqa: E731
        with mock.patch.object(botocore.auth, "get_current_datetime", fake):
            yield
    else:  # older botocore calls datetime.datetime.utcnow() through its `datetime` import

        class _Frozen(datetime):
            @classmethod
            def utcnow(cls):
                return naive

            @classmethod
            def now(cls, tz=None):
                return aware if tz is not None else naive

        shim = types.SimpleNamespace(**{**vars(botocore.auth.datetime), "datetime": _Frozen})
        with mock.patch.object(botocore.auth, "datetime", shim):
            yield


def boto_request(
    case: Case,
    *,
    signer_cls: type[SigV4Auth] = SigV4Auth,
    service: str = SERVICE,
    headers: list[tuple[str, str]] | None = None,
) -> AWSRequest:
    """A request signed by botocore at `case.now`."""
    request = AWSRequest(method=case.method, url=case.url, data=case.body)
    for name, value in list(case.extra.items()) + list(headers or []):
        request.headers[name] = value  # HTTPHeaders appends: repeated names keep every value
    signer = signer_cls(Credentials(case.access_key_id, case.secret), service, case.region)
    with botocore_clock(case.now):
        signer.add_auth(request)
    expected_date = datetime.fromtimestamp(case.now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    assert request.headers["X-Amz-Date"] == expected_date, "botocore did not use the frozen clock"
    return request


def wire_headers(request: AWSRequest) -> dict[str, list[str]]:
    """The headers as the server will hand them to verify: lower-case name -> every value.

    botocore signs a Host it derives from the URL but leaves sending it to the HTTP client,
    which sends the URL's authority; add it the same way.
    """
    out: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        out.setdefault(name.lower(), []).append(value)
    out.setdefault("host", [request.url.split("/", 3)[2]])
    return out


@dataclass
class Wire:
    """A request as the server sees it; `verify()` feeds it to sigv4.verify."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    secrets: dict[str, str]
    regions: frozenset[str]
    now: float

    def verify(self) -> sigv4.Authorization:
        return sigv4.verify(
            method=self.method,
            path=self.path,
            query=(),
            headers=self.headers,
            body=self.body,
            lookup_secret=self.secrets.get,
            regions=self.regions,
            now=self.now,
        )

    def set_header(self, name: str, *values: str) -> Wire:
        return replace(self, headers={**self.headers, name: list(values)})

    def drop_header(self, name: str) -> Wire:
        return replace(self, headers={k: v for k, v in self.headers.items() if k != name})


def wire(case: Case, request: AWSRequest | None = None) -> Wire:
    request = request if request is not None else boto_request(case)
    return Wire(
        method=case.method,
        path=case.path,
        headers=wire_headers(request),
        body=request.body or b"",
        secrets={case.access_key_id: case.secret},
        regions=frozenset({case.region, "us-east-1"}),
        now=case.now,
    )


def rejected(w: Wire, match: str | None = None) -> None:
    with pytest.raises(AuthenticationFailedException, match=match):
        w.verify()


# --------------------------------------------------------------------------- 1. sign() == botocore


def our_sign(case: Case) -> dict[str, str]:
    return sigv4.sign(
        method=case.method, url_path=case.path, host=case.host, body=case.body, access_key_id=case.access_key_id,
        secret=case.secret, region=case.region, now=case.now, extra_headers=case.extra,
    )  # fmt: skip


def test_sign_matches_botocore_authorization_header():
    assert len(CASES) >= 200
    for case in CASES:
        ours = our_sign(case)
        theirs = boto_request(case)
        assert ours["X-Amz-Date"] == theirs.headers["X-Amz-Date"]
        assert ours["Authorization"] == theirs.headers["Authorization"], case.path


def test_sign_output_is_accepted_by_verify():
    for case in CASES:
        headers = our_sign(case)
        w = replace(wire(case), headers={k.lower(): [v] for k, v in headers.items()})
        assert w.verify().access_key_id == case.access_key_id


def test_sign_and_verify_agree_with_botocore_on_percent_encoded_and_sub_delim_paths():
    """XKS paths are plain, but the canonical URI rule must still be botocore's (encode the wire path once)."""
    base = CASES[0]
    for path in [
        "/a%20b/kms/xks/v1/keys/k/encrypt",
        "/pre~fix/kms/xks/v1/keys/k:1/encrypt",
        "/p/kms/xks/v1/keys/a+b=c,d;e@f!$'()*/decrypt",
        "/p/kms/xks/v1/keys/%E2%82%AC/metadata",
        "/p/./q/../kms//xks/v1/keys/k/encrypt/",
        "",
    ]:
        case = replace(base, path=path)
        theirs = boto_request(case)
        ours = our_sign(case)
        assert ours["Authorization"] == theirs.headers["Authorization"], path
        wire(case, theirs).verify()


def test_method_is_canonicalised_upper_case_like_botocore():
    case = replace(CASES[4], method="post")
    theirs = boto_request(case)
    ours = our_sign(case)
    assert ours["Authorization"] == theirs.headers["Authorization"]
    wire(case, theirs).verify()
    rejected(replace(wire(case, theirs), method="PUT"), "signature")


# --------------------------------------------------------------------------- 2. verify()


def test_verify_accepts_every_botocore_signed_request():
    for case in CASES:
        auth = wire(case).verify()
        assert auth.access_key_id == case.access_key_id
        assert auth.region == case.region
        assert auth.service == SERVICE
        assert "host" in auth.signed_headers and "x-amz-date" in auth.signed_headers


# A subset keeps the negative tests quick; each still covers dozens of random shapes.
SOME = CASES[:60]


def test_verify_rejects_modified_body():
    for case in SOME:
        w = wire(case)
        body = bytes([w.body[0] ^ 1]) + w.body[1:] if w.body else b"x"
        rejected(replace(w, body=body), "signature")
        rejected(replace(w, body=w.body + b"\0"), "signature")


def test_verify_rejects_modified_path():
    for case in SOME:
        w = wire(case)
        last = w.path[-1]
        rejected(replace(w, path=w.path[:-1] + ("x" if last != "x" else "y")), "signature")
        rejected(replace(w, path="/other" + w.path), "signature")


def test_verify_rejects_modified_signed_header_value():
    for case in SOME:
        w = wire(case)
        rejected(w.set_header("host", "evil.example.com"), "signature")
        for name in w.headers:
            if name in {"content-type", "x-xks-note", "x-amz-meta-trace", "x-request-id"}:
                rejected(w.set_header(name, w.headers[name][0] + "x"), "signature")
                rejected(w.set_header(name, *w.headers[name], "extra"), "signature")


def test_verify_rejects_missing_signed_header():
    for case in SOME:
        w = wire(case)
        rejected(w.drop_header("host"), "host")
        for name in ("content-type", "x-xks-note"):
            if name in w.headers:
                rejected(w.drop_header(name), name)


def test_verify_ignores_unsigned_headers():
    for case in SOME[:10]:
        w = wire(case).set_header("user-agent", "curl/7.88.1").set_header("accept", "*/*")
        w.verify()


def test_verify_rejects_wrong_secret():
    for case in SOME:
        w = wire(case)
        s = case.secret
        wrong = s[:-1] + ("A" if s[-1] != "A" else "B")
        rejected(replace(w, secrets={case.access_key_id: wrong}), "signature")
        rejected(replace(w, secrets={case.access_key_id: s + "x"}), "signature")


def test_verify_rejects_unknown_access_key_id():
    for case in SOME:
        rejected(replace(wire(case), secrets={}), "access key id")
        rejected(replace(wire(case), secrets={"OTHERKEYIDOTHERKEYID": case.secret}), "access key id")


def test_verify_rejects_region_not_served():
    for case in SOME:
        w = wire(case)
        rejected(replace(w, regions=frozenset()), "region")
        rejected(replace(w, regions=frozenset({"zz-nowhere-1", case.region.upper()})), "region")


def test_verify_rejects_other_services():
    for case in SOME[:20]:
        for service in ("kms", "kms-xks-proxy2", "KMS-XKS-PROXY", "s3", "execute-api"):
            rejected(wire(case, boto_request(case, service=service)), "service")


@pytest.mark.parametrize("skew", [-301, 301, -3600, 86400])
def test_verify_rejects_clock_skew_beyond_five_minutes(skew):
    for case in SOME:
        w = wire(case)
        rejected(replace(w, now=w.now + skew), "5 minutes")


@pytest.mark.parametrize("skew", [-300, -299, -1, 0, 1, 299, 300])
def test_verify_accepts_clock_skew_within_five_minutes(skew):
    for case in SOME:
        w = wire(case)
        # The signed time is case.now truncated to a second.
        replace(w, now=int(case.now) + skew).verify()


def test_verify_default_clock_is_wall_clock():
    case = replace(CASES[0], now=time.time())
    w = wire(case)
    sigv4.verify(
        method=w.method,
        path=w.path,
        query=(),
        headers=w.headers,
        body=w.body,
        lookup_secret=w.secrets.get,
        regions=w.regions,
    )
    stale = wire(replace(case, now=time.time() - 600))
    with pytest.raises(AuthenticationFailedException):
        sigv4.verify(
            method=stale.method,
            path=stale.path,
            query=(),
            headers=stale.headers,
            body=stale.body,
            lookup_secret=stale.secrets.get,
            regions=stale.regions,
        )


def test_verify_rejects_missing_authorization():
    for case in SOME[:10]:
        rejected(wire(case).drop_header("authorization"), "missing")
        rejected(wire(case).set_header("authorization", ""), "missing")


def test_verify_rejects_malformed_authorization():
    case = CASES[1]
    w = wire(case)
    good = w.headers["authorization"][0]
    sig = good.rsplit("Signature=", 1)[1]
    cred = good.split("Credential=", 1)[1].split(",", 1)[0]
    akid, date, region, service, term = cred.split("/")
    malformed = [
        "Bearer abc",
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA256 ",
        good.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
        good.replace("AWS4-HMAC-SHA256", "aws4-hmac-sha256"),
        good.replace("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256"),
        good.replace("Credential=", "Credentials="),
        good.replace("SignedHeaders=", "Signedheaders="),
        good.replace("Signature=", "Sig="),
        good.replace(sig, sig.upper()),
        good.replace(sig, sig[:-1]),
        good.replace(sig, sig + "0"),
        good.replace(sig, sig[:-1] + "g"),
        good.replace(cred, f"{akid}/{date}/{region}/{service}"),
        good.replace(cred, f"{akid}/{date}/{region}/{service}/aws4_request/x"),
        good.replace(cred, f"{akid}/{date}/{region}/{service}/aws5_request"),
        good.replace(cred, f"{akid}/{date[:6]}/{region}/{service}/{term}"),
        good.replace(cred, f"{akid}/{date}X/{region}/{service}/{term}"),
        good.replace(cred, f"/{date}/{region}/{service}/{term}"),
        good.replace(cred, f"{akid}/{date}//{service}/{term}"),
        good.replace("SignedHeaders=", "SignedHeaders=;"),
        good.replace("SignedHeaders=", "SignedHeaders=Host;"),
        good.split(", Signature=")[0],
        good + ", Signature=" + sig,
        good + " trailing",
        good.replace(", ", " "),
    ]
    for header in malformed:
        assert header != good
        rejected(w.set_header("authorization", header))
    # The same header twice is ambiguous: refuse rather than pick one.
    rejected(w.set_header("authorization", good, good))


class _WithoutHost(SigV4Auth):
    """Signs correctly, but leaves host out of SignedHeaders."""

    def headers_to_sign(self, request):
        headers = super().headers_to_sign(request)
        del headers["host"]
        return headers


class _WithoutAmzDate(SigV4Auth):
    """Signs correctly, but leaves x-amz-date out of SignedHeaders."""

    def headers_to_sign(self, request):
        headers = super().headers_to_sign(request)
        del headers["x-amz-date"]
        return headers


def test_verify_rejects_signed_headers_without_host_or_x_amz_date():
    for case in SOME[:20]:
        rejected(wire(case, boto_request(case, signer_cls=_WithoutHost)), "host")
        rejected(wire(case, boto_request(case, signer_cls=_WithoutAmzDate)), "x-amz-date")


def test_verify_rejects_unsorted_or_duplicated_signed_headers():
    w = wire(CASES[2])
    good = w.headers["authorization"][0]
    rejected(w.set_header("authorization", good.replace("host;x-amz-date", "x-amz-date;host")), "SignedHeaders")
    rejected(w.set_header("authorization", good.replace("host;x-amz-date", "host;host;x-amz-date")), "SignedHeaders")


class _OtherScopeDate(SigV4Auth):
    """Signs correctly (a valid HMAC under the scope it declares), but with a credential scope
    naming a different day than X-Amz-Date."""

    def _shifted(self, request) -> str:
        stamp = request.context["timestamp"]
        day = datetime.strptime(stamp[:8], "%Y%m%d").toordinal()
        return datetime.fromordinal(day - 1).strftime("%Y%m%d") + stamp[8:]

    def credential_scope(self, request):
        return "/".join((self._shifted(request)[:8], self._region_name, self._service_name, "aws4_request"))

    def scope(self, request):
        return f"{self.credentials.access_key}/{self.credential_scope(request)}"

    def signature(self, string_to_sign, request):
        saved = request.context["timestamp"]
        request.context["timestamp"] = self._shifted(request)
        try:
            return super().signature(string_to_sign, request)
        finally:
            request.context["timestamp"] = saved


def test_verify_rejects_scope_date_not_matching_x_amz_date():
    for case in SOME[:20]:
        # Just after midnight: the scope names yesterday, the header today, within the skew window.
        midnight = (int(case.now) // 86400) * 86400
        case = replace(case, now=midnight + 10)
        w = wire(case, boto_request(case, signer_cls=_OtherScopeDate))
        assert w.headers["authorization"][0].split("/")[1] != w.headers["x-amz-date"][0][:8]
        rejected(w, "date")


def test_verify_rejects_bad_x_amz_date():
    w = wire(CASES[3])
    stamp = w.headers["x-amz-date"][0]
    for bad in ["", stamp[:-1], stamp + "0", stamp.replace("T", " "), stamp.lower(), stamp[:8], "2024111T123456Z"]:
        rejected(w.set_header("x-amz-date", bad))
    rejected(w.drop_header("x-amz-date"))
    rejected(w.set_header("x-amz-date", stamp, stamp))


def test_parse_amz_date_is_strict():
    for case in CASES:
        moment = datetime.fromtimestamp(case.now, tz=timezone.utc)
        assert sigv4.parse_amz_date(moment.strftime("%Y%m%dT%H%M%SZ")) == float(int(case.now))
    for bad in [
        None,
        "",
        "20240131T240000Z",  # would otherwise roll over to 20240201T000000Z
        "20241301T000000Z",
        "20240230T000000Z",
        "20240101T006000Z",
        "20240101T000060Z",
        "20240101T000000",
        "20240101T000000z",
        "2024-01-01T00:00:00Z",
        "2024111T123456Z",  # strptime would read 2024-11-01
        " 20240101T000000Z",
        "\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661T000000Z",  # non-ASCII digits
    ]:
        with pytest.raises(AuthenticationFailedException):
            sigv4.parse_amz_date(bad)


def test_verify_checks_x_amz_content_sha256():
    for case in SOME[:30]:
        digest = hashlib.sha256(case.body).hexdigest()
        # Present and matching: accepted whether signed or not.
        wire(case, boto_request(case, headers=[("X-Amz-Content-SHA256", digest)])).verify()
        wire(case).set_header("x-amz-content-sha256", digest).verify()
        # Present but not the body's hash: botocore signs the declared value, we must refuse it.
        other = hashlib.sha256(case.body + b"!").hexdigest()
        for declared in (other, "UNSIGNED-PAYLOAD", digest.upper(), ""):
            rejected(wire(case, boto_request(case, headers=[("X-Amz-Content-SHA256", declared)])), "Sha256")
            rejected(wire(case).set_header("x-amz-content-sha256", declared), "Sha256")


def test_header_whitespace_is_canonicalised_like_botocore():
    signer = SigV4Auth(Credentials("A" * 20, "s" * 43), SERVICE, "us-east-1")
    values = EXTRA_VALUES + CONTENT_TYPES + ["", " ", "\t", "a\t\t\tb", "  a  ,  b  ", "x\x0by", "x\x0cy", "é  ü"]
    for value in values:
        request = AWSRequest(method="POST", url="https://h.example/p", data=b"")
        request.headers["X-Ws"] = value
        request.headers["X-Ws"] = value + "  second"  # repeated header: values joined with ","
        theirs = signer.canonical_headers(signer.headers_to_sign(request)) + "\n"
        ours = sigv4.canonical_headers(
            {"host": ["h.example"], "x-ws": [value, value + "  second"]}, ("host", "x-ws")
        )
        assert ours == theirs, repr(value)
    # End to end: botocore signs messy whitespace; a server (or a proxy) may see it re-spaced.
    for case in SOME[:30]:
        messy = [("X-Xks-Ws", "  a \t  b   c\t"), ("X-Xks-Ws", "d     e"), ("Content-Type", "application/json ;   v=1")]
        w = wire(replace(case, extra={}), boto_request(replace(case, extra={}), headers=messy))
        w.verify()
        w.set_header("x-xks-ws", "a b c", "d e").set_header("content-type", "application/json ; v=1").verify()
        # Two header lines canonicalise as one comma-joined line (as in HTTP); anything else changes it.
        w.set_header("x-xks-ws", "a b c,d e").verify()
        rejected(w.set_header("x-xks-ws", "a b c", "de"), "signature")
        rejected(w.set_header("x-xks-ws", "a bc", "d e"), "signature")
        rejected(w.set_header("x-xks-ws", "a b c"), "signature")


def test_verify_of_repeated_signed_header_uses_all_values_in_order():
    for case in SOME[:20]:
        case = replace(case, extra={})
        w = wire(case, boto_request(case, headers=[("X-Rep", "one"), ("X-Rep", "two")]))
        w.verify()
        rejected(w.set_header("x-rep", "two", "one"), "signature")


# --------------------------------------------------------------------------- 3. the signing-key cache


def _uncached_signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def test_signing_key_cache_matches_uncached_chain():
    rng = random.Random(SEED ^ 0xCAFE)
    sigv4.signing_key.cache_clear()
    inputs = []
    for _ in range(1500):  # more than the cache holds: evictions must not serve stale keys
        secret = _word(rng, SECRET_ALPHABET, 43, 64)
        date = datetime.fromtimestamp(rng.uniform(1e9, 4e9), tz=timezone.utc).strftime("%Y%m%d")
        region = rng.choice(REGIONS)
        service = rng.choice([SERVICE, SERVICE, "kms"])
        inputs.append((secret, date, region, service))
    # Near-collisions: same secret, neighbouring days / other regions must get other keys.
    secret = inputs[0][0]
    inputs += [(secret, d, r, SERVICE) for d in ("20240101", "20240102") for r in ("us-east-1", "us-east-2")]
    inputs += [(secret[:-1], "20240101", "us-east-1", SERVICE), (secret + "=", "20240101", "us-east-1", SERVICE)]
    for args in inputs + inputs[::-1] + rng.sample(inputs, 300):
        assert sigv4.signing_key(*args) == _uncached_signing_key(*args)
    assert len({sigv4.signing_key(*a) for a in inputs}) == len(set(inputs))
    info = sigv4.signing_key.cache_info()
    assert info.hits > 0


def test_signing_key_default_service_is_xks():
    assert sigv4.signing_key("s" * 43, "20240101", "us-east-1") == _uncached_signing_key(
        "s" * 43, "20240101", "us-east-1", SERVICE
    )


# --------------------------------------------------------------------------- 4. curl --aws-sigv4


CURL = shutil.which("curl")
CURL_AKID = "CURLTESTAKIDCURLTESTAKID23"
CURL_SECRET = "Curl/Test+Secret=0123456789abcdefghijklmnopqrstuvwxyzABCD"


def _need_curl() -> str:
    if CURL is None:
        if os.environ.get("XKS_TEST_STRICT") == "1":
            pytest.fail("curl is not installed and XKS_TEST_STRICT=1")
        pytest.skip("curl is not installed")
    return CURL


async def _curl(url: str, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        _need_curl(), "-q", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}", *args, url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 0, err.decode(errors="replace")
    return int(out), err.decode(errors="replace")


async def test_curl_aws_sigv4_is_accepted_and_wrong_secret_rejected(tmp_path):
    from aiohttp import web

    _need_curl()
    accepted: list[sigv4.Authorization] = []
    seen_headers: list[dict[str, list[str]]] = []

    async def handler(request: web.Request) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        headers = {k.lower(): request.headers.getall(k) for k in request.headers.keys()}
        seen_headers.append(headers)
        try:
            auth = sigv4.verify(
                method=request.method,
                path=path,
                query=parse_qsl(query, keep_blank_values=True),
                headers=headers,
                body=await request.read(),
                lookup_secret={CURL_AKID: CURL_SECRET}.get,
                regions=frozenset({"us-east-1"}),
            )
        except AuthenticationFailedException as e:
            return web.json_response(e.body(), status=401)
        accepted.append(auth)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}/xks-Prefix_1/kms/xks/v1"
        json_body = '{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice","kmsOperation":"Encrypt"},"plaintext":"SGVsbG8="}'
        binary = tmp_path / "body.bin"
        binary.write_bytes(random.Random(SEED).randbytes(3000) + b"\n\r\n  ")

        def sig(secret: str, region: str = "us-east-1", service: str = SERVICE) -> list[str]:
            return ["--aws-sigv4", f"aws:amz:{region}:{service}", "--user", f"{CURL_AKID}:{secret}"]

        ct = ["-H", "Content-Type: application/json"]
        requests = [
            # (expected status, url, curl args)
            (200, f"{base}/keys/key.1-A_b/encrypt", sig(CURL_SECRET) + ct + ["--data", json_body]),
            (200, f"{base}/keys/k/decrypt", sig(CURL_SECRET) + ct + ["--data", "{}"]),
            (200, f"{base}/keys/k/metadata", sig(CURL_SECRET) + ct + ["--data-binary", f"@{binary}"]),
            (200, f"{base}/health", sig(CURL_SECRET) + ct + ["--data", ""]),
            (200, f"{base}/health", sig(CURL_SECRET)),  # GET, no body, no content-type
            # curl >= 8 signs x-amz-content-sha256 on its own; give it one explicitly here.
            (
                200,
                f"{base}/keys/k/encrypt",
                sig(CURL_SECRET)
                + ct
                + ["-H", f"x-amz-content-sha256: {hashlib.sha256(json_body.encode()).hexdigest()}"]
                + ["--data", json_body],
            ),
            (401, f"{base}/keys/key.1-A_b/encrypt", sig(CURL_SECRET[:-1] + "X") + ct + ["--data", json_body]),
            (401, f"{base}/keys/k/encrypt", sig(CURL_SECRET, region="eu-west-1") + ct + ["--data", json_body]),
            (401, f"{base}/keys/k/encrypt", sig(CURL_SECRET, service="kms") + ct + ["--data", json_body]),
            (
                401,
                f"{base}/keys/k/encrypt",
                sig(CURL_SECRET)
                + ct
                + ["-H", f"x-amz-content-sha256: {hashlib.sha256(b'other').hexdigest()}"]
                + ["--data", json_body],
            ),
            (401, f"{base}/keys/k/encrypt", ct + ["--data", json_body]),  # unsigned
        ]
        for expected, url, args in requests:
            status, err = await _curl(url, *args)
            assert status == expected, (url, args[-1][:40], err)
    finally:
        await runner.cleanup()

    assert len(accepted) == 6
    assert all(a.access_key_id == CURL_AKID and a.region == "us-east-1" for a in accepted)
    # curl signs content-type when it sends one; verify handled it.
    assert any("content-type" in a.signed_headers for a in accepted)
    assert any("x-amz-content-sha256" in h for h in seen_headers)
