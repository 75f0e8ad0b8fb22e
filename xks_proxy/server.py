"""The XKS HTTP server: routing, SigV4, validation, the key manager call, and the response.

It knows key managers only through `keymanager.base.KeyManager`, and errors only through
`xks_proxy.errors`: every failure becomes one single-line JSON body here, in `error_response`
(also the sealed responder's, process/sealed.py).
Order of work per request: route (an unknown prefix or path is answered before any signature
check), read the body under a cap and a timeout, take an in-flight slot, verify SigV4 against
the store's credentials, check the content type, parse and validate, charge the store's rate
quota, apply the store's policy, call the key manager, answer, then one record to the access
log, the audit log and the metrics. Admission control, policy, audit and metrics live in
`access/`; this file only calls them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from base64 import b64encode
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from keymanager.base import KeyManager
from keymanager.crypto import cdiv
from xks_proxy import protocol, sigv4
from xks_proxy.access import audit
from xks_proxy.config import Config, Store
from xks_proxy.errors import (
    AccessDeniedException,
    ClientDisconnected,
    InternalException,
    InvalidUriPathException,
    KeyNotFoundException,
    MethodNotAllowed,
    RequestTimeout,
    ThrottlingException,
    UnsupportedOperationException,
    ValidationException,
    XksError,
)
from xks_proxy.access.metrics import NoMetrics
from xks_proxy.access.throttle import Throttle
from xks_proxy.process import logsink

if TYPE_CHECKING:
    from xks_proxy.fleet.member import FleetMember

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

log = logging.getLogger("xks_proxy.server")

LIVENESS_PATH = "/ping"
#: While this file exists in the home, GET /ping answers 503: load balancers drain the proxy.
DRAIN_FILE = "drain"
_JSON = "application/json"


@dataclass(slots=True)
class Outcome:
    """What the access log line says about one request."""

    operation: str = "-"
    store: str | None = None
    key_id: str | None = None
    meta: protocol.RequestMetadata | None = None
    key_version: int | None = None
    error: str | None = None
    denied_by: str | None = None


class StoreTable:
    """The stores, indexed by prefix. Replaced whole when the configuration changes."""

    def __init__(self, stores: tuple[Store, ...]) -> None:
        self.by_prefix = {store.prefix: store for store in stores}


class XksServer:
    def __init__(self, config: Config, key_manager: KeyManager, metrics: NoMetrics | None = None, workers: int = 1) -> None:
        self.config = config
        self.key_manager = key_manager
        self.stores = StoreTable(config.stores)
        self._drain_file = config.home / DRAIN_FILE
        self.metrics = metrics or NoMetrics()
        self._untimed = type(self.metrics) is NoMetrics
        self.throttle = Throttle(config, workers)
        #: With a shared vault: heartbeats, the fleet size, and the stores every proxy shares.
        self.fleet: FleetMember | None = None
        if config.vault.dsn is not None:
            from xks_proxy.fleet import member as fleet

            self.fleet = fleet.FleetMember(config, lambda: self.config, self.apply_config)
        self._handlers: dict[str, Callable[[Store, str | None, dict[str, Any], Outcome], Awaitable[dict[str, Any]]]] = {
            "health": self._health,
            "metadata": self._metadata,
            "encrypt": self._encrypt,
            "decrypt": self._decrypt,
        }

    def app(self) -> web.Application:
        """The server as an aiohttp application (tests, embedding): the same `handle`, started and closed with the app."""
        # The body cap is ours (UnsupportedOperationException), so aiohttp's own stays above it.
        app = web.Application(client_max_size=self.config.limits.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(lambda _: self.start())
        app.on_cleanup.append(lambda _: self.close())
        return app

    def low_level(self, wrap: Callable[[Handler], Handler] = lambda handler: handler, **settings: Any) -> web.Server:
        """The listener's server: aiohttp's low-level `web.Server` calling `wrap(handle)` directly.

        Every path is ours (`handle` routes), so the application's router and middleware chain
        only cost time (the numbers are in README's Performance section). `settings` go to
        aiohttp's request handler (keep-alive, lingering, logger).
        """
        cap, loop = self.config.limits.max_body_bytes, asyncio.get_running_loop()

        def request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=cap)

        return web.Server(wrap(self.handle), request_factory=request, **settings)

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration: stores, credentials, policies, quotas and limits, in one step."""
        self.throttle.configure(config)
        self.stores = StoreTable(config.stores)
        self.config = config

    async def start(self) -> None:
        """Before the first request: the key manager (an HSM login), and a fleet's heartbeat."""
        await self.key_manager.start()
        if self.fleet is not None:
            await self.fleet.start()

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.key_manager.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        path = request.rel_url.raw_path
        if path == LIVENESS_PATH and request.method in ("GET", "HEAD"):
            return self._liveness()
        outcome = Outcome()
        try:
            body = await self._dispatch(request, path, outcome)
            response = web.Response(body=protocol.dumps(body), content_type=_JSON)
        except Exception as exc:
            if not isinstance(exc, XksError):
                log.exception("unexpected failure handling %s", outcome.operation)
                exc = InternalException("internal error; see the proxy log")
            outcome.error = exc.name
            response = error_response(exc)
        self._log(outcome, response.status, started, request)
        return response

    def _route(self, request: web.BaseRequest, path: str, outcome: Outcome) -> tuple[Store, str | None]:
        target = protocol.api_target(path)
        store = self.stores.by_prefix.get(target.prefix) if target is not None else None
        if target is None or store is None:
            raise InvalidUriPathException("no XKS API at this path")
        outcome.store = store.prefix
        outcome.operation = target.operation
        if target.key_id is not None:
            if not target.key_id_ok:
                raise InvalidUriPathException("the key id in the path is not 1-128 characters of [A-Za-z0-9._-]")
            outcome.key_id = target.key_id
        if request.method != "POST":
            raise MethodNotAllowed(f"{request.method} is not supported here; XKS API calls use POST")
        return store, target.key_id

    def _liveness(self) -> web.Response:
        """200, or 503 while `<home>/drain` exists (`xks-proxy fleet drain`).

        Draining takes a proxy out of its load balancer's rotation before it is stopped (a
        rolling upgrade): the XKS API still answers every request that arrives meanwhile.
        """
        if self._drain_file.exists():
            return web.Response(status=503, text="draining\n")
        return web.Response(text="OK\n")

    async def _dispatch(self, request: web.BaseRequest, path: str, outcome: Outcome) -> dict[str, Any]:
        store, key_id = self._route(request, path, outcome)
        # The whole body first, under its timeout: a client that stalls holds no in-flight slot.
        body = await self._read_body(request)
        if not self.throttle.enter():
            self.metrics.throttled(store.prefix, "in_flight")
            raise ThrottlingException("the proxy is at its limit of requests in flight; retry")
        try:
            doc = self._admit(request, path, store, key_id, body, outcome)
            return await self._handlers[outcome.operation](store, key_id, doc, outcome)
        finally:
            self.throttle.leave()

    def _admit(self, request: web.BaseRequest, path: str, store: Store, key_id: str | None, body: bytes, outcome: Outcome) -> dict[str, Any]:
        """SigV4, the content type, the parsed body, then quota and policy: the body, if all pass."""
        sigv4.verify(  # reads request.headers in place (getall of the signed headers only), no copy
            method=request.method,
            path=path,
            query=tuple(request.rel_url.query.items()) if request.query_string else (),
            headers=request.headers,
            body=body,
            lookup_secret=store.secret_for,
            regions=store.regions,
        )
        content_type = request.headers.get("Content-Type")
        # KMS sends exactly "application/json"; anything else goes through aiohttp's parse (parameters, case).
        if content_type != _JSON and (content_type is None or request.content_type != _JSON):
            raise ValidationException("Content-Type must be application/json")
        doc = protocol.parse_body(body)
        outcome.meta = protocol.request_metadata(doc, outcome.operation)
        if key_id is not None:  # health is exempt from the rate quota and from policy
            self._authorize(store, key_id, outcome.meta, outcome)
        return doc

    def _authorize(self, store: Store, key_id: str, meta: protocol.RequestMetadata, outcome: Outcome) -> None:
        """Charge the store's rate quota, then apply its policy (after SigV4: only the store's callers count)."""
        if not self.throttle.take(store.prefix):
            self.metrics.throttled(store.prefix, "rate")
            raise ThrottlingException("this key store is over its request rate quota; retry")
        denied_by = store.policy.denial(key_id, meta)
        if denied_by is not None:
            outcome.denied_by = denied_by
            self.metrics.denied(store.prefix, denied_by)
            log.warning("request %r denied by policy rule %s of store %r", meta.kms_request_id, denied_by, store.prefix)
            raise AccessDeniedException(f"denied by policy rule {denied_by}")

    def _timed(self, operation: str, call: Awaitable[Any]) -> Awaitable[Any]:
        """A key manager call, its latency recorded when metrics are on (else the call itself: no wrapper per request)."""
        return call if self._untimed else self._observed(operation, call)

    async def _observed(self, operation: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.metrics.keymanager(operation, time.perf_counter() - started)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The body, whole, within server.body_timeout_seconds of the headers (KMS sends it at once)."""
        cap = self.config.limits.max_body_bytes
        content = request.content
        seconds = self.config.server.body_timeout_seconds
        try:
            if content.is_eof():  # KMS sends the body with the headers: all of it is here, no timer to arm
                body = content.read_nowait()
                if len(body) > cap:
                    raise _too_large(cap)
                return body
            if request.content_length is not None and request.content_length > cap:
                raise _too_large(cap)
            async with asyncio.timeout(seconds):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(cap) from None
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {seconds:g} s") from None
        except ConnectionError:
            raise ClientDisconnected("the client disconnected before its request body arrived") from None
        except RequestPayloadError:
            raise ValidationException("the request body is not well-formed HTTP (chunked encoding)") from None

    async def _health(self, store: Store, key_id: str | None, doc: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
        details = await self._timed("health", self.key_manager.health())
        self.metrics.health(details)
        server = self.config.server
        return {
            "xksProxyFleetSize": self.fleet.size() if self.fleet is not None else server.fleet_size,
            "xksProxyVendor": server.vendor,
            "xksProxyModel": server.model,
            "ekmVendor": self.key_manager.vendor,
            "ekmFleetDetails": [{"id": d.id, "model": d.model, "healthStatus": d.state.value} for d in details],
        }

    @staticmethod
    def _allowed(store: Store, key_id: str | None) -> str:
        """The key id, if this store may address it (its optional key_ids list), for every backend."""
        assert key_id is not None
        if not store.allows(key_id):
            raise KeyNotFoundException(f"no key {key_id} in this key store")
        return key_id

    async def _metadata(self, store: Store, key_id: str | None, doc: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
        key_id = self._allowed(store, key_id)
        meta = await self._timed("metadata", self.key_manager.get_metadata(store.prefix, key_id))
        return {
            "keySpec": meta.key_spec,
            "keyUsage": [u.value for u in meta.usage],
            "keyStatus": "ENABLED" if meta.enabled else "DISABLED",
        }

    async def _encrypt(self, store: Store, key_id: str | None, doc: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
        req = protocol.encrypt_request(doc, self.config.limits)
        key_id = self._allowed(store, key_id)
        result = await self._timed("encrypt", self.key_manager.encrypt(store.prefix, key_id, req.plaintext, req.aad))
        outcome.key_version = result.key_version
        integrity = None
        if req.want_cdiv:
            integrity = cdiv(req.aad, result.metadata, result.iv, result.ciphertext, result.tag)
            # The spec's order: compute the CDIV, then prove the ciphertext decrypts before answering.
            await self._timed(
                "decrypt",
                self.key_manager.decrypt(store.prefix, key_id, result.ciphertext, result.iv, result.tag, req.aad, result.metadata),
            )
        body = {
            "ciphertext": b64encode(result.ciphertext).decode(),
            "initializationVector": b64encode(result.iv).decode(),
            "authenticationTag": b64encode(result.tag).decode(),
        }
        if result.metadata:
            body["ciphertextMetadata"] = b64encode(result.metadata).decode()
        if integrity:
            body["ciphertextDataIntegrityValue"] = b64encode(integrity).decode()
        return body

    async def _decrypt(self, store: Store, key_id: str | None, doc: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
        req = protocol.decrypt_request(doc, self.config.limits)
        key_id = self._allowed(store, key_id)
        outcome.key_version = self.key_manager.key_version(req.metadata)
        plaintext = await self._timed(
            "decrypt", self.key_manager.decrypt(store.prefix, key_id, req.ciphertext, req.iv, req.tag, req.aad, req.metadata)
        )
        return {"plaintext": b64encode(plaintext).decode()}

    def _log(self, outcome: Outcome, status: int, started: float, request: web.BaseRequest) -> None:
        """One JSON record per request to the access log and the audit log; never data or secrets."""
        seconds = time.perf_counter() - started
        result = outcome.error or "OK"
        self.metrics.request(outcome.store, outcome.operation, result, seconds)
        if not (audit.enabled() or logsink.access_log.isEnabledFor(logging.INFO)):
            return
        meta = outcome.meta
        if meta is None:
            request_id = kms_operation = principal = key_arn = via = vpc = vpce = None
        else:
            clip = audit.clip  # caller-supplied text, cut to MAX_FIELD (the principal is checked at parse)
            request_id, kms_operation, key_arn = clip(meta.kms_request_id), clip(meta.kms_operation), clip(meta.kms_key_arn)
            principal, via, vpc, vpce = meta.aws_principal_arn, meta.kms_via_service, meta.aws_source_vpc, meta.aws_source_vpce
            if via is not None or vpc is not None or vpce is not None:  # KMS's optional fields: usually absent
                via, vpc, vpce = clip(via), clip(vpc), clip(vpce)
        line = orjson.dumps(
            {
                "time": audit.now_iso(),
                "event": "xks.request",
                "kmsRequestId": request_id,
                "kmsOperation": kms_operation,
                "awsPrincipalArn": principal,
                "kmsKeyArn": key_arn,
                "kmsViaService": via,
                "awsSourceVpc": vpc,
                "awsSourceVpce": vpce,
                "operation": outcome.operation,
                "store": outcome.store,
                "keyId": outcome.key_id,
                "keyVersion": outcome.key_version,
                "outcome": result,
                "status": status,
                "deniedBy": outcome.denied_by,
                "latencyMs": round(seconds * 1e6) / 1000,  # whole microseconds: round(x, 3) formats and parses a string
                "remote": request.remote,
            }
        ).decode()
        audit.write_line(line)
        logsink.access_line(line)


def _too_large(cap: int) -> UnsupportedOperationException:
    return UnsupportedOperationException(f"request body is over this proxy's {cap}-byte limit")


def error_response(exc: XksError) -> web.Response:
    """The one place an XKS error becomes an HTTP response (status and one line of JSON)."""
    headers = {"Allow": "POST"} if isinstance(exc, MethodNotAllowed) else None
    response = web.Response(status=exc.status, body=orjson.dumps(exc.body()), content_type=_JSON, headers=headers)
    if isinstance(exc, (RequestTimeout, ClientDisconnected)):
        response.force_close()  # a stalled or vanished client gets no further request on this connection
    return response
