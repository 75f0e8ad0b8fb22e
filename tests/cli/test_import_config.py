"""`xks-proxy import-config`: from the AWS sample proxy's settings.toml to a serving home, one command.

The flagship test imports through the real CLI (a subprocess), serves with the real `serve`
process over the same SoftHSM token, and decrypts ciphertexts the test made on its own with
`cryptography` over the key material it put in the token, using the AAD construction written out
from the protocol notes, as the AWS sample proxy builds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support import ROOT
from tests.conftest import Client, SoftHsm, aws_settings, b64, metadata, need_softhsm_module, run_cli_in_process, unb64
from xks_proxy import config as configmod

STORE_ONE = {
    "uri_path_prefix": "/aws/one",
    "access_key_id": "BETWEEN2TENAND3TENCHARACTERS",
    "secret": "PleaseReplaceThisWithSomeSecretOfLength43To64",
    "key_ids": ["legacy", "missing"],
}
STORE_TWO = {
    "uri_path_prefix": "/aws/two",
    "access_key_id": "ANOTHERKEYIDOFTWENTYTWO",
    "secret": "Zm9yIHRoZSBzZWNvbmQgc3RvcmUgb2YgdGhlIHNhbXBsZSBwcm94eQ==",
    "key_ids": None,
}


def sample_aad(aad: bytes | None, meta: bytes | None) -> bytes:
    """The AWS sample's AES-GCM AAD, from the protocol notes:
    uint16_be(len(aad)) || sha256(aad) [if the field is present] || uint8(len(meta)) || meta."""
    out = b"\x00\x00" if aad is None else struct.pack(">H", len(aad)) + hashlib.sha256(aad).digest()
    meta = meta or b""
    return out + struct.pack(">B", len(meta)) + meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args], capture_output=True, text=True, env=env, timeout=60)


async def test_migrate_from_the_aws_sample_in_one_command(tmp_path: Path, softhsm: SoftHsm) -> None:
    material = os.urandom(32)
    softhsm.import_key("legacy", material)  # the key the AWS sample served: known material, non-extractable
    port = free_port()
    settings = tmp_path / "settings.toml"
    settings.write_text(
        aws_settings(softhsm.module, softhsm.pin, [STORE_ONE, STORE_TWO]).replace("port = 0", f"port = {port}")
    )
    home = tmp_path / "home"

    imported = cli("import-config", str(settings), "--home", str(home), env=softhsm.env())
    assert imported.returncode == 0, imported.stderr
    out = imported.stdout + imported.stderr
    assert "/aws/one/kms/xks/v1" in out and "/aws/two/kms/xks/v1" in out
    assert "legacy: AES_256 ENCRYPT,DECRYPT" in out and "missing: no key labelled missing" in out
    assert "xks-proxy-health (created)" in out and "--http" in out
    for secret in (softhsm.pin, STORE_ONE["secret"], STORE_TWO["secret"]):
        assert secret not in out

    text = (home / "config.toml").read_text()
    for secret in (softhsm.pin, STORE_ONE["secret"], STORE_TWO["secret"]):
        assert secret not in text
    pin_file = home / "pkcs11.pin"
    assert pin_file.read_text().strip() == softhsm.pin and stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    cfg = configmod.load(home)
    assert cfg.backend == "pkcs11" and cfg.pkcs11 is not None
    assert (cfg.pkcs11.token_label, cfg.pkcs11.iv_mode, cfg.pkcs11.session_pool_size) == (softhsm.label, "proxy", 4)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", port)
    one, two = cfg.stores
    assert (one.prefix, one.key_ids, one.regions) == ("aws/one", frozenset({"legacy", "missing"}), frozenset({"us-east-1"}))
    assert (two.prefix, two.key_ids) == ("aws/two", None)
    assert one.secret_for(STORE_ONE["access_key_id"]) == STORE_ONE["secret"]
    assert two.secret_for(STORE_TWO["access_key_id"]) == STORE_TWO["secret"]

    serve = subprocess.Popen(
        [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home), "--http"],
        env=dict(softhsm.env(), PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        await _wait_listening(port, serve)
        async with ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            client = Client(session, base, "/aws/one/kms/xks/v1", STORE_ONE["access_key_id"], STORE_ONE["secret"])
            key = AESGCM(material)
            for aad in (None, b"", b"tenant=42"):
                for meta in (None, b"", b"aws-sample"):
                    iv = os.urandom(12)
                    sealed = key.encrypt(iv, b"from the AWS sample", sample_aad(aad, meta))
                    made = {"ciphertext": b64(sealed[:-16]), "initializationVector": b64(iv), "authenticationTag": b64(sealed[-16:])}
                    if meta is not None:
                        made["ciphertextMetadata"] = b64(meta)
                    status, dec = await client.decrypt("legacy", made, aad=aad)
                    assert status == 200, (aad, meta, dec)
                    assert unb64(dec["plaintext"]) == b"from the AWS sample"
                    # And the other way: what we encrypt opens with the same construction.
                    status, enc = await client.encrypt("legacy", b"from us", aad=aad)
                    assert status == 200, enc
                    ours = unb64(enc["ciphertext"]) + unb64(enc["authenticationTag"])
                    opened = key.decrypt(unb64(enc["initializationVector"]), ours, sample_aad(aad, unb64(enc["ciphertextMetadata"])))
                    assert opened == b"from us"
            status, body = await client.call("health", requestMetadata=metadata("KmsHealthCheck"))
            assert (status, body["ekmFleetDetails"][0]["healthStatus"]) == (200, "ACTIVE"), body
            status, err = await client.call("metadata", "missing", requestMetadata=metadata("CreateKey"))
            assert (status, err["errorName"]) == (404, "KeyNotFoundException")

            # Store one's key set narrows it; store two has none, so it sees the token's keys.
            softhsm.import_key("unlisted", os.urandom(32))
            status, err = await client.encrypt("unlisted", b"x")
            assert (status, err["errorName"]) == (404, "KeyNotFoundException")
            other = Client(session, base, "/aws/two/kms/xks/v1", STORE_TWO["access_key_id"], STORE_TWO["secret"])
            status, enc = await other.encrypt("unlisted", b"x")
            assert status == 200, enc
            crossed = Client(session, base, "/aws/two/kms/xks/v1", STORE_ONE["access_key_id"], STORE_ONE["secret"])
            status, err = await crossed.call("health", requestMetadata=metadata("KmsHealthCheck"))
            assert (status, err["errorName"]) == (401, "AuthenticationFailedException")
    finally:
        serve.terminate()
        _, stderr = serve.communicate(timeout=15)
    assert softhsm.pin not in stderr and STORE_ONE["secret"] not in stderr


async def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("serve did not start listening")


# --- field by field (no HSM contact: --no-verify) --------------------------------------------------------


def _import(tmp_path: Path, settings_text: str, *extra: str) -> tuple[int, Path]:
    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text)
    home = tmp_path / "home"
    return run_cli_in_process("import-config", str(settings), "--home", str(home), "--no-verify", *extra), home


@pytest.mark.parametrize(
    "can_generate,zero_required,mode",
    [("false", "false", "proxy"), ("true", "true", "hsm-zero-buffer"), ("true", "false", "hsm-appended")],
)
def test_hsm_capabilities_choose_the_iv_mode(tmp_path: Path, can_generate: str, zero_required: str, mode: str) -> None:
    module = need_softhsm_module()
    text = aws_settings(module, "1234", [STORE_ONE]).replace(
        "can_generate_iv = false\nis_zero_iv_required = false",
        f"can_generate_iv = {can_generate}\nis_zero_iv_required = {zero_required}",
    )
    code, home = _import(tmp_path, text, "--token-label", "mine")
    assert code == 0
    cfg = configmod.load(home)
    assert cfg.pkcs11 is not None and (cfg.pkcs11.iv_mode, cfg.pkcs11.token_label) == (mode, "mine")


def test_tls_limits_metadata_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = need_softhsm_module()
    (tmp_path / "tls").mkdir()
    for name in ("server_cert.pem", "server_key.pem", "ca.pem"):
        (tmp_path / "tls" / name).write_text("placeholder")
    text = aws_settings(module, "1234", [STORE_TWO]).replace(
        "is_tls_enabled = false\nis_mtls_enabled = false",
        'is_tls_enabled = true\nis_mtls_enabled = true\n\n[tls]\ntls_cert_pem = "tls/server_cert.pem"\n'
        'tls_key_pem = "tls/server_key.pem"\nmtls_client_ca_pem = "tls/ca.pem"\nmtls_client_dns_name = "cks.kms.us-east-1.amazonaws.com"',
    )
    text = text.replace("max_plaintext_in_base64 = 8192", "max_plaintext_in_base64 = 100000").replace(
        "session_eager_close = false", "session_eager_close = true"
    )
    text = text.replace("[hsm_capabilities]", '[hsm_capabilities]\nciphertext_metadata_b64 = "a2V5X3ZlcnNpb249MQ=="')
    code, home = _import(tmp_path, text)
    assert code == 0
    err = capsys.readouterr().err
    assert "session_eager_close" in err
    cfg = configmod.load(home)
    assert cfg.server.tls_cert == (tmp_path / "tls" / "server_cert.pem").resolve()
    assert cfg.server.tls_key == (tmp_path / "tls" / "server_key.pem").resolve()
    assert cfg.tls.client_ca == (tmp_path / "tls" / "ca.pem").resolve()  # mutual TLS carried over
    assert cfg.tls.client_names == frozenset({"cks.kms.us-east-1.amazonaws.com"})
    assert (cfg.limits.max_plaintext_bytes, cfg.limits.max_aad_bytes) == (75000, 8192)
    assert cfg.pkcs11 is not None and cfg.pkcs11.ciphertext_metadata == b"key_version=1"
    assert cfg.stores[0].key_ids is None
    assert "1234" not in (home / "config.toml").read_text()


@pytest.mark.parametrize(
    "old,new,field",
    [
        ('sigv4_access_key_id = "BETWEEN2TENAND3TENCHARACTERS"', 'sigv4_access_key_id = "lower"', "external_key_stores[0].sigv4_access_key_id"),
        ('uri_path_prefix = "/aws/one"', 'uri_path_prefix = "/bad prefix!"', "external_key_stores[0].uri_path_prefix"),
        ('user_pin = "1234"', "", "pkcs11.user_pin"),
        ('region = "us-east-1"', 'region = "Mars"', "server.region"),
        ('xks_key_id_set = ["legacy", "missing"]', 'xks_key_id_set = ["a/b"]', "external_key_stores[0].xks_key_id_set"),
        ("PKCS11_HSM_MODULE = ", 'PKCS11_HSM_MODULE = "/nowhere.so"\nignored = ', "pkcs11.PKCS11_HSM_MODULE"),
        ("[limits]", "ciphertext_metadata_b64 = \"###\"\n[limits]", "ciphertext_metadata_b64"),
        ("[server]", "this is not toml", "not valid TOML"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, field: str) -> None:
    text = aws_settings(need_softhsm_module(), "1234", [STORE_ONE])
    assert old in text
    code, home = _import(tmp_path, text.replace(old, new, 1))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and field in err, err
    assert "1234" not in err and "Traceback" not in err
    assert not home.exists()


def test_an_existing_home_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = aws_settings(need_softhsm_module(), "1234", [STORE_ONE])
    assert _import(tmp_path, text)[0] == 0
    before = (tmp_path / "home" / "master.key").read_text()
    code, home = _import(tmp_path, text)
    assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert (home / "master.key").read_text() == before
