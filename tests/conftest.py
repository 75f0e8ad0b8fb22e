"""Shared fixtures: a real proxy home, the real server on a loopback socket, a signing client.

Requests are signed by botocore's SigV4 signer (the reference), never by our own code, so every
test that passes also says our verifier agrees with botocore.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keymanager import create_key_admin, create_key_manager
from keymanager.vault.db import VaultDB, parse_usage
from xks_proxy import config as configmod
from xks_proxy.cli.home import init_home, new_access_key_id, new_secret
from xks_proxy.server import XksServer

STRICT = os.environ.get("XKS_TEST_STRICT") == "1"
REGION = "us-east-1"
BACKENDS = ["vault", "pkcs11"]
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)


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


# --- SoftHSMv2 ----------------------------------------------------------------------------------------


def need_softhsm_module() -> str:
    """The SoftHSMv2 PKCS#11 library; a skip locally, a failure under XKS_TEST_STRICT=1."""
    for module in SOFTHSM_MODULES:
        if Path(module).is_file():
            return module
    if STRICT:
        pytest.fail("libsofthsm2.so is required (XKS_TEST_STRICT=1) but not installed (apt-get install softhsm2)")
    pytest.skip("libsofthsm2.so is not installed")


@dataclass
class SoftHsm:
    """A fresh SoftHSMv2 token in a temporary directory, for this test only."""

    module: str
    conf: Path
    tokens: Path
    label: str = "xks-test"
    pin: str = field(default="pin-4b1d-7319", repr=False)  # distinctive, so tests can prove it never shows up
    so_pin: str = field(default="so-pin-9876", repr=False)

    @contextmanager
    def session(self, module: str | None = None) -> Iterator[Any]:
        """A read-write session on the token, through the same process-wide library as the proxy."""
        from keymanager.pkcs11.token import Library

        library = Library.get(module or self.module)
        session = library.session(library.token(self.label, None), self.pin, rw=True)
        try:
            yield session
        finally:
            session.close()

    def import_key(self, label: str, material: bytes, usage: str = "ENCRYPT,DECRYPT", module: str | None = None) -> None:
        """Put known AES material in the token as a sensitive, non-extractable key (C_CreateObject)."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        names = set(usage.split(","))
        with self.session(module) as session:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
                    Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    Attribute.LABEL: label, Attribute.VALUE: material,
                    Attribute.ENCRYPT: "ENCRYPT" in names, Attribute.DECRYPT: "DECRYPT" in names,
                }
            )  # fmt: skip

    def env(self) -> dict[str, str]:
        return dict(os.environ, SOFTHSM2_CONF=str(self.conf))


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    from keymanager.pkcs11.token import Library

    util = need("softhsm2-util")
    module = need_softhsm_module()
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    hsm = SoftHsm(module=module, conf=conf, tokens=tokens)
    subprocess.run(
        [util, "--init-token", "--free", "--label", hsm.label, "--so-pin", hsm.so_pin, "--pin", hsm.pin],
        check=True, capture_output=True, env=hsm.env(), timeout=60,
    )  # fmt: skip
    Library.finalize_all()  # SoftHSM reads SOFTHSM2_CONF (and finds tokens) at C_Initialize
    yield hsm
    Library.finalize_all()


def aws_settings(
    module: str, pin: str, stores: list[dict[str, Any]], region: str = REGION, extra: str = ""
) -> str:
    """A settings.toml as the AWS sample proxy (aws-kms-xks-proxy) reads it."""
    lines = [
        "[server]", 'ip = "127.0.0.1"', "port = 0", f'region = "{region}"', 'service = "kms-xks-proxy"', "",
        "[security]", "is_sigv4_auth_enabled = true", "is_tls_enabled = false", "is_mtls_enabled = false", "",
        "[tracing]", 'level = "DEBUG"', "",
        "[pkcs11]", "session_pool_max_size = 4", "session_pool_timeout_milli = 5000", "session_eager_close = false",
        f'user_pin = "{pin}"', f'PKCS11_HSM_MODULE = "{module}"', "context_read_timeout_milli = 100", "",
        "[limits]", "max_plaintext_in_base64 = 8192", "max_aad_in_base64 = 8192", "",
        "[hsm_capabilities]", "can_generate_iv = false", "is_zero_iv_required = false", "",
    ]  # fmt: skip
    for store in stores:
        lines += ["[[external_key_stores]]", f'uri_path_prefix = "{store["uri_path_prefix"]}"']
        lines += [f'sigv4_access_key_id = "{store["access_key_id"]}"', f'sigv4_secret_access_key = "{store["secret"]}"']
        if store.get("key_ids") is not None:
            lines.append("xks_key_id_set = [" + ", ".join(f'"{k}"' for k in store["key_ids"]) + "]")
        lines.append("")
    return "\n".join(lines) + "\n" + extra


def run_cli_in_process(*argv: str) -> int:
    """The real CLI entry point, without a subprocess (and without leaking its umask into the tests)."""
    from xks_proxy import cli

    old = os.umask(0o077)
    try:
        return cli.main(list(argv))
    finally:
        os.umask(old)


def set_pkcs11(home: Path, **values: Any) -> None:
    """Change [pkcs11] settings in a home's config.toml, as an operator would."""
    import tomllib

    from xks_proxy.cli.home import write_config

    raw = tomllib.loads((home / "config.toml").read_text())
    raw["pkcs11"].update(values)
    write_config(home, raw)


# --- homes ---------------------------------------------------------------------------------------------


@dataclass
class Home:
    """A proxy home with its first store's credential: `init` (vault) or `import-config` (pkcs11).

    Helpers go through the backend's KeyAdmin. What a backend cannot do skips the test, saying
    why: on pkcs11 a store prefix does not partition the token, key state lives in the HSM,
    and there is no vault file.
    """

    path: Path
    prefix: str
    access_key_id: str
    secret: str = field(repr=False)  # a failing assertion prints the Home; never the secret
    backend: str = "vault"
    hsm: SoftHsm | None = None
    materials: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> configmod.Config:
        return configmod.load(self.path)

    def vault(self) -> VaultDB:
        if self.backend != "vault":
            pytest.skip(f"vault-only: this test reads the vault file directly ({self.backend} backend)")
        cfg = self.config
        return VaultDB(cfg.vault.path, cfg.master_key)

    def _admin_do(self, action: str, *args: Any) -> Any:
        admin = create_key_admin(self.config)
        try:
            return getattr(admin, action)(*args)
        finally:
            admin.close()

    def create_key(self, key_id: str, usage: str = "ENCRYPT,DECRYPT", store: str | None = None) -> None:
        if self.backend == "pkcs11" and store not in (None, self.prefix):
            pytest.skip("vault-only: on pkcs11 a store prefix does not partition the token (stores use key_ids)")
        self._admin_do("create_key", self.prefix if store is None else store, key_id, parse_usage(usage))

    def set_state(self, key_id: str, state: str) -> None:
        if self.backend == "pkcs11":
            pytest.skip("vault-only: disable/enable do not exist on pkcs11 (key state lives in the HSM)")
        self._admin_do("set_state", self.prefix, key_id, state)

    def material(self, key_id: str, version: int = 1) -> bytes:
        """A key's raw material, as only a test may read it (vault: unsealed; pkcs11: imported by the test)."""
        if self.backend == "pkcs11":
            if key_id not in self.materials or version != 1:
                pytest.skip(f"the material of {key_id} v{version} never left the HSM")
            return self.materials[key_id]
        from keymanager.vault.db import material_context

        cfg = self.config
        db = sqlite3.connect(cfg.vault.path)  # straight from the sealed row, past every API
        try:
            row = db.execute(
                "SELECT sealed FROM key_versions WHERE store = ? AND key_id = ? AND version = ?", (self.prefix, key_id, version)
            ).fetchone()
        finally:
            db.close()
        return cfg.master_key.unseal(row[0], material_context(self.prefix, key_id, version))


def pkcs11_home(path: Path, hsm: SoftHsm, prefix: str = "test", module: str | None = None) -> Home:
    """A pkcs11 home made the way an operator migrating from the AWS sample makes one: import-config."""
    akid, secret = new_access_key_id(), new_secret()
    settings = path.parent / f"{path.name}-aws-settings.toml"
    store = {"uri_path_prefix": f"/{prefix}", "access_key_id": akid, "secret": secret}
    settings.write_text(aws_settings(module or hsm.module, hsm.pin, [store]))
    assert run_cli_in_process("import-config", str(settings), "--home", str(path)) == 0
    # Generous timeouts: tests make hundreds of concurrent requests on a shared 2-core machine.
    set_pkcs11(path, operation_timeout_seconds=10.0, session_wait_seconds=10.0)
    return Home(path=path, prefix=prefix, access_key_id=akid, secret=secret, backend="pkcs11", hsm=hsm)


def pkcs11_home_with_foo(path: Path, hsm: SoftHsm, module: str | None = None) -> Home:
    """A pkcs11 home whose token holds key "foo", of material the test knows (home.materials);
    `module`: the PKCS#11 module in front of the token, if not SoftHSM's own (a test's shim)."""
    home = pkcs11_home(path, hsm, module=module)
    home.materials["foo"] = os.urandom(32)
    hsm.import_key("foo", home.materials["foo"], module=module)
    return home


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked vault_only run once, on the vault: their other-backend variants are deselected."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("vault_only") and params.get("backend", "vault") != "vault":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def home(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Home:
    """A home with key "foo" in store "test", on each backend."""
    path = tmp_path / "home"
    if backend == "pkcs11":
        return pkcs11_home_with_foo(path, request.getfixturevalue("softhsm"))
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
    secret: str = field(repr=False)
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


# --- the whole chain: a local AWS KMS (xks-proxy local-kms) in front of an XKS proxy (issue 14) --------


@pytest.fixture
def served_proxy(home: Home) -> Iterator[Any]:
    """`xks-proxy serve` as a subprocess on the home (HTTPS, the home's dev CA in tls/ca.pem). Vault only."""
    from tests.support.localkms import ServedProxy, free_port

    proxy = ServedProxy(home.path, free_port()).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def local_kms(tmp_path: Path) -> Iterator[Any]:
    """A factory: local_kms(ca_bundle) starts `xks-proxy local-kms --http` on a fresh state dir."""
    from tests.support.localkms import start_local_kms

    started: list[Any] = []

    def start(ca_bundle: Path | None = None) -> Any:
        started.append(start_local_kms(tmp_path / f"kms-state-{len(started)}", ca_bundle))
        return started[-1]

    yield start
    for kms in started:
        kms.stop()


@pytest.fixture
def kms_chain(home: Home, local_kms: Any) -> Iterator[Any]:
    """boto3 → local KMS → our proxy (served as in served_proxy): a CONNECTED store, a KMS key for xks key `foo`."""
    from tests.support.localkms import ServedProxy, chain, free_port

    proxy = ServedProxy(home.path, free_port()).spawn()  # starts while the local KMS starts
    try:
        kms = local_kms(proxy.ca)
        config = {"XksProxyUriPath": f"/{home.prefix}/kms/xks/v1",
                  "XksProxyAuthenticationCredential": {"AccessKeyId": home.access_key_id, "RawSecretAccessKey": home.secret}}
        yield chain(kms, proxy.wait(), proxy.endpoint, config)
    finally:
        proxy.stop()


@pytest.fixture
def tiny_xks(tmp_path: Path) -> Iterator[Any]:
    """tests/support/tiny_xks.py (the independent XKS proxy) over HTTPS on its own thread; CA in `.ca_path`."""
    from tests.support.tiny_xks import TinyXks

    with TinyXks(tls_dir=tmp_path / "tiny-tls").running() as tiny:
        yield tiny
