"""The optional admin API: the key lifecycle as JSON over HTTPS, for people and automation.

Off by default. When `[admin] enabled = true`, the server process also listens on a separate
port (never the XKS port, which KMS reaches), HTTPS only. Every request carries
`Authorization: Bearer <JWT>`, verified with pyjwt against the configured HS256 secret or
RS256/ES256 public keys; `exp`, `aud`, `iss` and `sub` are required and checked. The `role`
claim is "viewer" (may read) or "admin" (may also change). Every request is audited with the
token's `sub`: the lifecycle layer audits the operations, this module audits refusals that
happen before an operation runs (no token, bad token, a viewer writing).

    GET  /admin/v1/keys[?store=P]                     list keys
    POST /admin/v1/keys   {"keyId", "usage", "noMaterial"}          create
    GET  /admin/v1/keys/ID[?store=P]                  show
    GET  /admin/v1/keys/ID/versions[?store=P]         versions (+ this server's exact counts)
    POST /admin/v1/keys/ID/enable | disable | rotate | cancel-deletion     {}
    POST /admin/v1/keys/ID/schedule-deletion          {"pendingDays": 7..30}
    POST /admin/v1/keys/ID/import-params              {"wrappingAlgorithm", "wrappingKeySpec"}
    POST /admin/v1/keys/ID/import                     {"importToken", "encryptedKeyMaterial": base64}

Bodies may name "store" (a URI prefix); it may be left out when the proxy has one store.
Errors are the XKS error set's JSON (`{"errorName", "errorMessage"}`): 401 bad or missing
token, 403 role too weak, 404 no such key or path, 400 invalid input or a refused change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, Callable

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keymanager.base import BadRequest, KeyAdmin, KeyLifecycle, KeyManager, KeyRefused, NoSuchKey, StorageUnavailable, audit
from keymanager.registry import backend
from xks_proxy.config import AdminConfig, AdminJwtConfig, Config, ConfigError
from xks_proxy.errors import (
    AccessDeniedException,
    DependencyTimeoutException,
    AuthenticationFailedException,
    InternalException,
    InvalidStateException,
    InvalidUriPathException,
    KeyNotFoundException,
    MethodNotAllowed,
    ValidationException,
    XksError,
)
from xks_proxy.process.sockets import listen
from xks_proxy.access.mtls import server_context

log = logging.getLogger("xks_proxy.admin")

VIEWER, ADMIN = "viewer", "admin"
CLOCK_LEEWAY_SECONDS = 30
_PATH = re.compile(r"^/admin/v1/keys(?:/(?P<key>[^/]+)(?:/(?P<action>[a-z-]+))?)?$")
_READS = {"list", "show", "versions"}
_WRITES = {"create", "enable", "disable", "rotate", "schedule-deletion", "cancel-deletion", "import-params", "import"}


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str


class TokenVerifier:
    """Checks admin bearer tokens: signature, exp, aud, iss, sub, and a known role."""

    def __init__(self, config: AdminJwtConfig) -> None:
        self._config = config

    def _keys_for(self, algorithm: str) -> list[Any]:
        cfg = self._config
        if cfg.hs256_secret is not None:
            return [cfg.hs256_secret] if algorithm == "HS256" else []
        if algorithm == "RS256":
            return [k for k in cfg.public_keys if isinstance(k, rsa.RSAPublicKey)]
        if algorithm == "ES256":
            return [k for k in cfg.public_keys if isinstance(k, ec.EllipticCurvePublicKey)]
        return []

    def verify(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailedException("an Authorization: Bearer <token> header is required")
        token = token.strip()
        try:
            algorithm = jwt.get_unverified_header(token).get("alg", "")
        except jwt.PyJWTError:
            raise AuthenticationFailedException("the bearer token is not a JWT") from None
        keys = self._keys_for(algorithm)
        if not keys:
            raise AuthenticationFailedException(f"tokens signed with {algorithm or 'no algorithm'} are not accepted here")
        claims = self._decode(token, algorithm, keys)
        role = claims.get("role")
        if role not in (VIEWER, ADMIN) or not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AccessDeniedException('the token needs a "sub" and a "role" claim of "viewer" or "admin"')
        return Principal(subject=claims["sub"], role=role)

    def _decode(self, token: str, algorithm: str, keys: list[Any]) -> dict[str, Any]:
        cfg = self._config
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=cfg.audience,
                    issuer=cfg.issuer,
                    leeway=CLOCK_LEEWAY_SECONDS,
                    options={"require": ["exp", "aud", "iss", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe another configured key
            except jwt.ExpiredSignatureError:
                raise AuthenticationFailedException("the token has expired") from None
            except jwt.InvalidAudienceError:
                raise AuthenticationFailedException("the token is for another audience") from None
            except jwt.InvalidIssuerError:
                raise AuthenticationFailedException("the token is from another issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthenticationFailedException(f"the token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError:
                raise AuthenticationFailedException("the token is not valid") from None
        raise AuthenticationFailedException("the token's signature does not verify with any configured key")


def _vault_error(exc: KeyRefused) -> XksError:
    if isinstance(exc, NoSuchKey):
        return KeyNotFoundException(str(exc))
    if isinstance(exc, BadRequest):
        return ValidationException(str(exc))
    return InvalidStateException(str(exc))


class AdminApi:
    """The aiohttp application of the admin listener, over its own connection to the vault."""

    def __init__(self, config: Config, key_manager: KeyManager | None = None) -> None:
        assert config.admin.jwt is not None
        self._config = config
        self._key_manager = key_manager
        self._verifier = TokenVerifier(config.admin.jwt)
        self._db: KeyAdmin | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def open(self) -> None:
        try:
            await self._vault()
        except StorageUnavailable as exc:  # a fleet's database: opened on the first request instead
            log.error("admin API: %s; it answers DependencyTimeoutException until the database is back", exc)

    async def _vault(self) -> KeyAdmin:
        if self._db is None:
            self._db = await asyncio.to_thread(backend(self._config.backend).key_admin, self._config)
        return self._db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()

    async def handle(self, request: web.Request) -> web.Response:
        principal: Principal | None = None
        action, key_id = "-", None
        try:
            action, key_id = self._route(request)
            principal = self._verifier.verify(request.headers.get("Authorization"))
            if action in _WRITES and principal.role != ADMIN:
                raise AccessDeniedException(f"role {principal.role} may only read; {action} needs role admin")
            doc = await self._body(request) if request.method == "POST" else {}
            try:
                if self._config.vault.dsn is not None:  # a fleet's stores change in its database
                    from xks_proxy.fleet import shared_settings

                    self._config = await asyncio.to_thread(shared_settings.load_into, self._config)
                store = self._store(doc.get("store") if request.method == "POST" else request.query.get("store"))
                keys = self._lifecycle(await self._vault(), store, principal.subject)
                result = await asyncio.to_thread(self._operation(action, key_id, doc, keys))
            except StorageUnavailable as exc:
                log.error("admin API %s: %s", action, exc)
                raise DependencyTimeoutException("the vault database is unreachable; nothing was changed, retry later") from None
            if action == "versions":
                self._add_live_counts(store, key_id, result)
            return web.json_response(result, dumps=_dumps)
        except KeyRefused as exc:
            return _error(_vault_error(exc))  # audited by the lifecycle layer
        except XksError as exc:
            audit(
                {
                    "event": "admin-api",
                    "action": action,
                    "actor": principal.subject if principal else None,
                    "role": principal.role if principal else None,
                    "keyId": key_id,
                    "outcome": exc.name,
                    "reason": exc.message,
                    "remote": request.remote,
                }
            )
            return _error(exc)
        except Exception:
            log.exception("admin API failure in %s", action)
            return _error(InternalException("internal error; see the proxy log"))

    def _lifecycle(self, admin: KeyAdmin, store: str, actor: str) -> KeyLifecycle:
        """The backend's audited lifecycle (config validation allows the admin API only on a backend that has one)."""
        make = backend(self._config.backend).lifecycle
        assert make is not None
        return make(admin, store, actor, "admin-api")

    @staticmethod
    def _route(request: web.Request) -> tuple[str, str | None]:
        match = _PATH.match(request.rel_url.raw_path)
        if match is None:
            raise InvalidUriPathException("no admin API at this path")
        key_id, sub = match["key"], match["action"]
        if key_id is not None:
            key_id = _unquote(key_id)
        if key_id is None:
            action = {"GET": "list", "POST": "create"}.get(request.method)
        elif sub is None:
            action = "show" if request.method == "GET" else None
        elif sub == "versions":
            action = "versions" if request.method == "GET" else None
        elif sub in _WRITES and sub != "create":
            action = sub if request.method == "POST" else None
        else:
            raise InvalidUriPathException("no admin API at this path")
        if action is None:
            raise MethodNotAllowed(f"{request.method} is not supported on this admin path")
        return action, key_id

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ValidationException("the body is not JSON") from None
        if not isinstance(doc, dict):
            raise ValidationException("the body must be a JSON object")
        return doc

    def _store(self, prefix: Any) -> str:
        if prefix is not None and not isinstance(prefix, str):
            raise ValidationException("store must be a string (a key store's URI prefix)")
        try:
            return self._config.store(prefix).prefix
        except ConfigError as exc:
            raise ValidationException(str(exc).replace("--store", "store")) from None

    @staticmethod
    def _operation(action: str, key_id: str | None, doc: dict[str, Any], keys: KeyLifecycle) -> Callable[[], Any]:
        """The lifecycle call for this action, with the body's fields checked for type."""
        if action == "list":
            return lambda: {"keys": keys.list()}
        if action == "create":
            new_id = _field(doc, "keyId", str)
            usage = _field(doc, "usage", str, "ENCRYPT,DECRYPT")
            no_material = _field(doc, "noMaterial", bool, False)
            return lambda: keys.create(new_id, usage, no_material)
        assert key_id is not None
        if action == "schedule-deletion":
            days = _field(doc, "pendingDays", int, 30)
            return lambda: keys.schedule_deletion(key_id, days)
        if action == "import-params":
            algorithm = _field(doc, "wrappingAlgorithm", str)
            spec = _field(doc, "wrappingKeySpec", str)
            return lambda: keys.import_params(key_id, algorithm, spec)
        if action == "import":
            token = _field(doc, "importToken", str)
            try:
                material = base64.b64decode(_field(doc, "encryptedKeyMaterial", str), validate=True)
            except (binascii.Error, ValueError):
                raise ValidationException("encryptedKeyMaterial must be base64") from None
            return lambda: keys.import_material(key_id, token, material)
        simple: dict[str, Callable[[str], Any]] = {
            "show": keys.show,
            "versions": keys.versions,
            "enable": keys.enable,
            "disable": keys.disable,
            "rotate": keys.rotate,
            "cancel-deletion": keys.cancel_deletion,
        }
        return lambda: simple[action](key_id)

    def _add_live_counts(self, store: str, key_id: str | None, result: dict[str, Any]) -> None:
        """This server's exact encryptions per version since it started (the vault holds upper bounds).

        Named `encryptionsPerformed`, as `keys versions --json` names it, so a version object has one
        shape wherever it is shown (`encryptionsByThisServer` is kept for existing API clients).
        """
        counts = getattr(self._key_manager, "usage_counts", None)
        if counts is None or key_id is None:
            return
        live = counts(store, key_id)
        for version in result["versions"]:
            performed = live.get(version["version"], 0)
            version["encryptionsPerformed"] = version["encryptionsByThisServer"] = performed


_MISSING = object()


def _field(doc: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = doc.get(name, default)
    if value is _MISSING:
        raise ValidationException(f"{name} is required")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationException(f"{name} must be a {kind.__name__}")
    return value


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _error(exc: XksError) -> web.Response:
    headers = {"Allow": "GET, POST"} if isinstance(exc, MethodNotAllowed) else None
    return web.Response(status=exc.status, text=_dumps(exc.body()), content_type="application/json", headers=headers)


def tls_context(admin: AdminConfig) -> ssl.SSLContext:
    """The XKS listener's TLS settings (versions, AEAD suites, no renegotiation) with the admin certificate."""
    assert admin.tls_cert is not None and admin.tls_key is not None
    ctx = server_context()
    ctx.load_cert_chain(admin.tls_cert, admin.tls_key)
    return ctx


class AdminListener:
    """Runs the admin API on its own HTTPS port beside the XKS server, in the same process."""

    def __init__(self, config: Config, key_manager: KeyManager | None = None) -> None:
        self._config = config
        self.api = AdminApi(config, key_manager)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        admin = self._config.admin
        await self.api.open()
        self._runner = web.AppRunner(self.api.app(), access_log=None)
        await self._runner.setup()
        site = web.SockSite(self._runner, listen(admin.host, admin.port), ssl_context=tls_context(admin))
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("admin API on https://%s:%d/admin/v1", admin.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.api.close()


def attach(app: web.Application, config: Config, key_manager: KeyManager) -> AdminListener:
    """Start the admin listener with `app` (after the key manager) and stop it first on cleanup."""
    listener = AdminListener(config, key_manager)

    async def start(_: web.Application) -> None:
        await listener.start()

    async def stop(_: web.Application) -> None:
        await listener.close()

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)
    return listener
