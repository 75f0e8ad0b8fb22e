"""The CLI's side of the admin API: the `KeyLifecycle` methods as HTTPS calls with a bearer token.

Synchronous (urllib) on purpose: the CLI runs one call and exits. TLS is always verified,
against `--admin-ca` or the system CAs.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(Exception):
    """The admin API refused or could not be reached; printed as one line."""


class AdminClient:
    def __init__(self, url: str, token: str, store: str | None, ca_file: str | None = None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.netloc:
            raise AdminError(f"--admin-url must be https://HOST:PORT, not {url!r}")
        self._base = f"https://{parsed.netloc}{parsed.path.rstrip('/')}/admin/v1"
        self._token = token
        self._store = store
        self._timeout = timeout
        try:
            self._tls = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise AdminError(f"--admin-ca: cannot load {ca_file}: {exc}") from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self._base + path
        if method == "GET" and self._store is not None:
            url += "?" + urllib.parse.urlencode({"store": self._store})
        data = None
        if body is not None:
            if self._store is not None:
                body = {"store": self._store, **body}
            data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._tls) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(_refusal(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"admin API at {self._base} not reachable: {reason}") from None

    def create(self, key_id: str, usage: str, no_material: bool) -> dict[str, Any]:
        return self._call("POST", "/keys", {"keyId": key_id, "usage": usage, "noMaterial": no_material})

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/keys")["keys"]

    def show(self, key_id: str) -> dict[str, Any]:
        return self._call("GET", f"/keys/{_quote(key_id)}")

    def enable(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", f"/keys/{_quote(key_id)}/enable", {})

    def disable(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", f"/keys/{_quote(key_id)}/disable", {})

    def rotate(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", f"/keys/{_quote(key_id)}/rotate", {})

    def versions(self, key_id: str) -> dict[str, Any]:
        return self._call("GET", f"/keys/{_quote(key_id)}/versions")

    def schedule_deletion(self, key_id: str, pending_days: int) -> dict[str, Any]:
        return self._call("POST", f"/keys/{_quote(key_id)}/schedule-deletion", {"pendingDays": pending_days})

    def cancel_deletion(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", f"/keys/{_quote(key_id)}/cancel-deletion", {})

    def import_params(self, key_id: str, algorithm: str, key_spec: str) -> dict[str, Any]:
        return self._call(
            "POST", f"/keys/{_quote(key_id)}/import-params", {"wrappingAlgorithm": algorithm, "wrappingKeySpec": key_spec}
        )

    def import_material(self, key_id: str, import_token: str, encrypted_material: bytes) -> dict[str, Any]:
        body = {"importToken": import_token, "encryptedKeyMaterial": base64.b64encode(encrypted_material).decode()}
        return self._call("POST", f"/keys/{_quote(key_id)}/import", body)


def _quote(key_id: str) -> str:
    return urllib.parse.quote(key_id, safe="")


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return f"admin API: {body['errorName']}: {body.get('errorMessage', '')}".rstrip(": ")
    except (ValueError, KeyError, TypeError):
        return f"admin API: HTTP {exc.code}"
