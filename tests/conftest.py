"""Shared fixtures: a real proxy home, the real server on a loopback socket, a signing client.

Requests are signed by botocore's SigV4 signer (the reference), never by our own code, so every
test that passes also says our verifier agrees with botocore.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keymanager import create_key_manager
from keymanager.vault import VaultDB, parse_usage
from xks_proxy import config as configmod
from xks_proxy.home import init_home
from xks_proxy.server import XksServer

STRICT = os.environ.get("XKS_TEST_STRICT") == "1"
REGION = "us-east-1"


def need(tool: str) -> str:
    """The path of a system tool a test needs; a skip locally, a failure under XKS_TEST_STRICT=1."""
    path = shutil.which(tool)
    if path is None:
        if STRICT:
            pytest.fail(f"{tool} is required (XKS_TEST_STRICT=1) but not installed")
        pytest.skip(f"{tool} is not installed")
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def metadata(operation: str = "Encrypt", **extra: str) -> dict[str, str]:
    meta = {
        "kmsRequestId": "4a0f2f55-0f1c-4a2c-9ad0-3c2b5b3b9f11",
        "kmsOperation": operation,
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/alice",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    }
    meta.update(extra)
    return meta


@dataclass
class Home:
    """A proxy home made by `init`, with its first store's credential."""

    path: Path
    prefix: str
    access_key_id: str
    secret: str

    @property
    def config(self) -> configmod.Config:
        return configmod.load(self.path)

    def vault(self) -> VaultDB:
        cfg = self.config
        return VaultDB(cfg.vault.path, cfg.master_key)

    def create_key(self, key_id: str, usage: str = "ENCRYPT,DECRYPT", store: str | None = None) -> None:
        db = self.vault()
        try:
            db.create_key(self.prefix if store is None else store, key_id, parse_usage(usage))
        finally:
            db.close()

    def set_state(self, key_id: str, state: str) -> None:
        db = self.vault()
        try:
            db.set_state(self.prefix, key_id, state)
        finally:
            db.close()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    path = tmp_path / "home"
    akid, secret = init_home(path, "test", REGION, 0)
    h = Home(path=path, prefix="test", access_key_id=akid, secret=secret)
    h.create_key("foo")
    return h


@dataclass
class Client:
    """Signs like AWS KMS does (botocore SigV4) and posts to the real server socket."""

    session: ClientSession
    base_url: str
    uri_path: str
    access_key_id: str
    secret: str
    region: str = REGION
    service: str = "kms-xks-proxy"
    last_headers: dict[str, str] = field(default_factory=dict)

    def signed_headers(self, path: str, body: bytes, content_type: str | None = "application/json") -> dict[str, str]:
        request = AWSRequest(method="POST", url=self.base_url + path, data=body)
        if content_type is not None:
            request.headers["Content-Type"] = content_type
        SigV4Auth(Credentials(self.access_key_id, self.secret), self.service, self.region).add_auth(request)
        return dict(request.headers.items())

    async def post_raw(
        self, path: str, body: bytes, content_type: str | None = "application/json", headers: dict[str, str] | None = None
    ) -> tuple[int, str, dict[str, str]]:
        sent = self.signed_headers(path, body, content_type)
        sent.update(headers or {})
        async with self.session.post(self.base_url + path, data=body, headers=sent, skip_auto_headers=["Content-Type"]) as resp:
            text = await resp.text()
            return resp.status, text, dict(resp.headers)

    async def call(self, operation: str, key_id: str | None = None, **body: Any) -> tuple[int, dict[str, Any]]:
        path = self.uri_path + ("/health" if operation == "health" else f"/keys/{key_id}/{operation}")
        payload = json.dumps(body).encode()
        status, text, _ = await self.post_raw(path, payload)
        assert "\n" not in text.strip(), "responses are one line of JSON"
        return status, json.loads(text)

    async def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None = None, **extra: Any) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"requestMetadata": metadata("Encrypt"), "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        body.update(extra)
        return await self.call("encrypt", key_id, **body)

    async def decrypt(self, key_id: str, encrypted: dict[str, Any], aad: bytes | None = None, **extra: Any) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {
            "requestMetadata": metadata("Decrypt"),
            "encryptionAlgorithm": "AES_GCM",
            "ciphertext": encrypted["ciphertext"],
            "initializationVector": encrypted["initializationVector"],
            "authenticationTag": encrypted["authenticationTag"],
        }
        if "ciphertextMetadata" in encrypted:
            body["ciphertextMetadata"] = encrypted["ciphertextMetadata"]
        if aad is not None:
            body["additionalAuthenticatedData"] = b64(aad)
        body.update(extra)
        return await self.call("decrypt", key_id, **body)


@pytest.fixture
async def server(home: Home) -> AsyncIterator[TestServer]:
    """The real XKS app on a real loopback socket (plain HTTP), over the home's configuration."""
    cfg = home.config
    app = XksServer(cfg, create_key_manager(cfg)).app()
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


@pytest.fixture
async def client(server: TestServer, home: Home) -> AsyncIterator[Client]:
    async with ClientSession() as session:
        yield Client(
            session=session,
            base_url=str(server.make_url("")).rstrip("/"),
            uri_path=f"/{home.prefix}/kms/xks/v1",
            access_key_id=home.access_key_id,
            secret=home.secret,
        )


@pytest.fixture
def cli_env(home: Home) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env["XKS_PROXY_HOME"] = str(home.path)
    yield env
