"""The local KMS's XKS client: calls an external key store proxy exactly as AWS KMS does.

A KMS key in an external key store is only as usable as its proxy's answers, so the local KMS
must meet a proxy the way KMS meets it, or it would pass proxies KMS fails (and the reverse):

- every call is a SigV4-signed POST (service `kms-xks-proxy`, the store's region) with the
  requestMetadata fields KMS sends for that operation, and no others (`request_metadata`);
- each attempt has 250 ms, connect and answer together; KMS tries once more only after a timeout,
  a failed connection, or InternalException / DependencyTimeoutException / ThrottlingException,
  and everything else is final at once (`kms_outcomes.retried`);
- every answer is read as strictly as KMS reads it, by the conformance tester's own readers
  (`conformance.validate`: types, base64, IV and tag lengths, key spec/usage/state, the CDIV);
  anything off is an invalid response;
- every failure becomes the exception a KMS caller would get, from the one table
  (`xks_proxy.kms_outcomes`) that the conformance tester predicts from too.

TLS is verified like KMS does it: the system CAs (or `ca_bundle`, for tests), the name of the
endpoint's host, TLS 1.2 or later with the suites KMS offers. Mutual TLS (KMS presenting a client
certificate) is not done. A plain `http://` endpoint is accepted, for tests and for proxies behind
a local TLS terminator only: real KMS refuses any XksProxyUriEndpoint that is not https://.
"""

from __future__ import annotations

import json
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from xks_proxy import kms_outcomes, sigv4
from xks_proxy.access import tlshooks
from xks_proxy.access.mtls import TLS12_CIPHERS, TLS13_SUITES
from xks_proxy.conformance.client import TRANSPORT_ERRORS, Reply, b64, transport_failure
from xks_proxy.conformance.validate import classify, decode_b64, encrypt_problems, health_verdict, metadata_verdict

_KEY_ID = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")


@dataclass(frozen=True)
class XksEndpoint:
    """Where and how to reach one external key store's proxy (its XksProxyUri* and credential)."""

    uri_endpoint: str  # https://host[:port], no path
    uri_path: str  # /<prefix>/kms/xks/v1
    access_key_id: str
    secret: str = field(repr=False)
    region: str
    ca_bundle: str | None = None


@dataclass(frozen=True)
class RequestMeta:
    """What KMS knows of the request it is serving; `request_metadata` picks what each call sends."""

    aws_principal_arn: str
    kms_operation: str
    kms_request_id: str
    kms_key_arn: str | None = None
    kms_via_service: str | None = None


@dataclass(frozen=True)
class XksCiphertext:
    """The proxy's half of a KMS ciphertext: kept by KMS, sent back verbatim to Decrypt."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    metadata: bytes | None


class KmsError(Exception):
    """A proxy call failed: `name` is the KMS exception a caller gets, `message` KMS's words for why.

    For a health call, `name` is what CreateCustomKeyStore (and UpdateCustomKeyStore) raise and
    `connection_error_code` the ConnectionErrorCode ConnectCustomKeyStore records; None otherwise.
    `kind` is the observation it was mapped from (a `kms_outcomes` kind or the proxy's errorName).
    Messages name keys, operations and what was wrong; never a secret or a plaintext.
    """

    def __init__(self, name: str, message: str, connection_error_code: str | None = None, kind: str = "") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.connection_error_code = connection_error_code
        self.kind = kind


def request_metadata(meta: RequestMeta, call: str, kms_operation: str) -> dict[str, str]:
    """requestMetadata as KMS fills it for `call` ("health", "metadata", "encrypt", "decrypt").

    Health carries only the request id and operation. Key calls add the caller's principal;
    Encrypt and Decrypt always name the KMS key, GetKeyMetadata when it is known; kmsViaService
    only when the caller came through a service. The VPC fields are never sent: the local KMS
    has no VPC.
    """
    body = {"kmsRequestId": meta.kms_request_id, "kmsOperation": kms_operation}
    if call == "health":
        return body
    body["awsPrincipalArn"] = meta.aws_principal_arn
    if meta.kms_key_arn is not None:
        body["kmsKeyArn"] = meta.kms_key_arn
    elif call != "metadata":
        raise ValueError(f"KMS always sends kmsKeyArn on {call}")
    if meta.kms_via_service is not None:
        body["kmsViaService"] = meta.kms_via_service
    return body


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verify the proxy's certificate and name as KMS does; offer only the suites KMS offers."""
    ctx = ssl.create_default_context(cafile=ca_bundle)  # a bundle replaces the system CAs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    try:
        tlshooks.set_tls13_suites(ctx, TLS13_SUITES)
    except tlshooks.HookError:
        pass  # OpenSSL's default TLS 1.3 suites: one more (AES-128-GCM) than KMS offers, all AEAD
    return ctx


class XksClient:
    """One external key store's proxy, called as KMS calls it. Async; one connection pool.

    The aiohttp session is made on first use (inside the event loop) and closed by `close()`.
    """

    def __init__(self, endpoint: XksEndpoint, timeout: float = 0.25, retries: int = 1) -> None:
        url = URL(endpoint.uri_endpoint)
        if url.scheme not in ("https", "http") or not url.host or url.path not in ("", "/") or url.query_string:
            raise ValueError(f"the proxy endpoint must be https://host[:port], not {endpoint.uri_endpoint!r}")
        if not endpoint.uri_path.startswith("/"):
            raise ValueError(f"the proxy URI path must start with '/', not {endpoint.uri_path!r}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self._base = f"{url.scheme}://{url.host_port_subcomponent}"
        self._host = url.host_port_subcomponent
        self._path = endpoint.uri_path.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    # --- the four calls KMS makes -----------------------------------------------------------------

    async def health(self, meta: RequestMeta, operation: str) -> None:
        """GetHealthStatus as `operation` sends it; raises KmsError with the ConnectionErrorCode."""
        if operation not in kms_outcomes.HEALTH_OPERATIONS:
            raise ValueError(f"KMS calls health only for {', '.join(kms_outcomes.HEALTH_OPERATIONS)}, not {operation}")
        body = {"requestMetadata": request_metadata(meta, "health", operation)}
        kind, reply, detail = await self._call("/health", body)
        if kind == kms_outcomes.OK:
            kind, detail = health_verdict(reply.json())
        if kind != kms_outcomes.OK:
            code = kms_outcomes.connection_code(kind)
            raise KmsError(kms_outcomes.create_store_exception(kind),
                           f"{operation}: the external key store proxy {_said(kind, detail)} (ConnectionErrorCode {code})",
                           connection_error_code=code, kind=kind)

    async def key_metadata(self, xks_key_id: str, meta: RequestMeta) -> dict:
        """GetKeyMetadata as CreateKey sends it: the answer, only for a key CreateKey accepts."""
        body = {"requestMetadata": request_metadata(meta, "metadata", meta.kms_operation)}
        kind, reply, detail = await self._call(_key_path(xks_key_id, "metadata"), body)
        if kind == kms_outcomes.OK:
            kind, detail = metadata_verdict(reply.json())
        if kind != kms_outcomes.OK:
            raise KmsError(kms_outcomes.create_key_exception(kind),
                           f"external key {xks_key_id}: the external key store proxy {_said(kind, detail)}", kind=kind)
        return reply.json()

    async def encrypt(self, xks_key_id: str, plaintext: bytes, aad: bytes | None, meta: RequestMeta) -> XksCiphertext:
        """Encrypt under the external key, asking for the CDIV and checking it as KMS does."""
        body: dict[str, Any] = {"requestMetadata": request_metadata(meta, "encrypt", meta.kms_operation),
                                "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM",
                                "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        kind, reply, detail = await self._call(_key_path(xks_key_id, "encrypt"), body)
        sealed = None
        if kind == kms_outcomes.OK:
            sealed, problems = encrypt_problems(reply.json(), plaintext, aad, True)
            found = [problem for aspect in problems.values() for problem in aspect]
            if found or sealed is None:
                kind, detail = kms_outcomes.INVALID_RESPONSE, "; ".join(found) or "unreadable Encrypt response"
        if kind != kms_outcomes.OK or sealed is None:
            raise self._crypto_error(kind, detail, "Encrypt", xks_key_id)
        return XksCiphertext(sealed.ciphertext, sealed.iv, sealed.tag, sealed.metadata)

    async def decrypt(self, xks_key_id: str, ct: XksCiphertext, aad: bytes | None, meta: RequestMeta) -> bytes:
        """Decrypt the proxy's half of a ciphertext; the plaintext must be as long as the ciphertext."""
        body: dict[str, Any] = {"requestMetadata": request_metadata(meta, "decrypt", meta.kms_operation),
                                "ciphertext": b64(ct.ciphertext), "initializationVector": b64(ct.iv),
                                "authenticationTag": b64(ct.tag), "encryptionAlgorithm": "AES_GCM"}
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        if ct.metadata is not None:
            body["ciphertextMetadata"] = b64(ct.metadata)
        kind, reply, detail = await self._call(_key_path(xks_key_id, "decrypt"), body)
        plaintext = None
        if kind == kms_outcomes.OK:
            answer = reply.json()
            plaintext, problem = decode_b64(answer, "plaintext", True) if isinstance(answer, dict) else (None, "not a JSON object")
            if problem is None and plaintext is not None and len(plaintext) != len(ct.ciphertext):
                problem = f"plaintext is {len(plaintext)} bytes for {len(ct.ciphertext)} bytes of ciphertext"
            if problem is not None:
                kind, detail = kms_outcomes.INVALID_RESPONSE, f"Decrypt response: {problem}"
        if kind != kms_outcomes.OK or plaintext is None:
            raise self._crypto_error(kind, detail, "Decrypt", xks_key_id)
        return plaintext

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- transport ----------------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any]) -> tuple[str, Reply, str]:
        """POST until KMS would stop: (kind, last reply, what came back). Attempts are counted by the server."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        for attempt in range(1 + self.retries):
            reply = await self._post_once(self._path + path, raw)
            kind, detail = classify(reply, math.inf)  # the per-attempt timeout already bounds it
            # A connection dropped before any answer is a network error too (not a TLS refusal).
            dropped = reply.status is None and kind == kms_outcomes.INVALID_RESPONSE
            if kind == kms_outcomes.OK or not (kms_outcomes.retried(kind) or dropped) or attempt == self.retries:
                return kind, reply, detail
        raise AssertionError("unreachable")

    async def _post_once(self, path: str, raw: bytes) -> Reply:
        headers = sigv4.sign(method="POST", url_path=path, host=self._host, body=raw,
                             access_key_id=self.endpoint.access_key_id, secret=self.endpoint.secret,
                             region=self.endpoint.region)
        headers["Content-Type"] = "application/json"
        start = time.perf_counter()
        try:
            async with self._open().post(URL(self._base + path, encoded=True), data=raw, headers=headers,
                                         allow_redirects=False) as response:
                data = await response.read()
                return Reply(path, response.status, data, _ms(start))
        except TRANSPORT_ERRORS as exc:
            return Reply(path, None, b"", _ms(start), *transport_failure(exc, self.timeout))

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            secure = self._base.startswith("https:")
            connector = aiohttp.TCPConnector(ssl=tls_context(self.endpoint.ca_bundle) if secure else False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  auto_decompress=False)
        return self._session

    @staticmethod
    def _crypto_error(kind: str, detail: str, operation: str, xks_key_id: str) -> KmsError:
        return KmsError(kms_outcomes.crypto_exception(kind, operation),
                        f"{operation} with external key {xks_key_id}: the external key store proxy {_said(kind, detail)}",
                        kind=kind)


def _key_path(xks_key_id: str, operation: str) -> str:
    if not _KEY_ID.match(xks_key_id):
        raise ValueError(f"an XksKeyId is 1-128 characters of [A-Za-z0-9._-], not {xks_key_id[:140]!r}")
    return f"/keys/{xks_key_id}/{operation}"


def _said(kind: str, detail: str) -> str:
    """The error message's cause, worded by kind; never a body or a secret (details are ours)."""
    if kind in (kms_outcomes.TLS, kms_outcomes.UNREACHABLE, kms_outcomes.TIMEOUT):
        return f"could not be used: {detail}"
    if kind == kms_outcomes.INVALID_RESPONSE:
        return f"gave an invalid response: {detail}"
    if kind in (kms_outcomes.KEY_CONFIG, kms_outcomes.ALL_UNAVAILABLE):
        return f"reported an unusable state: {detail}"
    return f"rejected the request: {detail}"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
