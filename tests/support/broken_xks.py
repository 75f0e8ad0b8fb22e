"""A reference XKS proxy that can be told to misbehave, for testing the conformance tester.

Well-behaved (no faults), it is a small but correct XKS implementation: SigV4 verified with
`xks_proxy.sigv4.verify`, requestMetadata validated, AES-GCM over in-memory keys with the AAD
bound by `keymanager.crypto.bind_aad`, CDIV computed and verified by decrypting, and the
spec's error table. Each fault breaks exactly one thing KMS relies on, so a test can check that
the tester catches it, names it and predicts the right KMS outcome.

The server runs on its own event loop in a background thread, so the tester can be driven both
in-process (with its own `asyncio.run`) and as a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import os
import re
import ssl
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import trustme
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymanager.crypto import bind_aad, cdiv
from xks_proxy import errors, sigv4

PREFIX = "/conformance"
URI_PATH = PREFIX + "/kms/xks/v1"
ACCESS_KEY_ID = "CONFORMANCETESTKEY27"
SECRET = "c0nformanceTestSecretKeyThatIsLongEnough/+AbCdEfGhIjKlMnOpQrStU"
REGION = "us-east-1"
GOOD_KEY = "good-key"
METADATA = b"kv=1"

FAULTS = {
    "wrong-status": "every error answers HTTP 400, whatever its errorName",
    "health-missing-fields": "GetHealthStatus omits xksProxyModel and ekmVendor",
    "all-unavailable": "every ekmFleetDetails entry is UNAVAILABLE",
    "zero-iv": "Encrypt uses an all-zero IV every time",
    "bad-cdiv": "the CDIV leaves the AAD out of the hash",
    "ignore-aad": "the AAD is not bound into AES-GCM",
    "ignore-metadata": "ciphertextMetadata is returned but not bound into AES-GCM",
    "slow": "every answer takes 300 ms",
    "no-auth": "signatures are not checked",
    "long-metadata": "ciphertextMetadata is 21 bytes",
    "error-body": "errors are pretty-printed over several lines with a non-ASCII message",
    "wrong-key-spec": "GetKeyMetadata says AES_128",
    "ignore-usage": "key usage is not enforced",
    "accept-malformed": "malformed requests are not refused",
}
TLS_MODES = ("good", "expired", "wrong-name", "untrusted", "tls11", "weak-cipher")
SLOW_SECONDS = 0.3
_B64 = re.compile(r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_PATH = re.compile(r"^(?P<prefix>.*)/kms/xks/v1/(?:(?P<health>health)|keys/(?P<key>[A-Za-z0-9._-]{1,128})/(?P<op>metadata|encrypt|decrypt))$")


@dataclass
class Key:
    gcm: AESGCM
    usage: tuple[str, ...]
    enabled: bool = True


def default_keys() -> dict[str, Key]:
    def new(usage: tuple[str, ...], enabled: bool = True) -> Key:
        return Key(AESGCM(AESGCM.generate_key(256)), usage, enabled)

    return {
        GOOD_KEY: new(("ENCRYPT", "DECRYPT")),
        "encrypt-only": new(("ENCRYPT",)),
        "decrypt-only": new(("DECRYPT",)),
        "no-usage": new(()),
        "disabled": new(("ENCRYPT", "DECRYPT"), enabled=False),
    }


class ReferenceXks:
    """The XKS API over in-memory keys; `faults` (names from FAULTS) break it on purpose."""

    def __init__(self, faults: frozenset[str] = frozenset()) -> None:
        unknown = set(faults) - set(FAULTS)
        assert not unknown, f"unknown faults {unknown}"
        self.faults = faults
        self.keys = default_keys()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # --- request handling ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        if "slow" in self.faults:
            await asyncio.sleep(SLOW_SECONDS)
        try:
            return web.json_response(await self._dispatch(request))
        except errors.XksError as exc:
            return self._error(exc)

    async def _dispatch(self, request: web.Request) -> dict[str, Any]:
        match = _PATH.match(request.path)
        if match is None or match["prefix"] != PREFIX:
            raise errors.InvalidUriPathException("no such path")
        if request.method != "POST":
            raise errors.MethodNotAllowed("use POST")
        raw = await request.read()
        if "no-auth" not in self.faults:
            headers = {name.lower(): request.headers.getall(name) for name in set(request.headers.keys())}
            sigv4.verify(method="POST", path=request.path, query=(), headers=headers, body=raw,
                         lookup_secret=lambda akid: SECRET if akid == ACCESS_KEY_ID else None,
                         regions=frozenset({REGION}))
        body = self._body(request, raw)
        if match["health"]:
            self._require_metadata(body, ())
            return self._health()
        op = match["op"]
        self._require_metadata(body, ("awsPrincipalArn",) if op == "metadata" else ("awsPrincipalArn", "kmsKeyArn"))
        key = self.keys.get(match["key"])
        if key is None:
            raise errors.KeyNotFoundException("no such key")
        return {"metadata": self._metadata, "encrypt": self._encrypt, "decrypt": self._decrypt}[op](key, body)

    def _body(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        malformed_ok = "accept-malformed" in self.faults
        if request.content_type != "application/json" and not malformed_ok:
            raise errors.ValidationException("Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except ValueError:
            if malformed_ok:
                return {}
            raise errors.ValidationException("body is not JSON") from None
        if not isinstance(body, dict):
            if malformed_ok:
                return {}
            raise errors.ValidationException("body is not a JSON object")
        return body

    def _require_metadata(self, body: dict[str, Any], extra: tuple[str, ...]) -> None:
        if "accept-malformed" in self.faults:
            return
        meta = body.get("requestMetadata")
        if not isinstance(meta, dict) or not meta:
            raise errors.ValidationException("requestMetadata is missing or empty")
        for name in ("kmsRequestId", "kmsOperation", *extra):
            if not isinstance(meta.get(name), str) or not meta[name]:
                raise errors.ValidationException(f"requestMetadata.{name} is required")

    def _error(self, exc: errors.XksError) -> web.Response:
        status = 400 if "wrong-status" in self.faults else exc.status
        if "error-body" in self.faults:
            text = json.dumps({"errorName": exc.name, "errorMessage": "refus\u00e9: " + exc.message}, indent=2, ensure_ascii=False)
            return web.Response(status=status, text=text, content_type="application/json")
        return web.json_response(exc.body(), status=status)

    # --- operations --------------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        state = "UNAVAILABLE" if "all-unavailable" in self.faults else "ACTIVE"
        answer: dict[str, Any] = {
            "xksProxyFleetSize": 1,
            "xksProxyVendor": "broken_xks",
            "xksProxyModel": "reference",
            "ekmVendor": "in-memory",
            "ekmFleetDetails": [{"id": "mem-1", "model": "AESGCM", "healthStatus": state},
                                {"id": "mem-2", "model": "AESGCM", "healthStatus": state}],
        }
        if "health-missing-fields" in self.faults:
            del answer["xksProxyModel"], answer["ekmVendor"]
        return answer

    def _metadata(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        return {"keySpec": "AES_128" if "wrong-key-spec" in self.faults else "AES_256",
                "keyUsage": list(key.usage), "keyStatus": "ENABLED" if key.enabled else "DISABLED"}

    def _usable(self, key: Key, usage: str) -> None:
        if not key.enabled:
            raise errors.InvalidStateException("key is disabled")
        if usage not in key.usage and "ignore-usage" not in self.faults:
            raise errors.InvalidKeyUsageException(f"key usage does not include {usage}")

    def _encrypt(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        plaintext = self._b64(body, "plaintext", required=True)
        aad = self._b64(body, "additionalAuthenticatedData", required=False)
        self._algorithm(body)
        want_cdiv = self._cdiv_algorithm(body)
        self._usable(key, "ENCRYPT")
        if want_cdiv:
            self._usable(key, "DECRYPT")  # the CDIV is verified by decrypting
        meta = METADATA + b"-padding-to-21-bytes"[: 21 - len(METADATA)] if "long-metadata" in self.faults else METADATA
        iv = bytes(12) if "zero-iv" in self.faults else os.urandom(12)
        sealed = key.gcm.encrypt(iv, plaintext, self._bound(aad, meta))
        ciphertext, tag = sealed[:-16], sealed[-16:]
        answer = {"ciphertext": b64(ciphertext), "initializationVector": b64(iv), "authenticationTag": b64(tag),
                  "ciphertextMetadata": b64(meta)}
        if want_cdiv:
            if key.gcm.decrypt(iv, sealed, self._bound(aad, meta)) != plaintext:
                raise errors.InternalException("encryption did not verify")
            value = cdiv(None if "bad-cdiv" in self.faults else aad, meta, iv, ciphertext, tag)
            answer["ciphertextDataIntegrityValue"] = b64(value)
        return answer

    def _decrypt(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        ciphertext = self._b64(body, "ciphertext", required=True)
        iv = self._b64(body, "initializationVector", required=True)
        tag = self._b64(body, "authenticationTag", required=True)
        aad = self._b64(body, "additionalAuthenticatedData", required=False)
        meta = self._b64(body, "ciphertextMetadata", required=False)
        self._algorithm(body)
        self._usable(key, "DECRYPT")
        if len(iv) not in (12, 16) or len(tag) != 16:
            raise errors.InvalidCiphertextException("bad IV or tag length")
        try:
            plaintext = key.gcm.decrypt(iv, ciphertext + tag, self._bound(aad, meta))
        except InvalidTag:
            raise errors.InvalidCiphertextException("authentication failed") from None
        return {"plaintext": b64(plaintext)}

    def _bound(self, aad: bytes | None, meta: bytes | None) -> bytes:
        return bind_aad(None if "ignore-aad" in self.faults else aad, None if "ignore-metadata" in self.faults else meta)

    # --- field validation ----------------------------------------------------------------------------

    def _b64(self, body: dict[str, Any], name: str, required: bool) -> bytes | None:
        value = body.get(name)
        if value is None:
            if required and "accept-malformed" not in self.faults:
                raise errors.ValidationException(f"{name} is required")
            return b"" if required else None
        if not isinstance(value, str) or not _B64.match(value):
            if "accept-malformed" in self.faults:
                return b""
            raise errors.ValidationException(f"{name} must be base64")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise errors.ValidationException(f"{name} must be base64") from None

    def _algorithm(self, body: dict[str, Any]) -> None:
        if body.get("encryptionAlgorithm") != "AES_GCM" and "accept-malformed" not in self.faults:
            raise errors.ValidationException("encryptionAlgorithm must be AES_GCM")

    def _cdiv_algorithm(self, body: dict[str, Any]) -> bool:
        value = body.get("ciphertextDataIntegrityValueAlgorithm")
        if value not in (None, "SHA_256") and "accept-malformed" not in self.faults:
            raise errors.ValidationException("ciphertextDataIntegrityValueAlgorithm must be SHA_256")
        return value == "SHA_256"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- TLS ---------------------------------------------------------------------------------------------


def tls11_available() -> bool:
    """Whether this OpenSSL can still negotiate TLS 1.1 (it needs security level 0 in OpenSSL 3)."""
    if not ssl.HAS_TLSv1_1:
        return False
    try:
        _pinned_context(ssl.PROTOCOL_TLS_SERVER, "TLSv1_1")
    except (ssl.SSLError, ValueError):
        return False
    return True


def _pinned_context(protocol: int, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


class Certificates:
    """A trusted test CA (written to `ca_path`), an untrusted one, and leaves for every TLS mode."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.rogue_ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def server_context(self, mode: str) -> ssl.SSLContext:
        assert mode in TLS_MODES, mode
        now = dt.datetime.now(dt.timezone.utc)
        if mode == "tls11" and tls11_available():
            ctx = _pinned_context(ssl.PROTOCOL_TLS_SERVER, "TLSv1_1")
        elif mode in ("tls11", "weak-cipher"):
            # Without TLS 1.1 in the local OpenSSL, "no version KMS accepts" is simulated by the
            # nearest thing: TLS 1.2 only, with a single suite KMS does not accept.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if mode == "expired":
            leaf = self.ca.issue_cert("localhost", "127.0.0.1", not_before=now - dt.timedelta(days=60),
                                      not_after=now - dt.timedelta(days=3))
        elif mode == "wrong-name":
            leaf = self.ca.issue_cert("proxy.wrong.example")
        elif mode == "untrusted":
            leaf = self.rogue_ca.issue_cert("localhost", "127.0.0.1")
        else:
            leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        leaf.configure_cert(ctx)
        return ctx


# --- running it ---------------------------------------------------------------------------------------


class BrokenXks:
    """One running fixture server. Use `serve(...)`; read `endpoint`, `args()`."""

    def __init__(self, faults: frozenset[str], tls: str | None, directory: Path) -> None:
        self.server = ReferenceXks(faults)
        self.certs = Certificates(directory)
        self.ssl_context = self.certs.server_context(tls) if tls else None
        self.directory = directory
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="broken-xks", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://localhost:{self.port}"

    def args(self, *extra: str, probes: bool = True, burst: int = 8) -> list[str]:
        """Tester arguments for this server (credential via a KMS proxy configuration file)."""
        config = self.directory / "proxy-config.json"
        config.write_text(json.dumps({"XksProxyUriPath": URI_PATH, "XksProxyAuthenticationCredential":
                                      {"AccessKeyId": ACCESS_KEY_ID, "RawSecretAccessKey": SECRET}}))
        out = ["--endpoint", self.endpoint, "--config", str(config), "--key-id", GOOD_KEY, "--region", REGION,
               "--burst", str(burst), "--concurrency", "4", "--timeout", "3"]
        out += ["--ca-bundle", str(self.certs.ca_path)] if self.ssl_context else ["--allow-http"]
        if probes:
            out += ["--encrypt-only-key", "encrypt-only", "--decrypt-only-key", "decrypt-only",
                    "--no-usage-key", "no-usage", "--disabled-key", "disabled"]
        return out + list(extra)

    def start(self) -> "BrokenXks":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("broken_xks server did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.server.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@contextlib.contextmanager
def serve(faults: frozenset[str] | set[str] = frozenset(), tls: str | None = "good") -> Iterator[BrokenXks]:
    """Start a fixture server (tls=None for plain HTTP) for the length of a `with` block."""
    with tempfile.TemporaryDirectory() as tmp:
        server = BrokenXks(frozenset(faults), tls, Path(tmp)).start()
        try:
            yield server
        finally:
            server.stop()
