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


# --------------------------------------------------------------------------- 5. randomized differential test


N_DIFF = 300
DIFF_SEED = 0x5167_D1FF
TOKEN_CHARS = string.ascii_letters + string.digits + "-_!#$%&'*+.^`|~"
# Header value pieces: runs of ASCII and Unicode whitespace (str.split's set, which botocore uses
# too), commas, non-ASCII letters (sent as UTF-8), and the ASCII controls str.split treats as space.
VALUE_PIECES = ["a", "Zz", "0", "json", "x=y", ",", ";", "/", " ", "  ", "\t", " \t ", "   ", "é", "ü", "€", "日本",
                "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0", "\u2003", "\u3000", '"q"', "()", "\\"]  # fmt: skip
PATH_PIECES = ["a", "Key-1", "k.v", "x_y", "~t", ".", "..", "", "%20", "%2F", "%E2%82%AC", "kms", "xks", "v1", "encrypt"]
QUERY_CHARS = string.ascii_letters + string.digits + " -_.~/=&+é€"
MUTANTS = "aAz0 \t,./;=é\x0b\u00a0\udce9"  # \udce9: a byte >= 0x80 that was not UTF-8, as aiohttp hands it on
AVOID = {"authorization", "x-amz-date", "host", "x-amz-content-sha256", "x-amz-security-token"}


@dataclass
class Spec:
    """A request both signers see: the raw path, decoded query pairs, header lines in order."""

    method: str
    host: str
    path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body: bytes
    now: float
    access_key_id: str
    secret: str
    region: str


def _value(rng: random.Random) -> str:
    return "".join(rng.choice(VALUE_PIECES) for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 9])))


def random_spec(rng: random.Random) -> Spec:
    headers: list[tuple[str, str]] = []
    for _ in range(rng.randint(0, 6)):
        name = _word(rng, TOKEN_CHARS, 1, 20)
        if name.lower() in AVOID:
            continue
        headers.append((name, _value(rng)))
        if rng.random() < 0.25:  # the same header again, maybe spelt in another case
            headers.append((rng.choice([name, name.upper(), name.lower()]), _value(rng)))
    if rng.random() < 0.5:
        headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
    if rng.random() < 0.2:
        headers.append(("User-Agent", "aws-sdk/" + _value(rng)))  # botocore leaves it unsigned
    rng.shuffle(headers)
    body = random_body(rng)
    if rng.random() < 0.2:
        headers.append(("X-Amz-Content-SHA256", hashlib.sha256(body).hexdigest()))
    segments = [rng.choice(PATH_PIECES) for _ in range(rng.randint(0, 8))]
    path = rng.choice(["", "/"]) + "/".join(segments) + rng.choice(["", "", "/", "//"])
    path = path if path.startswith("/") or not path else "/" + path
    query = [(_word(rng, QUERY_CHARS, 1, 6), _word(rng, QUERY_CHARS, 0, 6)) for _ in range(rng.choice([0, 0, 1, 3]))]
    return Spec(
        method=rng.choice(["POST", "POST", "GET", "post"]), host=rng.choice(HOSTS), path=path, query=query,
        headers=headers, body=body, now=rng.uniform(1e9, 4e9), access_key_id=_word(rng, AKID_ALPHABET, 20, 30),
        secret=_word(rng, SECRET_ALPHABET, 43, 64), region=rng.choice(REGIONS),
    )  # fmt: skip


def botocore_signed(spec: Spec) -> list[tuple[str, str]] | None:
    """The header lines botocore sends for `spec` (Host added as an HTTP client does), or None when
    botocore cannot sign it (a lone surrogate: no UTF-8 for it)."""
    if any(not value.isascii() and "\udc80" <= max(value) for _, value in spec.headers):
        return None  # (email.message hands such a value back as a Header object botocore cannot trim)
    request = AWSRequest(method=spec.method, url=f"https://{spec.host}{spec.path}", data=spec.body,
                         params=list(spec.query))  # fmt: skip
    for name, value in spec.headers:
        request.headers[name] = value
    signer = SigV4Auth(Credentials(spec.access_key_id, spec.secret), SERVICE, spec.region)
    with botocore_clock(spec.now):
        signer.add_auth(request)
    lines = list(request.headers.items())
    if not any(name.lower() == "host" for name, _ in lines):
        lines.append(("Host", spec.host))
    return lines


def _signature(lines: list[tuple[str, str]] | None) -> str | None:
    if lines is None:
        return None
    return next(v for k, v in lines if k.lower() == "authorization").rsplit("Signature=", 1)[1]


def verify_both_ways(spec: Spec, lines: list[tuple[str, str]]) -> str:
    """verify() on a dict (lower-case name -> values) and on aiohttp's CIMultiDictProxy, as the
    server calls it: both must agree. Returns "ok" or the AuthenticationFailedException message."""
    from multidict import CIMultiDict, CIMultiDictProxy

    as_dict: dict[str, list[str]] = {}
    for name, value in lines:
        as_dict.setdefault(name.lower(), []).append(value)
    as_multidict = CIMultiDictProxy(CIMultiDict(lines))
    outcomes = []
    for headers in (as_dict, as_multidict):
        try:
            sigv4.verify(method=spec.method, path=spec.path, query=tuple(spec.query), headers=headers, body=spec.body,
                         lookup_secret={spec.access_key_id: spec.secret}.get, regions=frozenset({spec.region}),
                         now=spec.now)  # fmt: skip
            outcomes.append("ok")
        except AuthenticationFailedException as exc:
            outcomes.append(exc.message)
    assert outcomes[0] == outcomes[1], outcomes
    return outcomes[0]


def _mutate(rng: random.Random, text: str, chars: str = MUTANTS) -> str:
    """One character replaced by another, or one inserted or deleted."""
    i = rng.randrange(len(text) + 1)
    roll = rng.random()
    if roll < 0.2 or not text:
        return text[:i] + rng.choice(chars) + text[i:]
    i = min(i, len(text) - 1)
    if roll < 0.35:
        return text[:i] + text[i + 1 :]
    return text[:i] + rng.choice([c for c in chars if c != text[i]]) + text[i + 1 :]


def _mutate_path(rng: random.Random, path: str) -> str:
    """A path as it can arrive on a request line: still starting with "/" (or empty)."""
    mutated = "/" + _mutate(rng, path[1:], "aZ0./-_~%")
    return mutated if path or mutated != "/" else "/x"


DIFF_SPECS = [random_spec(random.Random(DIFF_SEED + i)) for i in range(N_DIFF)]


def test_differential_verify_accepts_exactly_what_botocore_signs():
    """Hundreds of generated requests, signed by botocore: verify accepts each as sent; a mutation
    of a header value or the path is accepted exactly when botocore's signature of the mutated
    request is the same one (whitespace runs, "//" and "." segments canonicalise alike), and
    refused otherwise; a changed body or signature is always refused."""
    rng = random.Random(DIFF_SEED)
    kept = refused = 0
    for spec in DIFF_SPECS:
        lines = botocore_signed(spec)
        assert lines is not None
        signature = _signature(lines)
        assert verify_both_ways(spec, lines) == "ok", spec
        # The signature, one hex digit changed (a non-hex one is malformed: refused as well).
        for _ in range(3):
            i = rng.randrange(64)
            other = rng.choice([c for c in "0123456789abcdefA" if c != signature[i]])
            forged = signature[:i] + other + signature[i + 1 :]
            bad = [(k, v.replace(signature, forged)) if k.lower() == "authorization" else (k, v) for k, v in lines]
            assert verify_both_ways(spec, bad) != "ok"
        # The body: one byte changed, one added, one removed.
        bodies = [spec.body + bytes([rng.randrange(256)])]
        if spec.body:
            i = rng.randrange(len(spec.body))
            bodies += [spec.body[:i] + bytes([spec.body[i] ^ (1 << rng.randrange(8))]) + spec.body[i + 1 :],
                       spec.body[:i] + spec.body[i + 1 :]]  # fmt: skip
        for body in bodies:
            assert verify_both_ways(replace(spec, body=body), lines) != "ok"
        # A header value (signed or not), and the path: the verdict is botocore's.
        mutants = []
        for j, (name, value) in enumerate(spec.headers):
            headers = list(spec.headers)
            headers[j] = (name, _mutate(rng, value))
            wire = [(k, v) for k, v in lines]
            wire[lines.index((name, value))] = headers[j]
            mutants.append((replace(spec, headers=headers), wire))
        for _ in range(2):
            mutants.append((replace(spec, path=_mutate_path(rng, spec.path)), lines))
        for mutant, wire in mutants:
            same = _signature(botocore_signed(mutant)) == signature
            unsigned = any(n.lower() in botocore.auth.SIGNED_HEADERS_BLACKLIST for n, _ in mutant.headers
                           if (n, _) not in spec.headers)  # fmt: skip
            outcome = verify_both_ways(mutant, wire)
            assert (outcome == "ok") == (same or unsigned), (spec, mutant, outcome)
            kept += outcome == "ok"
            refused += outcome != "ok"
    # Both verdicts occur often: the mutations do test the canonical form, not only break it.
    assert kept > 50 and refused > 500, (kept, refused)


def test_differential_non_utf8_bytes_in_a_signed_header_are_refused_not_an_error():
    """A signed value holding a byte >= 0x80 that is not UTF-8 (aiohttp keeps it as a lone
    surrogate) or UTF-8 read as latin-1: AuthenticationFailedException, never UnicodeEncodeError."""
    for spec in DIFF_SPECS[:60]:
        spec = replace(spec, headers=spec.headers + [("X-Xks-Extra", "café")])
        lines = botocore_signed(spec)
        assert verify_both_ways(spec, lines) == "ok"
        for wire_value in ("caf\udce9", "caf\udcc3\udca9", "café".encode().decode("latin-1"), "\udcff"):
            wire = [(k, wire_value if k == "X-Xks-Extra" else v) for k, v in lines]
            assert "signature" in verify_both_ways(spec, wire) or "UTF-8" in verify_both_ways(spec, wire)
        path = spec.path + "/caf\udce9"
        assert verify_both_ways(replace(spec, path=path), lines) != "ok"


def test_split_authorization_parse_agrees_with_the_whole_regex():
    """parse_authorization parses the part before the signature once (cached) and the signature
    apart: on mutations of real headers it accepts exactly what the one regex over the whole
    stripped header accepts, with the same fields."""
    rng = random.Random(DIFF_SEED ^ 0xA0)
    goods = [wire(case).headers["authorization"][0] for case in SOME[:20]]
    goods += [g.replace(", ", " ,\t ") for g in goods[:5]] + [" " + g + " \t" for g in goods[:5]]
    goods += [goods[0].replace("Credential=", "Credential=Signature=", 1)]  # "Signature=" twice: the last one counts
    long_akid = goods[1].replace("Credential=", "Credential=" + "A" * 600, 1)  # a head over the cached length
    tried = accepted = 0
    for good in goods + [long_akid]:
        candidates = [good] + [_mutate(rng, good) for _ in range(60)]
        candidates += [good.replace("Signature=", "Signature=Signature="), good + "\n", good + "\x85", good[:-1]]
        for header in candidates:
            match = sigv4._AUTH_RE.match(header.strip())
            try:
                auth = sigv4.parse_authorization(header)
            except AuthenticationFailedException:
                assert match is None, repr(header)
                continue
            assert match is not None, repr(header)
            assert auth == (match["akid"], match["date"], match["region"], match["service"],
                            tuple(match["signed"].split(";")), match["signature"])  # fmt: skip
            accepted += 1
        tried += len(candidates)
    assert accepted > 30 and tried - accepted > 500
    assert sigv4.parse_authorization(long_akid).access_key_id == "A" * 600 + goods[1].split("Credential=")[1].split("/")[0]


def test_hmac_and_sha256_from_copied_contexts_match_hmac_and_hashlib():
    """The hot path's HMAC (copies of a key's two padded contexts) and SHA-256 (copies of an empty
    context) against hmac.new and hashlib, on keys shorter than, equal to and longer than a block."""
    rng = random.Random(SEED ^ 0xB10C)
    for _ in range(400):
        key = rng.randbytes(rng.choice([0, 1, 31, 32, 63, 64, 65, 100, 200]))
        contexts = sigv4._hmac_contexts(key)
        for msg in (b"", rng.randbytes(rng.randint(1, 300)), rng.randbytes(rng.randint(1000, 5000))):
            assert sigv4._hmac_hex(contexts, msg) == hmac.new(key, msg, hashlib.sha256).hexdigest()
            assert sigv4._sha256_hex(msg) == hashlib.sha256(msg).hexdigest()
    # The cached contexts are only ever copied: signing twice, or after other keys, gives the same.
    args = ("s" * 43, "20240101", "us-east-1", SERVICE)
    first = sigv4._hmac_hex(sigv4._signer(*args), b"m")
    sigv4._hmac_hex(sigv4._signer("t" * 43, "20240101", "us-east-1", SERVICE), b"other")
    assert sigv4._hmac_hex(sigv4._signer(*args), b"m") == first == hmac.new(_uncached_signing_key(*args), b"m", hashlib.sha256).hexdigest()
