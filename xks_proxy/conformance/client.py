"""A SigV4-signing XKS client that records every answer the way KMS would experience it.

Each request is timed end to end; when an answer takes longer than KMS's budget (250 ms) the
client retries once, as KMS does on timeouts, and keeps the second answer with the first time
noted. Network failures are not exceptions here but observations (`Reply.failure`), because the
tester's job is to report them, not to crash on them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from yarl import URL

from xks_proxy import sigv4
from xks_proxy.conformance import outcomes
from xks_proxy.conformance.settings import Settings

PRINCIPAL = "arn:aws:iam::111122223333:role/xks-conformance-tester"
ACCOUNT = "111122223333"
_UNPARSED: Any = object()


@dataclass
class Reply:
    """One HTTP exchange. `status` is None when no HTTP answer came back (see `failure`)."""

    label: str
    status: int | None
    body: bytes
    elapsed_ms: float
    failure: str | None = None
    detail: str = ""
    first_try_ms: float | None = None
    _parsed: Any = field(default=_UNPARSED, repr=False)

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        if self._parsed is _UNPARSED:
            try:
                self._parsed = json.loads(self.body)
            except ValueError:
                self._parsed = None
        return self._parsed


@dataclass(frozen=True)
class Signer:
    """How to sign: normally the store's credential; error checks swap one field for a wrong one."""

    access_key_id: str
    secret: str = field(repr=False)
    region: str
    service: str = sigv4.SERVICE
    skew_seconds: float = 0.0

    def but(self, **changes: Any) -> "Signer":
        return replace(self, **changes)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class XksClient:
    """Talks to one proxy over keep-alive HTTP/1.1 connections, as KMS does."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.signer = Signer(settings.credential.access_key_id, settings.credential.secret, settings.region,
                             skew_seconds=settings.clock_offset)
        self.replies: list[Reply] = []
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "XksClient":
        connector = aiohttp.TCPConnector(ssl=self._ssl if self.settings.scheme == "https" else False,
                                         limit=self.settings.concurrency)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # --- request bodies ----------------------------------------------------------------------

    def request_metadata(self, operation: str, for_key: bool) -> dict[str, str]:
        """What KMS sends: health gets the id and operation; key operations also principal and key ARN."""
        metadata = {"kmsRequestId": str(uuid.uuid4()), "kmsOperation": operation}
        if for_key:
            metadata["awsPrincipalArn"] = PRINCIPAL
            metadata["kmsKeyArn"] = f"arn:aws:kms:{self.settings.region}:{ACCOUNT}:key/{uuid.uuid4()}"
        return metadata

    def api_path(self, *parts: str) -> str:
        return "/".join((self.settings.uri_path, *parts))

    # --- operations --------------------------------------------------------------------------

    async def health(self, operation: str, **kw: Any) -> Reply:
        body = {"requestMetadata": self.request_metadata(operation, for_key=False)}
        return await self.post(self.api_path("health"), body, label=f"GetHealthStatus({operation})", **kw)

    async def metadata(self, key_id: str, **kw: Any) -> Reply:
        body = {"requestMetadata": self.request_metadata("CreateKey", for_key=True)}
        return await self.post(self.api_path("keys", key_id, "metadata"), body, label=f"GetKeyMetadata({key_id})", **kw)

    async def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None, cdiv: bool, **kw: Any) -> Reply:
        body: dict[str, Any] = {
            "requestMetadata": self.request_metadata("Encrypt", for_key=True),
            "plaintext": b64(plaintext),
            "encryptionAlgorithm": "AES_GCM",
        }
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        if cdiv:
            body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
        return await self.post(self.api_path("keys", key_id, "encrypt"), body, label=f"Encrypt({key_id})", **kw)

    async def decrypt(self, key_id: str, fields: dict[str, bytes | None], **kw: Any) -> Reply:
        """`fields`: ciphertext, initializationVector, authenticationTag, and optional
        additionalAuthenticatedData / ciphertextMetadata (None = field absent)."""
        body: dict[str, Any] = {"requestMetadata": self.request_metadata("Decrypt", for_key=True), "encryptionAlgorithm": "AES_GCM"}
        body.update({name: b64(value) for name, value in fields.items() if value is not None})
        return await self.post(self.api_path("keys", key_id, "decrypt"), body, label=f"Decrypt({key_id})", **kw)

    # --- transport ---------------------------------------------------------------------------

    async def post(self, path: str, body: Any, *, label: str, signer: Signer | None = None,
                   content_type: str = "application/json", retry: bool = True) -> Reply:
        """POST `body` (a dict, or raw bytes for malformed-body checks); retry once past the budget."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await self._post_once(path, raw, label, signer or self.signer, content_type)
        if retry and (reply.failure == outcomes.TIMEOUT or (reply.failure is None and reply.elapsed_ms > self.settings.budget_ms)):
            first = reply.elapsed_ms
            reply = await self._post_once(path, raw, label, signer or self.signer, content_type)
            reply.first_try_ms = first
        self.replies.append(reply)
        return reply

    async def _post_once(self, path: str, raw: bytes, label: str, signer: Signer, content_type: str) -> Reply:
        assert self._session is not None, "use XksClient as an async context manager"
        headers = sigv4.sign(method="POST", url_path=path, host=self.settings.host_header, body=raw,
                             access_key_id=signer.access_key_id, secret=signer.secret, region=signer.region,
                             service=signer.service, now=time.time() + signer.skew_seconds)
        headers["Content-Type"] = content_type
        url = URL(self.settings.base_url + path, encoded=True)
        start = time.perf_counter()
        try:
            async with self._session.post(url, data=raw, headers=headers, allow_redirects=False) as response:
                data = await response.read()
                return Reply(label, response.status, data, _ms(start))
        except TRANSPORT_ERRORS as exc:
            return Reply(label, None, b"", _ms(start), *transport_failure(exc, self.settings.timeout))


#: What an aiohttp exchange raises when no HTTP answer came back; `transport_failure` names it.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def transport_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(kind, detail) of an exchange that got no HTTP answer, in the outcome table's kinds.

    Shared with the local KMS's client, so both read a failed exchange the same way.
    """
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
        return outcomes.TLS, f"TLS failure: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return outcomes.UNREACHABLE, f"cannot connect: {exc.strerror or exc}"
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return outcomes.TIMEOUT, f"no answer within {timeout:g} s"
    return outcomes.INVALID_RESPONSE, f"broken HTTP exchange: {type(exc).__name__}: {exc}"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
