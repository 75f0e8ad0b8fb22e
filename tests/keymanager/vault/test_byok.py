"""Bring your own key material: the documented openssl commands, run verbatim, then real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from keymanager.base import KeyRefused as VaultError  # any refusal: VaultError, NoSuchKey, BadRequest
from keymanager.vault.db import VaultDB, parse_usage
from tests.conftest import REGION, Home, metadata, need, unb64
from tests.support.lifecycle import ROOT, cli, cli_json, serving
from xks_proxy import config as configmod
from xks_proxy.cli.home import init_home
from keymanager.vault.lifecycle import VaultLifecycle

pytestmark = pytest.mark.vault_only  # lifecycle lives in the vault; PKCS#11 keys live in the HSM

DOC = ROOT / "README.md"


def doc_block(name: str) -> str:
    """The bash block the README shows under `<!-- tested: NAME -->`: the test runs exactly that."""
    match = re.search(rf"<!-- tested: {re.escape(name)} -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"README.md has no tested block {name}"
    return match.group(1)


def _aad(aad: bytes | None, meta: bytes) -> bytes:
    head = b"\x00\x00" if aad is None else struct.pack(">H", len(aad)) + hashlib.sha256(aad).digest()
    return head + bytes([len(meta)]) + meta


def get_params(home: Home, key_id: str, out: Path, algorithm: str, spec: str = "RSA_2048") -> dict:
    return cli_json(
        "keys", "get-import-params", key_id, "--wrapping-algorithm", algorithm, "--wrapping-key-spec", spec,
        "--out-dir", str(out), home=home.path,
    )  # fmt: skip


def import_material(home: Home, key_id: str, out: Path, material_file: str = "EncryptedKeyMaterial.bin") -> subprocess.CompletedProcess[str]:
    return cli(
        "keys", "import", key_id, "--import-token", str(out / "ImportToken"),
        "--encrypted-key-material", str(out / material_file), home=home.path,
    )  # fmt: skip


def wrap_oaep256(out: Path, material: bytes, name: str = "EncryptedKeyMaterial.bin") -> None:
    """Python-side wrapping (the openssl path has its own test): RSA-OAEP-SHA-256."""
    public = serialization.load_der_public_key((out / "WrappingPublicKey.der").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    (out / name).write_bytes(public.encrypt(material, oaep))


@pytest.mark.parametrize(
    ("algorithm", "spec"),
    [("RSAES_OAEP_SHA_256", "RSA_2048"), ("RSAES_OAEP_SHA_1", "RSA_3072"), ("RSA_AES_KEY_WRAP_SHA_256", "RSA_4096")],
)
async def test_import_wrapped_with_openssl(home: Home, tmp_path: Path, algorithm: str, spec: str) -> None:
    openssl = need("openssl")
    made = cli_json("keys", "create", "ext", "--no-material", home=home.path)
    assert made["keyStatus"] == "PENDING_IMPORT"
    out = tmp_path / "params"
    summary = get_params(home, "ext", out, algorithm, spec)
    assert summary["wrappingAlgorithm"] == algorithm and "importToken" not in summary
    der = serialization.load_der_public_key((out / "WrappingPublicKey.der").read_bytes())
    pem = serialization.load_pem_public_key((out / "WrappingPublicKey.pem").read_bytes())
    assert isinstance(der, rsa.RSAPublicKey) and der.key_size == int(spec[4:]) and der.public_numbers() == pem.public_numbers()
    token = (out / "ImportToken").read_text().strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["store"], jwt.get_unverified_header(token)["alg"]) == ("ext", home.prefix, "ES256")
    assert abs(claims["exp"] - claims["iat"] - 86400) <= 1

    script = doc_block("make-material") + doc_block(f"wrap-{algorithm}")
    env = dict(os.environ, PATH=f"{Path(openssl).parent}:{os.environ.get('PATH', '')}")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=out, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    material = (out / "PlaintextKeyMaterial.bin").read_bytes()
    assert len(material) == 32

    done = import_material(home, "ext", out)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert (imported["keyStatus"], imported["import"]) == ("ENABLED", "stored")

    async with serving(home) as live:
        status, meta = await live.client.call("metadata", "ext", requestMetadata=metadata("CreateKey"))
        assert meta["keyStatus"] == "ENABLED"
        status, enc = await live.client.encrypt("ext", b"under my own key", aad=b"ctx")
        assert status == 200, enc
        # Decrypt outside the proxy with the customer's escrowed material: it is the key in use.
        iv, ct, tag, cmeta = (unb64(enc[k]) for k in ("initializationVector", "ciphertext", "authenticationTag", "ciphertextMetadata"))
        assert AESGCM(material).decrypt(iv, ct + tag, _aad(b"ctx", cmeta)) == b"under my own key"

    again = import_material(home, "ext", out)  # same token, same material: allowed, changes nothing
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["import"].startswith("unchanged")


def _tamper(token: str, **changes: object) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join((header, forged, signature))


def _refused(done: subprocess.CompletedProcess[str], reason: str) -> None:
    assert done.returncode == 1, done.stdout
    assert reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_import_refusals(home: Home, tmp_path: Path) -> None:
    """Each refusal, with its message: the first few through the real CLI, the rest in-process."""
    cli_json("keys", "create", "ext", "--no-material", home=home.path)
    cli_json("keys", "create", "ext2", "--no-material", home=home.path)
    material = os.urandom(32)
    a = tmp_path / "a"
    get_params(home, "ext", a, "RSAES_OAEP_SHA_256")
    token = (a / "ImportToken").read_text()

    wrap_oaep256(a, os.urandom(16))
    _refused(import_material(home, "ext", a), "must be 32 bytes")
    wrap_oaep256(a, material)
    (a / "ImportToken").write_text(_tamper(token, sub="ext2"))
    _refused(import_material(home, "ext2", a), "altered")
    (a / "ImportToken").write_text(token)

    cfg = home.config  # parameters issued two days ago (the vault's clock, moved in-process)
    past = VaultDB(cfg.vault.path, cfg.master_key, clock=lambda: time.time() - 2 * 86400)
    old = past.import_params(home.prefix, "ext", "RSAES_OAEP_SHA_256", "RSA_2048")
    past.close()
    c = tmp_path / "c"
    c.mkdir()
    (c / "ImportToken").write_text(old.token)
    (c / "WrappingPublicKey.der").write_bytes(old.public_der)
    wrap_oaep256(c, material)
    _refused(import_material(home, "ext", c), "expired")

    other = tmp_path / "other-home"  # a second vault issues a token for a key of the same name
    init_home(other, home.prefix, REGION, 0)
    other_cfg = configmod.load(other)
    other_db = VaultDB(other_cfg.vault.path, other_cfg.master_key)
    other_db.create_key(home.prefix, "ext", parse_usage("ENCRYPT,DECRYPT"), material=False)
    foreign = other_db.import_params(home.prefix, "ext", "RSAES_OAEP_SHA_256", "RSA_2048")
    other_db.close()
    f = tmp_path / "f"
    f.mkdir()
    (f / "ImportToken").write_text(foreign.token)
    (f / "WrappingPublicKey.der").write_bytes(foreign.public_der)
    wrap_oaep256(f, material)
    _refused(import_material(home, "ext", f), "issued by another vault")

    db = VaultDB(cfg.vault.path, cfg.master_key)
    keys = VaultLifecycle(db, home.prefix, "test", "test")
    try:
        b = tmp_path / "b"
        get_params(home, "ext2", b, "RSAES_OAEP_SHA_256")
        wrap_oaep256(b, material)
        b_token = (b / "ImportToken").read_text()
        wrapped = {p.name: (p / "EncryptedKeyMaterial.bin").read_bytes() for p in (a, b)}
        for key_id, use_token, blob, reason in (
            ("ext", b_token, wrapped["b"], "is for key ext2"),
            ("ext", token, wrapped["b"], "does not open"),  # wrapped to b's public key, token of a
            ("ext", "not a token", wrapped["a"], "not a token"),
            ("ext", token, b"\x00" * 255, "does not open"),
        ):
            with pytest.raises(VaultError, match=reason):
                keys.import_material(key_id, use_token, blob)
        assert keys.show("ext")["keyStatus"] == "PENDING_IMPORT"  # nothing half-done

        assert keys.import_material("ext", token, wrapped["a"])["import"] == "stored"
        d = tmp_path / "d"
        get_params(home, "ext", d, "RSAES_OAEP_SHA_256")
        wrap_oaep256(d, os.urandom(32))
        _refused(import_material(home, "ext", d), "already has different key material")
        wrap_oaep256(d, material)
        d_token = (d / "ImportToken").read_text()
        assert keys.import_material("ext", d_token, (d / "EncryptedKeyMaterial.bin").read_bytes())["import"].startswith("unchanged")

        with pytest.raises(VaultError, match="vault-generated"):
            keys.import_params("foo", "RSAES_OAEP_SHA_256", "RSA_2048")
        with pytest.raises(VaultError, match="wrapping algorithm must be one of"):
            keys.import_params("ext", "RSA_PKCS1", "RSA_2048")
        with pytest.raises(VaultError, match="wrapping key spec must be one of"):
            keys.import_params("ext", "RSAES_OAEP_SHA_256", "RSA_1024")
        keys.schedule_deletion("ext2", 7)
        with pytest.raises(VaultError, match="pending deletion"):
            keys.import_material("ext2", b_token, wrapped["b"])
        with pytest.raises(VaultError, match="pending deletion"):
            keys.import_params("ext2", "RSAES_OAEP_SHA_256", "RSA_2048")
    finally:
        db.close()
    bad = cli("keys", "get-import-params", "ext", "--wrapping-algorithm", "RSA_PKCS1", "--wrapping-key-spec", "RSA_2048", home=home.path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_aes_key_wrap_layout(home: Home) -> None:
    """RSA_AES_KEY_WRAP_SHA_256 built in Python too (OAEP-SHA-256 of an AES key || RFC 5649 wrap)."""
    cfg = home.config
    db = VaultDB(cfg.vault.path, cfg.master_key)
    keys = VaultLifecycle(db, home.prefix, "test", "test")
    try:
        keys.create("ext", "ENCRYPT,DECRYPT", no_material=True)
        params = keys.import_params("ext", "RSA_AES_KEY_WRAP_SHA_256", "RSA_2048")
        public = serialization.load_der_public_key(base64.b64decode(params["publicKey"]))
        assert isinstance(public, rsa.RSAPublicKey)
        kek, material = os.urandom(32), os.urandom(32)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        token = params["importToken"]
        with pytest.raises(VaultError, match="followed by the AES-wrapped key material"):
            keys.import_material("ext", token, public.encrypt(kek, oaep))
        with pytest.raises(VaultError, match="does not open"):
            keys.import_material("ext", token, public.encrypt(os.urandom(32), oaep) + aes_key_wrap_with_padding(kek, material))
        done = keys.import_material("ext", token, public.encrypt(kek, oaep) + aes_key_wrap_with_padding(kek, material))
        assert done["keyStatus"] == "ENABLED"
        _, loaded = db.load()
        probe = loaded[(home.prefix, "ext")].versions[1].encrypt(b"probe", None, b"")
        assert AESGCM(material).decrypt(probe[0], probe[1] + probe[2], _aad(None, b"")) == b"probe"
    finally:
        db.close()


def test_lifecycle_doc_shows_the_same_tested_commands() -> None:
    """docs/key-lifecycle.md repeats the README's wrapping commands: they must stay the same."""
    doc = (ROOT / "docs" / "key-lifecycle.md").read_text()
    for name in ("make-material", "wrap-RSAES_OAEP_SHA_256", "wrap-RSAES_OAEP_SHA_1", "wrap-RSA_AES_KEY_WRAP_SHA_256"):
        match = re.search(rf"<!-- tested: {re.escape(name)} -->\s*```bash\n(.*?)```", doc, re.S)
        assert match and match.group(1) == doc_block(name), name
