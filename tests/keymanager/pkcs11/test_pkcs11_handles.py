"""Cached key handles, and where the backend calls the module (pkcs11.call_mode).

Each pooled session caches the key object (handle) it found for a label, so a request makes no
C_FindObjects. A cached handle must never outlive its key: a key destroyed and made again under
the same label, or a token reinitialised under the same label and PIN, is served with the new
key at the next request, never with the old handle (nor the old key, if a handle were reused).
The proofs are cryptographic: the new ciphertext opens under the new material, computed
independently with `cryptography`, and the old ciphertext no longer decrypts.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymanager.pkcs11.config import Pkcs11Config
from tests.conftest import Home, SoftHsm, pkcs11_home_with_foo, set_pkcs11, unb64
from tests.keymanager.pkcs11.test_pkcs11 import assert_error, independent_aad, poll, serving, until_served
from xks_proxy import config as configmod


def opens_under(material: bytes, enc: dict, plaintext: bytes, aad: bytes | None) -> bool:
    iv, meta = unb64(enc["initializationVector"]), unb64(enc["ciphertextMetadata"])
    sealed = unb64(enc["ciphertext"]) + unb64(enc["authenticationTag"])
    try:
        return AESGCM(material).decrypt(iv, sealed, independent_aad(aad, meta)) == plaintext
    except Exception:
        return False


@pytest.fixture
def foo_home(tmp_path: Path, softhsm: SoftHsm) -> Home:
    return pkcs11_home_with_foo(tmp_path / "home", softhsm)


@pytest.mark.parametrize("call_mode", ["event-loop", "threads"])
async def test_recreated_key_is_served_not_the_cached_handle(foo_home: Home, softhsm: SoftHsm, call_mode: str) -> None:
    """One session (so the request after the change meets the handle cached before it) and no
    catalog refresh in the test's time: only the stale-handle path can find the new key."""
    from pkcs11 import Attribute

    set_pkcs11(foo_home.path, session_pool_size=1, refresh_seconds=60.0, call_mode=call_mode)
    old = foo_home.materials["foo"]
    async with serving(foo_home) as client:
        for _ in range(3):  # the handle is cached now
            status, before = await client.encrypt("foo", b"before", aad=b"ctx")
            assert status == 200 and opens_under(old, before, b"before", b"ctx")

        new = os.urandom(32)
        with softhsm.session() as session:
            (foo,) = list(session.get_objects({Attribute.LABEL: "foo"}))
            foo.destroy()
        softhsm.import_key("foo", new)

        status, after = await client.encrypt("foo", b"after", aad=b"ctx")
        assert status == 200, after
        assert opens_under(new, after, b"after", b"ctx") and not opens_under(old, after, b"after", b"ctx")
        status, err = await client.decrypt("foo", before, aad=b"ctx")  # the old key is gone with its handle
        assert_error(status, err, 400, "InvalidCiphertextException")
        status, dec = await client.decrypt("foo", after, aad=b"ctx")
        assert status == 200 and unb64(dec["plaintext"]) == b"after"

        with softhsm.session() as session:  # destroyed, not recreated: 404 at the next request
            (foo,) = list(session.get_objects({Attribute.LABEL: "foo"}))
            foo.destroy()
        status, err = await client.encrypt("foo", b"x")
        assert_error(status, err, 404, "KeyNotFoundException")


_MAKE_TOKEN = textwrap.dedent(
    """
    import sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    module, label, pin, material = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
    token = pkcs11.lib(module).get_token(token_label=label)
    with token.open(rw=True, user_pin=pin) as session:
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
            Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.LABEL: "foo", Attribute.VALUE: material, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
        })
    """
)


@pytest.mark.parametrize("call_mode", ["event-loop", "threads"])
async def test_reinitialised_token_drops_every_cached_handle(
    foo_home: Home, softhsm: SoftHsm, tmp_path: Path, call_mode: str
) -> None:
    """The token is replaced by a freshly initialised one with the same label, PIN and key label
    (other material). The proxy loses the token, reconnects to the new one, and serves its key."""
    set_pkcs11(foo_home.path, session_pool_size=2, call_mode=call_mode)
    # The new token is made in another process, on its own token directory, while the proxy serves.
    fresh = tmp_path / "fresh-tokens"
    fresh.mkdir()
    conf = tmp_path / "fresh.conf"
    conf.write_text(f"directories.tokendir = {fresh}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", softhsm.label, "--so-pin", softhsm.so_pin, "--pin", softhsm.pin],
        check=True, capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    new = os.urandom(32)
    subprocess.run(
        [sys.executable, "-c", _MAKE_TOKEN, softhsm.module, softhsm.label, softhsm.pin, new.hex()],
        check=True, capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    old = foo_home.materials["foo"]
    before_threads = set(threading.enumerate())
    async with serving(foo_home) as client:
        for _ in range(4):  # both sessions have the old token's handle cached
            status, before = await client.encrypt("foo", b"before")
            assert status == 200 and opens_under(old, before, b"before", None)

        softhsm.tokens.rename(tmp_path / "old-tokens")
        status, err = await client.encrypt("foo", b"x")
        assert_error(status, err, 500, "InternalException")
        fresh.rename(softhsm.tokens)

        await until_served(lambda: client.encrypt("foo", b"x"))
        for _ in range(4):  # every session: none kept a handle (or key) of the old token
            status, after = await client.encrypt("foo", b"after")
            assert status == 200 and opens_under(new, after, b"after", None)
        status, err = await client.decrypt("foo", before)
        assert_error(status, err, 400, "InvalidCiphertextException")
        # Where the module was entered from: "event-loop" starts no thread, not even for the
        # login, scans and the reconnect (one thread enters the module); "threads" starts its own.
        started = [t.name for t in set(threading.enumerate()) - before_threads if t.name.startswith("xks-pkcs11")]
        assert bool(started) == (call_mode == "threads"), started


def test_call_mode_auto_is_the_event_loop_for_softhsm_only(foo_home: Home, tmp_path: Path) -> None:
    cfg = configmod.load(foo_home.path).pkcs11
    assert cfg is not None and cfg.call_mode == "auto" and cfg.calls_on_event_loop  # SoftHSMv2
    link = tmp_path / "vendor-link.so"  # a path naming SoftHSM through a link is still SoftHSM
    link.symlink_to(cfg.module)
    assert Pkcs11Config(module=link, pin="x").calls_on_event_loop
    other = tmp_path / "libvendor-hsm.so"
    other.write_bytes(b"")
    assert not Pkcs11Config(module=other, pin="x").calls_on_event_loop
    assert not Pkcs11Config(module=link, pin="x", call_mode="threads").calls_on_event_loop
    assert Pkcs11Config(module=other, pin="x", call_mode="event-loop").calls_on_event_loop
    set_pkcs11(foo_home.path, call_mode="sometimes")
    with pytest.raises(configmod.ConfigError, match=r"pkcs11\.call_mode: must be one of auto, threads, event-loop"):
        configmod.load(foo_home.path)


async def test_a_large_catalog_is_rescanned_less_often_and_a_slow_event_loop_scan_is_said_once(
    foo_home: Home, softhsm: SoftHsm, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanning a token costs SoftHSMv2 about 0.2 ms per key (docs/pkcs11.md), and in event-loop
    mode the worker serves nothing meanwhile. With 100 keys and refresh_seconds 0.1 (its least) the old
    schedule rescanned every 0.1 s; now each pause is at least 50 times the scan before it,
    whatever this machine's speed, and a scan over the (here lowered) threshold is said once."""
    from pkcs11 import Attribute, KeyType

    from keymanager.pkcs11 import manager as manager_module

    with softhsm.session() as session:
        for i in range(100):
            session.generate_key(KeyType.AES, 256, label=f"bulk{i:03d}", store=True,
                                 template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})  # fmt: skip
    scans: list[tuple[float, float]] = []  # (start, end) of each rescan, the real one, timed
    real_scan = manager_module._scan_checked

    def timed(session: object) -> object:
        started = time.monotonic()
        try:
            return real_scan(session)
        finally:
            scans.append((started, time.monotonic()))

    monkeypatch.setattr(manager_module, "_scan_checked", timed)
    monkeypatch.setattr(manager_module, "SLOW_INLINE_SCAN_SECONDS", 0.001)  # 100 keys take ~35 ms here
    set_pkcs11(foo_home.path, refresh_seconds=0.1, call_mode="event-loop")
    caplog.set_level(logging.WARNING, logger="xks_proxy.pkcs11")
    async with serving(foo_home) as client:
        status, body = await client.encrypt("foo", b"served while the catalog is large")
        assert status == 200, body
        async def three_rescans() -> bool:
            return len(scans) >= 3

        await poll(three_rescans, deadline=30.0)
        status, body = await client.encrypt("foo", b"and after")
        assert status == 200, body
    for (start, end), (next_start, _) in zip(scans, scans[1:]):
        assert next_start - end >= 0.9 * manager_module.SCAN_SHARE_INVERSE * (end - start), scans
    said = [r.getMessage() for r in caplog.records if "key catalog scan" in r.getMessage()]
    assert len(said) == 1, said
    keys = re.search(r"\((\d+) keys\) took \d+ ms on the event loop", said[0])
    assert keys is not None and int(keys[1]) >= 101 and 'call_mode = "threads"' in said[0], said[0]
