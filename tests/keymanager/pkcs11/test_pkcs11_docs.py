"""docs/pkcs11.md's sample configurations: each read by the proxy's own loader; the SoftHSMv2 one served.

Each sample replaces `[keymanager]` and `[vault]` in the config.toml of a home made by `init`,
with the PIN in `pkcs11.pin`, as the document says. A vendor sample names a library this
machine does not have, so the SoftHSM library stands in for its `module` and every other
field is the document's. The SoftHSMv2 sample, with the test token's label filled in (its
FILL IN), serves a signed Encrypt and Decrypt of key `foo`, created with `xks-proxy keys create`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REGION, Client, Home, SoftHsm, b64, metadata, need_softhsm_module, unb64
from tests.docs.blocks import doc_blocks
from tests.support import ROOT
from xks_proxy.cli.home import init_home, write_config

DOC = ROOT / "docs" / "pkcs11.md"
SAMPLES = doc_blocks(DOC, "pkcs11-sample-", "toml")
VENDORS = {"softhsm", "luna", "nshield", "cloudhsm", "utimaco"}


def _home_from_sample(path: Path, sample: dict[str, Any], pin: str) -> Home:
    """A home made by `init`, its [keymanager] and [vault] replaced by `sample`, the PIN in pkcs11.pin."""
    akid, secret = init_home(path, "test", REGION, 0)
    raw = tomllib.loads((path / "config.toml").read_text())
    del raw["keymanager"], raw["vault"]
    write_config(path, {**raw, **sample})
    pin_file = path / "pkcs11.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    return Home(path=path, prefix="test", access_key_id=akid, secret=secret, backend="pkcs11")


def test_the_document_has_a_sample_per_vendor_family_it_names() -> None:
    assert set(SAMPLES) == {f"pkcs11-sample-{vendor}" for vendor in VENDORS}
    for name, text in SAMPLES.items():
        sample = tomllib.loads(text)
        assert set(sample) == {"keymanager", "pkcs11"} and sample["keymanager"] == {"backend": "pkcs11"}, name
        assert Path(sample["pkcs11"]["module"]).is_absolute() and sample["pkcs11"]["pin_file"] == "pkcs11.pin", name


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_each_sample_is_read_by_the_real_loader(tmp_path: Path, vendor: str) -> None:
    sample = tomllib.loads(SAMPLES[f"pkcs11-sample-{vendor}"])
    sample["pkcs11"]["module"] = need_softhsm_module()  # the vendor's library is not on this machine
    pin = "FILL-IN:a-pin"
    settings = _home_from_sample(tmp_path / "home", sample, pin).config.backend_settings
    assert (settings.token_label, settings.slot, settings.iv_mode, settings.pin) == (
        sample["pkcs11"].get("token_label"), None, sample["pkcs11"]["iv_mode"], pin
    )
    assert settings.session_pool_size == sample["pkcs11"]["session_pool_size"]


@pytest.fixture
def home(tmp_path: Path, softhsm: SoftHsm) -> Home:
    """The SoftHSMv2 sample's home on this test's token, key foo made by the CLI (conftest's server and client serve it)."""
    sample = tomllib.loads(SAMPLES["pkcs11-sample-softhsm"])
    assert sample["pkcs11"]["module"] in (softhsm.module, "/usr/lib/softhsm/libsofthsm2.so")
    sample["pkcs11"].update(module=softhsm.module, token_label=softhsm.label)  # its FILL IN values, for this token
    home = _home_from_sample(tmp_path / "home", sample, softhsm.pin)
    created = subprocess.run(
        [sys.executable, "-m", "xks_proxy.cli", "keys", "create", "foo", "--home", str(home.path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert softhsm.pin not in created.stdout + created.stderr
    return home


async def test_the_softhsm_sample_serves_encrypt_and_decrypt(client: Client) -> None:
    status, sealed = await client.call("encrypt", "foo", requestMetadata=metadata(), plaintext=b64(b"hello"), encryptionAlgorithm="AES_GCM")
    assert status == 200, sealed
    assert unb64(sealed["ciphertextMetadata"]) == b"\x02", "the sample's ciphertext_metadata_b64"
    status, opened = await client.call("decrypt", "foo", requestMetadata=metadata("Decrypt"), encryptionAlgorithm="AES_GCM", **sealed)
    assert (status, unb64(opened.get("plaintext", ""))) == (200, b"hello"), opened
