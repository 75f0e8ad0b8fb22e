"""The admin API over real HTTPS with real JWTs (HS256, ES256, RS256), and the CLI through it."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.conftest import Home, metadata
from tests.support.admin import Admin, admin_config, claims
from tests.support.lifecycle import acli, serving, wait_for

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM

async def test_hs256_roles_checks_and_audit(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy.audit")
    secret = secrets.token_hex(32)
    (home.path / "admin-jwt.secret").write_text(secret + "\n")
    admin_config(home, hs256_secret_file="admin-jwt.secret")

    def token(**kw: Any) -> str:
        return jwt.encode(claims(**kw), secret, algorithm="HS256")

    admin_token, viewer = token(), token(role="viewer", sub="bob")
    async with serving(home) as live, ClientSession() as session:
        api = Admin(session, live.admin.port, home.path / "tls" / "ca.pem")
        status, body = await api.call("GET", "/keys", viewer)
        assert status == 200 and [k["keyId"] for k in body["keys"]] == ["foo"]
        status, body = await api.call("POST", "/keys", viewer, {"keyId": "k2"})
        assert (status, body["errorName"]) == (403, "AccessDeniedException")
        status, body = await api.call("POST", "/keys", admin_token, {"keyId": "k2"})
        assert (status, body["keyStatus"]) == (200, "ENABLED")
        status, body = await api.call("POST", "/keys/k2/disable", admin_token, {})
        assert (status, body["keyStatus"]) == (200, "DISABLED")

        async def disabled_for_kms() -> bool:
            status, meta = await live.client.call("metadata", "k2", requestMetadata=metadata("DescribeKey"))
            return meta.get("keyStatus") == "DISABLED"

        await wait_for(disabled_for_kms)
        for path, state in (("enable", "ENABLED"), ("rotate", "ENABLED")):
            status, body = await api.call("POST", f"/keys/k2/{path}", admin_token, {})
            assert (status, body["keyStatus"]) == (200, state), body
        assert body["currentVersion"] == 2
        status, body = await api.call("POST", "/keys/k2/schedule-deletion", admin_token, {"pendingDays": 3})
        assert (status, body["errorName"]) == (400, "ValidationException")
        status, body = await api.call("POST", "/keys/k2/schedule-deletion", admin_token, {"pendingDays": 7})
        assert (status, body["keyStatus"]) == (200, "PENDING_DELETION")
        status, body = await api.call("POST", "/keys/k2/enable", admin_token, {})
        assert (status, body["errorName"]) == (400, "InvalidStateException")
        status, body = await api.call("POST", "/keys/k2/cancel-deletion", admin_token, {})
        assert (status, body["keyStatus"]) == (200, "DISABLED")

        for _ in range(3):
            assert (await live.client.encrypt("foo", b"counted"))[0] == 200
        status, body = await api.call("GET", "/keys/foo/versions", viewer)
        assert status == 200
        (version,) = body["versions"]
        assert version["encryptionsPerformed"] == version["encryptionsByThisServer"] == 3  # the CLI's --json name too
        assert version["encryptionsReserved"] >= 3

        refused = {
            "no token": (None, 401),
            "wrong audience": (token(aud="someone-else"), 401),
            "wrong issuer": (token(iss="https://evil.test/"), 401),
            "expired": (token(exp=int(time.time()) - 120), 401),
            "no exp": (jwt.encode({k: v for k, v in claims().items() if k != "exp"}, secret, algorithm="HS256"), 401),
            "other secret": (jwt.encode(claims(), secrets.token_hex(32), algorithm="HS256"), 401),
            "unsigned": (jwt.encode(claims(), None, algorithm="none"), 401),
            "no role": (token(role=None), 403),
            "unknown role": (token(role="root"), 403),
        }
        for case, (bad, code) in refused.items():
            status, body = await api.call("POST", "/keys/foo/disable", bad, {})
            assert status == code, (case, body)
            assert body["errorName"] == ("AccessDeniedException" if code == 403 else "AuthenticationFailedException")
        status, body = await api.call("GET", "/keys/foo", admin_token)
        assert body["keyStatus"] == "ENABLED"  # none of those got through

        for method, path, raw, code, name in (
            ("GET", "/nowhere", None, 404, "InvalidUriPathException"),
            ("GET", "/keys/foo/enable", None, 405, "UnsupportedOperationException"),
            ("GET", "/keys/nope", None, 404, "KeyNotFoundException"),
            ("POST", "/keys", b"{not json", 400, "ValidationException"),
            ("POST", "/keys", b'{"keyId": 7}', 400, "ValidationException"),
            ("POST", "/keys", b'{"keyId": "bad id!"}', 400, "ValidationException"),
            ("POST", "/keys", b'{"keyId": "x", "store": "nope"}', 400, "ValidationException"),
        ):
            status, body = await api.call(method, path, admin_token, raw=raw)
            assert (status, body["errorName"]) == (code, name), (path, body)

    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "xks_proxy.audit"]
    assert {"actor": "alice", "action": "create", "keyId": "k2", "outcome": "OK", "via": "admin-api"}.items() <= next(
        e for e in events if e.get("action") == "create" and e.get("outcome") == "OK"
    ).items()
    assert any(e["actor"] == "bob" and e["action"] == "create" and e["outcome"] == "AccessDeniedException" for e in events)
    assert any(e["actor"] == "alice" and e["action"] == "schedule-deletion" and e["outcome"] == "BadRequest" for e in events)
    assert any(e["actor"] is None and e["outcome"] == "AuthenticationFailedException" for e in events)
    assert secret not in caplog.text


async def test_es256_rs256_and_the_cli_through_the_admin_api(home: Home, tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for name, key in (("idp-es256.pem", ec_key), ("idp-rs256.pem", rsa_key)):
        (home.path / name).write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    admin_config(home, public_key_files=["idp-es256.pem", "idp-rs256.pem"])
    ca = home.path / "tls" / "ca.pem"
    tokens = {
        "admin": jwt.encode(claims(sub="carol"), ec_key, algorithm="ES256"),
        "viewer": jwt.encode(claims(role="viewer", sub="dave"), rsa_key, algorithm="RS256"),
        "stranger": jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        "hs256": jwt.encode(claims(), "x" * 40, algorithm="HS256"),
    }
    for name, value in tokens.items():
        (tmp_path / name).write_text(value)
    async with serving(home) as live, ClientSession() as session:
        api = Admin(session, live.admin.port, ca)
        assert (await api.call("GET", "/keys", tokens["viewer"]))[0] == 200
        assert (await api.call("GET", "/keys", tokens["stranger"]))[0] == 401
        assert (await api.call("GET", "/keys", tokens["hs256"]))[0] == 401  # no algorithm confusion

        url = f"https://127.0.0.1:{live.admin.port}"

        async def admin_cli(*args: str, who: str = "admin") -> tuple[int, str, str]:
            # No --home and no local vault: everything goes through the admin API.
            return await acli(*args, "--admin-url", url, "--admin-token-file", str(tmp_path / who), "--admin-ca", str(ca))

        rc, out, err = await admin_cli("keys", "create", "ext", "--no-material")
        assert rc == 0, err
        assert json.loads(out)["keyStatus"] == "PENDING_IMPORT"
        params = tmp_path / "params"
        rc, out, err = await admin_cli(
            "keys", "get-import-params", "ext", "--wrapping-algorithm", "RSAES_OAEP_SHA_256",
            "--wrapping-key-spec", "RSA_2048", "--out-dir", str(params),
        )  # fmt: skip
        assert rc == 0, err
        public = serialization.load_pem_public_key((params / "WrappingPublicKey.pem").read_bytes())
        assert isinstance(public, rsa.RSAPublicKey)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        (params / "material.bin").write_bytes(public.encrypt(os.urandom(32), oaep))
        rc, out, err = await admin_cli(
            "keys", "import", "ext", "--import-token", str(params / "ImportToken"),
            "--encrypted-key-material", str(params / "material.bin"),
        )  # fmt: skip
        assert rc == 0, err
        assert json.loads(out)["keyStatus"] == "ENABLED"

        async def usable() -> bool:
            return (await live.client.encrypt("ext", b"imported via the admin API"))[0] == 200

        await wait_for(usable)
        rc, out, err = await admin_cli("keys", "list", who="viewer")
        assert rc == 0 and out.splitlines() == ["ext\tENABLED\tENCRYPT,DECRYPT\tversions=1", "foo\tENABLED\tENCRYPT,DECRYPT\tversions=1"], err
        rc, out, err = await admin_cli("keys", "versions", "ext", "--json", who="viewer")
        assert rc == 0 and json.loads(out)["versions"][0]["encryptionsPerformed"] >= 1, err
        rc, _, err = await admin_cli("keys", "schedule-deletion", "ext", "--pending-days", "7", who="viewer")
        assert rc == 1 and "AccessDeniedException" in err
        rc, _, err = await admin_cli("keys", "show", "ext", who="stranger")
        assert rc == 1 and "AuthenticationFailedException" in err
        rc, _, err = await acli("keys", "show", "ext", "--admin-url", url, "--admin-token-file", str(tmp_path / "admin"))
        assert rc == 1 and "certificate" in err.lower()  # TLS is verified: the dev CA is not a system CA
