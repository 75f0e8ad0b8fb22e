"""Helpers for tests that reach the admin API: turn it on in a home, and the claims of a token.

Shared by the admin API's own tests and by every test that runs the CLI through `--admin-url`,
so a change to what the admin API requires of a token is made here once.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from tests.conftest import Home
from tests.support.lifecycle import patch_config

#: The audience and issuer every test token names, and `admin_config` requires.
AUD, ISS = "xks-proxy-admin", "https://idp.test/"


def admin_config(home: Home, **jwt_settings: Any) -> None:
    """Enable the admin API on an ephemeral HTTPS port with the home's dev certificate; `jwt_settings` name the verification key."""
    patch_config(
        home.path,
        admin={
            "enabled": True,
            "host": "127.0.0.1",
            "port": 0,
            "tls_cert": "tls/server.pem",
            "tls_key": "tls/server.key",
            "jwt": {"audience": AUD, "issuer": ISS, **jwt_settings},
        },
    )


def claims(role: str | None = "admin", sub: str = "alice", **changes: Any) -> dict[str, Any]:
    """A valid token's claims for five minutes; `changes` override one, and a None value leaves it out."""
    values: dict[str, Any] = {"sub": sub, "aud": AUD, "iss": ISS, "exp": int(time.time()) + 300, "role": role}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


class Admin:
    """The admin API over HTTPS (the home's dev CA): `call` returns (status, the one-line JSON answer)."""

    def __init__(self, session: ClientSession, port: int, ca: Path) -> None:
        self.session, self.base = session, f"https://127.0.0.1:{port}/admin/v1"
        self.tls = ssl.create_default_context(cafile=str(ca))

    async def call(self, method: str, path: str, token: str | None, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.session.request(method, self.base + path, data=data, headers=headers, ssl=self.tls) as resp:
            text = await resp.text()
            assert "\n" not in text.strip()
            return resp.status, json.loads(text)
