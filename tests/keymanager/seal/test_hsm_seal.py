"""The pkcs11 seal on a real SoftHSMv2 token: init, auto-unseal at start, forked workers, refusals.

Everything runs the real CLI in subprocesses (`init`, `serve --workers 2`) against a token made
for the test (the `softhsm` fixture: skipped without SoftHSM, a failure under XKS_TEST_STRICT=1).
The PIN is distinctive; no output, log or file of the home may contain it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from keymanager.crypto import Kek, MasterKey
from keymanager.seal.hsm import open_hsm_kek
from keymanager.seal.home import open_with
from keymanager.seal.record import FileRecord
from keymanager.vault.db import VaultDB, parse_usage
from tests.conftest import Client, Home, SoftHsm, metadata
from tests.support import ROOT
from tests.support.proxy import edit_config, scrape, value, wait_for_line
from xks_proxy import config as configmod

SEAL_KEY = "xks-proxy-seal"


def xks(hsm: SoftHsm, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, on the test's token; its output never holds the PIN."""
    env = dict(hsm.env(), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args], capture_output=True, text=True, env=env, timeout=60)
    assert hsm.pin not in result.stdout + result.stderr
    return result


def files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


@dataclass
class Sealed:
    home: Home
    pin_file: Path
    init_output: str


def init_sealed(tmp_path: Path, hsm: SoftHsm) -> Sealed:
    """`init --seal pkcs11` as an operator runs it (it writes `[seal] pin_file` for `serve`); key foo in the vault."""
    pin_file = tmp_path / "seal.pin"
    pin_file.write_text(hsm.pin + "\n")
    pin_file.chmod(0o600)
    path = tmp_path / "home"
    done = xks(
        hsm, "init", "--home", str(path), "--uri-prefix", "test", "--seal", "pkcs11",
        "--pkcs11-module", hsm.module, "--pkcs11-token", hsm.label, "--pin-file", str(pin_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    akid = re.search(r"access key id:\s+(\S+)", done.stdout)
    secret = re.search(r"secret access key:\s+(\S+)", done.stdout)
    assert akid and secret, done.stdout
    assert tomllib.loads((path / "config.toml").read_text())["seal"] == {"pin_file": str(pin_file.resolve())}
    edit_config(path, lambda raw: raw.update(metrics={"enabled": True, "port": 0}))
    home = Home(path=path, prefix="test", access_key_id=akid[1], secret=secret[1], hsm=hsm)
    home.create_key("foo")  # in this process: opens the seal through the HSM too
    return Sealed(home, pin_file, done.stdout + done.stderr)


@pytest.fixture
def sealed(tmp_path: Path, softhsm: SoftHsm) -> Sealed:
    return init_sealed(tmp_path, softhsm)


@asynccontextmanager
async def serving(sealed: Sealed, log: Path) -> AsyncIterator[tuple[Client, int]]:
    """`serve --workers 2` in a subprocess; a client opening a new connection per request (both workers answer)."""
    hsm = sealed.home.hsm
    assert hsm is not None
    env = dict(hsm.env(), PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(sealed.home.path), "--http", "--port", "0", "--workers", "2"]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    try:
        port = int((await asyncio.to_thread(wait_for_line, log, r"serving http://127\.0\.0\.1:(\d+)"))[1])
        metrics_port = int((await asyncio.to_thread(wait_for_line, log, r"metrics on http://127\.0\.0\.1:(\d+)/"))[1])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            home = sealed.home
            yield Client(session, f"http://127.0.0.1:{port}", "/test/kms/xks/v1", home.access_key_id, home.secret), metrics_port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert hsm.pin not in log.read_text()


async def round_trips(client: Client, key_id: str, count: int = 12) -> None:
    for i in range(count):
        plaintext = f"round trip {i}".encode()
        status, enc = await client.encrypt(key_id, plaintext, aad=b"ctx")
        assert status == 200, enc
        status, dec = await client.decrypt(key_id, enc, aad=b"ctx")
        assert status == 200, dec
        assert base64.b64decode(dec["plaintext"]) == plaintext


async def both_workers_healthy(metrics_port: int) -> None:
    for _ in range(100):
        samples = await scrape(metrics_port)
        if [v for (name, _), v in samples.items() if name == "xks_keymanager_health"] == [2]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("both workers' key managers never reported healthy")


# --- init -------------------------------------------------------------------------------------------


def test_init_keeps_nothing_secret_and_the_key_stays_in_the_hsm(sealed: Sealed, softhsm: SoftHsm) -> None:
    home = sealed.home.path
    assert not (home / "master.key").exists()
    record = FileRecord(home).read()
    assert record is not None and record.kind == "pkcs11"
    assert record.params == {"module": softhsm.module, "token_label": softhsm.label, "key_label": SEAL_KEY}
    assert "seal:                 pkcs11" in sealed.init_output
    for name, data in files(home).items():
        assert softhsm.pin.encode() not in data, name

    with softhsm.session() as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: SEAL_KEY}))
        assert len(keys) == 1
        attrs = keys[0].get_attributes(
            [Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
             Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP,
             Attribute.UNWRAP]
        )  # fmt: skip
        assert attrs == {
            Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE_LEN: 32, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.ALWAYS_SENSITIVE: True,
            Attribute.NEVER_EXTRACTABLE: True, Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        }  # fmt: skip
        with pytest.raises(p11.AttributeSensitive):
            keys[0][Attribute.VALUE]


def test_init_refuses_an_extractable_key_with_the_label(tmp_path: Path, softhsm: SoftHsm) -> None:
    with softhsm.session() as session:
        session.generate_key(KeyType.AES, 256, label=SEAL_KEY, store=True, template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin)
    pin_file.chmod(0o600)
    done = xks(
        softhsm, "init", "--home", str(tmp_path / "home"), "--seal", "pkcs11", "--pkcs11-module", softhsm.module,
        "--pkcs11-token", softhsm.label, "--pin-file", str(pin_file),
    )  # fmt: skip
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is extractable, not sensitive" in done.stderr and "non-extractable AES-256" in done.stderr
    assert not (tmp_path / "home").exists()


def test_rekey_a_file_sealed_home_to_pkcs11_with_the_pin_from_the_environment(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    assert xks(softhsm, "init", "--home", str(home), "--seal", "file").returncode == 0
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin)
    pin_file.chmod(0o600)
    done = xks(
        softhsm, "vault", "rekey", "--home", str(home), "--seal", "pkcs11", "--pkcs11-module", softhsm.module,
        "--pkcs11-token", softhsm.label, "--pin-file", str(pin_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (home / "master.key").exists()
    edit_config(home, lambda raw: raw.update(seal={"pin_env": "XKS_TEST_SEAL_PIN"}))
    done = xks(softhsm, "keys", "list", "--home", str(home))
    assert done.returncode == 2 and done.stderr.strip().endswith("seal.pin_env: the environment variable XKS_TEST_SEAL_PIN is not set")
    monkeypatch.setenv("XKS_TEST_SEAL_PIN", softhsm.pin)
    done = xks(softhsm, "keys", "list", "--home", str(home))
    assert done.returncode == 0, done.stderr


# --- serving ----------------------------------------------------------------------------------------


def test_opening_the_seal_never_loads_the_module_in_the_proxy_process(sealed: Sealed, softhsm: SoftHsm) -> None:
    """What `serve`'s supervisor does before it forks: load the config (which opens the seal).
    The HSM work ran in child processes, so nothing of the PKCS#11 module is inherited by workers."""
    code = (
        "import sys; from pathlib import Path; from xks_proxy import config; "
        "c = config.load(Path(sys.argv[1])); assert c.keyring is not None and c.seal == 'pkcs11'; "
        "print('loaded' if any('softhsm' in line for line in open('/proc/self/maps')) else 'not loaded')"
    )
    env = dict(softhsm.env(), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, str(sealed.home.path)], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "not loaded", done.stderr


async def test_serve_auto_unseals_and_workers_follow_a_rotation(sealed: Sealed, tmp_path: Path) -> None:
    """Vault backend, two workers: each serves under the unsealed master key; after a master-key
    rotation by another process (a record without a link: the only way to the new key is the
    HSM) every worker unwraps the new key through the HSM, long after the fork."""
    home, hsm = sealed.home.path, sealed.home.hsm
    assert hsm is not None
    log = tmp_path / "serve.log"
    async with serving(sealed, log) as (client, metrics_port):
        await round_trips(client, "foo")
        await both_workers_healthy(metrics_port)

        # A rotation as another process does it: the new key wrapped by the HSM, then a key sealed under it.
        record = FileRecord(home).read()
        assert record is not None
        kek = open_hsm_kek(record.params, hsm.pin)
        new = MasterKey.generate()
        FileRecord(home).write(record.with_keys(new.key_id, {**record.keys, new.key_id: kek.wrap(new)}))
        rotated = FileRecord(home).read()
        assert rotated is not None
        keyring = open_with(home, None, rotated, kek)
        assert keyring.current.key_id == new.key_id
        db = VaultDB(home / "vault.db", keyring)
        db.create_key("test", "bar", parse_usage("ENCRYPT,DECRYPT"))
        db.close()
        answered = 0
        for _ in range(200):  # every worker reloads the vault (refresh_seconds 0.5) and must open bar
            status, _ = await client.encrypt("bar", b"x")
            answered = answered + 1 if status == 200 else 0
            if answered == 10:
                break
            await asyncio.sleep(0.05)
        assert answered == 10, log.read_text()
        await round_trips(client, "bar")

        # The real command resumes that rotation (re-seals everything, retires the old key), then rotates again.
        for resumed in ("true", "false"):
            done = xks(hsm, "vault", "rotate-master-key", "--home", str(home))
            assert done.returncode == 0 and f'"resumed": {resumed}' in done.stdout, done.stderr
            await round_trips(client, "foo", 4)
            await round_trips(client, "bar", 4)
        final = FileRecord(home).read()
        assert final is not None and final.kind == "pkcs11" and list(final.keys) == [final.current] != [new.key_id]
    assert "Traceback" not in log.read_text()


async def test_pkcs11_backend_home_that_is_also_pkcs11_sealed(sealed: Sealed, softhsm: SoftHsm, tmp_path: Path) -> None:
    """Keys and seal on one SoftHSM token; the workers log in for the backend themselves after the
    supervisor unsealed: neither disturbs the other."""
    softhsm.import_key("foo", os.urandom(32))
    softhsm.import_key("xks-proxy-health", os.urandom(32))

    def to_pkcs11(raw: dict[str, Any]) -> None:
        raw["keymanager"] = {"backend": "pkcs11"}
        raw["pkcs11"] = {
            "module": softhsm.module, "token_label": softhsm.label, "pin_file": str(sealed.pin_file),
            "operation_timeout_seconds": 10.0, "session_wait_seconds": 10.0,
        }  # fmt: skip
        raw["stores"][0]["key_ids"] = ["foo"]  # the seal's key is on this token too: no store may address it

    edit_config(sealed.home.path, to_pkcs11)
    async with serving(sealed, tmp_path / "serve.log") as (client, metrics_port):
        await round_trips(client, "foo")
        await both_workers_healthy(metrics_port)
        status, body = await client.call("metadata", SEAL_KEY, requestMetadata=metadata("CreateKey"))
        assert status == 404, body
        samples = await scrape(metrics_port)
        assert (value(samples, "xks_requests_total", store="test", operation="encrypt", outcome="OK") or 0) >= 12


# --- refusals ---------------------------------------------------------------------------------------


def _delete_seal_key(sealed: Sealed, hsm: SoftHsm) -> str:
    from keymanager.pkcs11.token import Library

    with hsm.session() as session:
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: SEAL_KEY}):
            obj.destroy()
    Library.finalize_all()
    return f"no key labelled '{SEAL_KEY}' on token '{hsm.label}'"


def _wrong_pin(sealed: Sealed, hsm: SoftHsm) -> str:
    sealed.pin_file.write_text("wrong-pin-0000\n")
    return "CKR_PIN_INCORRECT"


def _token_removed(sealed: Sealed, hsm: SoftHsm) -> str:
    from keymanager.pkcs11.token import Library

    Library.finalize_all()
    shutil.rmtree(hsm.tokens)
    hsm.tokens.mkdir()
    return f"no token labelled '{hsm.label}'"


@pytest.mark.parametrize("fault", [_delete_seal_key, _wrong_pin, _token_removed], ids=["key deleted", "wrong PIN", "token removed"])
def test_serve_refuses_in_one_line_and_changes_nothing(sealed: Sealed, softhsm: SoftHsm, fault: Any) -> None:
    expected = fault(sealed, softhsm)
    before = files(sealed.home.path)
    done = xks(softhsm, "serve", "--home", str(sealed.home.path), "--http", "--port", "0", "--workers", "2")
    assert done.returncode == 2  # a configuration error: the seal did not open
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr
    assert "wrong-pin-0000" not in done.stdout + done.stderr
    assert files(sealed.home.path) == before


def test_a_copy_of_the_home_without_the_token_opens_nothing(sealed: Sealed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thief has every file of the home and even the PIN, and makes a token and key of the same labels."""
    from keymanager.pkcs11.token import Library

    hsm = sealed.home.hsm
    assert hsm is not None
    copy = tmp_path / "stolen"
    shutil.copytree(sealed.home.path, copy)
    record = FileRecord(copy).read()
    assert record is not None
    wrapped = record.keys[record.current]
    tried = 0
    for name, data in files(copy).items():
        for candidate in [data[i : i + 32] for i in range(0, max(1, len(data) - 31))]:
            if len(candidate) == 32:
                tried += 1
                with pytest.raises(ValueError):
                    Kek(candidate).unwrap(wrapped, record.current)
    assert tried > 10_000

    # Another SoftHSM with a token of the same label and PIN, and a key of the seal's label.
    Library.finalize_all()
    tokens = tmp_path / "thief-tokens"
    tokens.mkdir()
    conf = tmp_path / "thief.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    with pytest.raises(configmod.ConfigError, match=f"no token labelled '{hsm.label}'"):
        configmod.load(copy)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", hsm.label, "--so-pin", hsm.so_pin, "--pin", hsm.pin],
        check=True, capture_output=True, env=dict(os.environ), timeout=60,
    )  # fmt: skip
    Library.finalize_all()
    with pytest.raises(configmod.ConfigError, match=f"no key labelled '{SEAL_KEY}'"):
        configmod.load(copy)
    with hsm.session() as session:
        session.generate_key(KeyType.AES, 256, label=SEAL_KEY, store=True, template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True})
    Library.finalize_all()
    with pytest.raises(configmod.ConfigError, match="the seal does not open this home's master key"):
        configmod.load(copy)
