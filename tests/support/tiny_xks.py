"""A tiny, independent XKS proxy, written only from docs/xks-protocol.md (the protocol notes).

It imports nothing from xks_proxy or keymanager: it is the "any spec-compliant proxy" the local
KMS is also tested against. One logical key store (a URI prefix, one SigV4 credential, one
region), AES-256 keys in memory, the four operations with the spec's AAD binding and CDIV, the
spec's error table, and switches a test can flip while it runs:

    tiny.disabled.add("foo")          # the key reports DISABLED and refuses crypto
    tiny.delay = 0.4                  # every answer waits this long (KMS gives up after 250 ms)
    tiny.fail_with = "InternalException"   # every authenticated request answers this error

In-process: `async with TinyXks(...) as tiny:` (on the caller's loop) or `with TinyXks(...).running():`
(on its own thread, for synchronous callers such as boto3 tests). As a program:
`python -m tests.support.tiny_xks --port N [--tls DIR] [--delay S] [--disabled KEY] [--fail-with NAME]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STATUS = {
    "ValidationException": 400, "InvalidStateException": 400, "InvalidCiphertextException": 400,
    "InvalidKeyUsageException": 400, "AuthenticationFailedException": 401, "AccessDeniedException": 403,
    "KeyNotFoundException": 404, "InvalidUriPathException": 404, "ThrottlingException": 429,
    "InternalException": 500, "UnsupportedOperationException": 501, "DependencyTimeoutException": 503,
}  # fmt: skip
BOTH = ("ENCRYPT", "DECRYPT")
METADATA = b"tiny-v1"  # our ciphertextMetadata: opaque to KMS, bound into the AAD
_B64 = re.compile(r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,\s*"
                   r"SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})\Z")  # fmt: skip


class XksError(Exception):
    def __init__(self, name: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.name, self.message, self.status = name, message, status or STATUS[name]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bound_aad(aad: bytes | None, meta: bytes | None) -> bytes:
    """uint16_be(len(AAD)) || SHA-256(AAD) [if present] || uint8(len(metadata)) || metadata."""
    head = b"\x00\x00" if aad is None else struct.pack(">H", len(aad)) + hashlib.sha256(aad).digest()
    meta = meta or b""
    return head + struct.pack(">B", len(meta)) + meta


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


@dataclass
class TinyXks:
    prefix: str = "tiny"
    access_key_id: str = "TINYXKSACCESSKEY2345"
    secret: str = field(default="tinyXksSecretThatIsLongEnoughForTheSpec/+0123456789abc", repr=False)
    region: str = "us-east-1"
    keys: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"foo": BOTH})
    tls_dir: Path | None = None  # with a directory: HTTPS with a fresh CA written to tls_dir/ca.pem
    port: int = 0
    disabled: set[str] = field(default_factory=set)
    delay: float = 0.0
    fail_with: str | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)  # every requestMetadata received

    def __post_init__(self) -> None:
        self.material = {name: AESGCM(AESGCM.generate_key(256)) for name in self.keys}
        self._runner: web.AppRunner | None = None

    @property
    def uri_path(self) -> str:
        return f"/{self.prefix}/kms/xks/v1" if self.prefix else "/kms/xks/v1"

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://localhost:{self.port}"

    @property
    def ca_path(self) -> Path | None:
        return self.tls_dir / "ca.pem" if self.tls_dir else None

    def proxy_config(self) -> dict[str, Any]:
        """The KMS proxy configuration file for this store."""
        return {"XksProxyUriPath": self.uri_path,
                "XksProxyAuthenticationCredential": {"AccessKeyId": self.access_key_id, "RawSecretAccessKey": self.secret}}

    # --- running -----------------------------------------------------------------------------------

    async def __aenter__(self) -> "TinyXks":
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl_context())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @contextlib.contextmanager
    def running(self) -> Iterator["TinyXks"]:
        """Serve on a background thread with its own event loop (for synchronous tests)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tiny-xks", daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(self.__aenter__(), loop).result(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.__aexit__(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_dir is None:
            return None
        import trustme

        ca = trustme.CA()
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(self.tls_dir / "ca.pem"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
        return ctx

    # --- requests ------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read()
        except ConnectionError:  # the caller gave up
            return web.Response(status=400)
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            return web.json_response(await self._dispatch(request, raw))
        except XksError as exc:
            return web.json_response({"errorName": exc.name, "errorMessage": exc.message}, status=exc.status)

    async def _dispatch(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        base = self.uri_path
        rest = request.path[len(base):] if request.path.startswith(base + "/") else None
        match = re.fullmatch(r"/health|/keys/([A-Za-z0-9._-]{1,128})/(metadata|encrypt|decrypt)", rest or "")
        if match is None:
            raise XksError("InvalidUriPathException", "no such path")  # before any signature check
        if request.method != "POST":
            raise XksError("ValidationException", "use POST", status=405)
        self._verify_signature(request, raw)
        if self.fail_with:
            raise XksError(self.fail_with, "failing on purpose")
        body = self._json(request, raw)
        key_id, op = match.group(1), match.group(2) or "health"
        need = {"health": (), "metadata": ("awsPrincipalArn",), "encrypt": ("awsPrincipalArn", "kmsKeyArn"),
                "decrypt": ("awsPrincipalArn", "kmsKeyArn")}[op]  # fmt: skip
        meta = body.get("requestMetadata")
        if not isinstance(meta, dict) or not meta:
            raise XksError("ValidationException", "requestMetadata is missing or empty")
        for name in ("kmsRequestId", "kmsOperation", *need):
            if not isinstance(meta.get(name), str) or not meta[name]:
                raise XksError("ValidationException", f"requestMetadata.{name} is required")
        self.seen.append(dict(meta, operation=op))
        if op == "health":
            return {"xksProxyFleetSize": 1, "xksProxyVendor": "tiny_xks", "xksProxyModel": "tests", "ekmVendor": "memory",
                    "ekmFleetDetails": [{"id": "mem-1", "model": "AESGCM", "healthStatus": "ACTIVE"}]}
        return getattr(self, "_" + op)(key_id, body)

    def _verify_signature(self, request: web.Request, raw: bytes) -> None:
        def fail(why: str) -> XksError:
            return XksError("AuthenticationFailedException", why)

        match = _AUTH.match(request.headers.get("Authorization", ""))
        if match is None:
            raise fail("missing or malformed Authorization")
        akid, day, region, service, signed, signature = match.groups()
        stamp = request.headers.get("X-Amz-Date", "")
        try:
            when = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise fail("missing or malformed X-Amz-Date") from None
        if akid != self.access_key_id or region != self.region or service != "kms-xks-proxy" or stamp[:8] != day:
            raise fail("unknown credential scope")
        if abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) > 300:
            raise fail("request time too far from server time")
        names = signed.split(";")
        if "host" not in names or "x-amz-date" not in names:
            raise fail("host and x-amz-date must be signed")
        canonical_headers = "".join(
            f"{n}:{','.join(' '.join(v.split()) for v in request.headers.getall(n, []))}\n" for n in names)
        canonical = "\n".join(["POST", request.raw_path.split("?")[0], "", canonical_headers, signed,
                               hashlib.sha256(raw).hexdigest()])  # fmt: skip
        scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = _hmac(_hmac(_hmac(_hmac(("AWS4" + self.secret).encode(), day), region), service), "aws4_request")
        if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
            raise fail("signature does not match")

    @staticmethod
    def _json(request: web.Request, raw: bytes) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise XksError("ValidationException", "Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except ValueError:
            raise XksError("ValidationException", "body is not JSON") from None
        if not isinstance(body, dict):
            raise XksError("ValidationException", "body is not a JSON object")
        return body

    @staticmethod
    def _field(body: dict[str, Any], name: str, required: bool = True) -> bytes | None:
        value = body.get(name)
        if value is None:
            if required:
                raise XksError("ValidationException", f"{name} is required")
            return None
        if not isinstance(value, str) or not _B64.match(value):
            raise XksError("ValidationException", f"{name} must be base64")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise XksError("ValidationException", f"{name} must be base64") from None

    def _key(self, key_id: str, body: dict[str, Any], *usage: str) -> AESGCM:
        if body.get("encryptionAlgorithm") != "AES_GCM":
            raise XksError("ValidationException", "encryptionAlgorithm must be AES_GCM")
        if key_id not in self.keys:
            raise XksError("KeyNotFoundException", "no such key")
        if key_id in self.disabled:
            raise XksError("InvalidStateException", "key is disabled")
        for name in usage:
            if name not in self.keys[key_id]:
                raise XksError("InvalidKeyUsageException", f"key usage does not include {name}")
        return self.material[key_id]

    # --- operations ------------------------------------------------------------------------------------

    def _metadata(self, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if key_id not in self.keys:
            raise XksError("KeyNotFoundException", "no such key")
        return {"keySpec": "AES_256", "keyUsage": list(self.keys[key_id]),
                "keyStatus": "DISABLED" if key_id in self.disabled else "ENABLED"}

    def _encrypt(self, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
        plaintext = self._field(body, "plaintext")
        aad = self._field(body, "additionalAuthenticatedData", required=False)
        want_cdiv = body.get("ciphertextDataIntegrityValueAlgorithm")
        if want_cdiv not in (None, "SHA_256"):
            raise XksError("ValidationException", "ciphertextDataIntegrityValueAlgorithm must be SHA_256")
        gcm = self._key(key_id, body, *(BOTH if want_cdiv else ("ENCRYPT",)))
        iv = os.urandom(12)
        sealed = gcm.encrypt(iv, plaintext, bound_aad(aad, METADATA))
        ciphertext, tag = sealed[:-16], sealed[-16:]
        answer = {"ciphertext": b64(ciphertext), "initializationVector": b64(iv), "authenticationTag": b64(tag),
                  "ciphertextMetadata": b64(METADATA)}
        if want_cdiv:
            digest = hashlib.sha256((aad or b"") + METADATA + iv + ciphertext + tag).digest()
            if gcm.decrypt(iv, sealed, bound_aad(aad, METADATA)) != plaintext:
                raise XksError("InternalException", "encryption did not verify")
            answer["ciphertextDataIntegrityValue"] = b64(digest)
        return answer

    def _decrypt(self, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
        parts = [self._field(body, name) for name in ("ciphertext", "initializationVector", "authenticationTag")]
        ciphertext, iv, tag = (p or b"" for p in parts)
        aad = self._field(body, "additionalAuthenticatedData", required=False)
        meta = self._field(body, "ciphertextMetadata", required=False)
        gcm = self._key(key_id, body, "DECRYPT")
        if len(iv) not in (12, 16) or len(tag) != 16:
            raise XksError("InvalidCiphertextException", "bad IV or tag length")
        try:
            return {"plaintext": b64(gcm.decrypt(iv, ciphertext + tag, bound_aad(aad, meta)))}
        except InvalidTag:
            raise XksError("InvalidCiphertextException", "authentication failed") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.tiny_xks", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prefix", default="tiny")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--key", action="append", default=[], metavar="ID[:USAGE,...]",
                        help="a key (default foo:ENCRYPT,DECRYPT); usage '' for none")
    parser.add_argument("--disabled", action="append", default=[], metavar="ID")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-with", metavar="ERROR_NAME", choices=sorted(STATUS))
    parser.add_argument("--tls", metavar="DIR", help="serve HTTPS; write the CA certificate to DIR/ca.pem")
    args = parser.parse_args(argv)
    keys = {k.split(":")[0]: tuple(u for u in k.partition(":")[2].split(",") if u) if ":" in k else BOTH for k in args.key}
    tiny = TinyXks(prefix=args.prefix, region=args.region, keys=keys or {"foo": BOTH}, port=args.port,
                   tls_dir=Path(args.tls) if args.tls else None, disabled=set(args.disabled), delay=args.delay,
                   fail_with=args.fail_with)  # fmt: skip

    async def serve() -> None:
        async with tiny:
            print(json.dumps({"endpoint": tiny.endpoint, **tiny.proxy_config()}), flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
