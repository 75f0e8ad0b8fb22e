"""The vault on PostgreSQL: SQLite's lifecycle rules unchanged, sealed at rest, race-free between proxies."""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import jwt
import psycopg
import pytest
from aiohttp import ClientSession
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keymanager.crypto import DataKey, MasterKey
from keymanager.base import KeyRefused as VaultError  # any refusal: VaultError, NoSuchKey, BadRequest
from keymanager.vault.db import INTERNAL_STORE, Grant, VaultDB, material_context, parse_usage
from keymanager.vault.postgres import PostgresStorage
from keymanager.vault.storage import StorageUnavailable
from tests.conftest import REGION, Client, Home, metadata, unb64
from tests.support.fleet import DSN_PASSWORD, dsn_with_password, pg_home, write_dsn_file
from tests.support.lifecycle import acli, cli, serving, wait_for
from tests.support.admin import Admin, admin_config, claims
from xks_proxy import config as configmod
from xks_proxy.cli.home import init_home
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401 (fixtures)

MASTER = MasterKey.from_text(MasterKey.generate_text())
BOTH = parse_usage("ENCRYPT,DECRYPT")


def pg_vault(dsn: str, clock: Callable[[], float] | None = None, master: MasterKey = MASTER) -> VaultDB:
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    return VaultDB(Path("unused"), master, storage=PostgresStorage(dsn), **kwargs)


def lifecycle_script(db: VaultDB, clock: list[float]) -> list[Any]:
    """Every lifecycle rule, refusals included; what each step answers."""
    out: list[Any] = [db.create_key("s", "a", BOTH).to_json(), db.create_key("s", "b", BOTH).to_json()]
    out.append(db.create_key("s", "ext", BOTH, material=False).to_json())
    steps: list[Callable[[], Any]] = [
        lambda: db.create_key("s", "a", BOTH),
        lambda: db.disable("s", "a"),
        lambda: db.enable("s", "a"),
        lambda: db.rotate("s", "a"),
        lambda: db.enable("s", "ext"),
        lambda: db.rotate("s", "ext"),
        lambda: db.schedule_deletion("s", "b", 7),
        lambda: db.enable("s", "b"),
        lambda: db.cancel_deletion("s", "b"),
        lambda: db.schedule_deletion("s", "b", 7),
        lambda: db.reserve("s", "a", 5, 8),
        lambda: db.reserve("s", "a", 5, 8),
        lambda: db.reserve("s", "a", 5, 8),
        lambda: db.release("s", "a", 3, 2),
        lambda: db.key("s", "nope"),
    ]
    for step in steps:
        try:
            result = step()
            out.append(result.to_json() if hasattr(result, "to_json") else result)
        except VaultError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    out.append([v.to_json() for v in db.versions("s", "a")])
    clock[0] += 8 * 86400
    out.append([info.key_id for info in db.sweep("test")])
    out.append([info.to_json() for info in db.keys("s")])
    _, loaded = db.load()
    out.append({name: (k.state, sorted(k.versions), k.current) for name, k in loaded.items() if name[0] != INTERNAL_STORE})
    return out


def test_same_lifecycle_answers_as_sqlite(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    _, _, dsn = pg_database
    clocks = {"sqlite": [1.7e9], "pg": [1.7e9]}
    sqlite = VaultDB(tmp_path / "v.db", MASTER, clock=lambda: clocks["sqlite"][0])
    pg = pg_vault(dsn, clock=lambda: clocks["pg"][0])
    try:
        expected = lifecycle_script(sqlite, clocks["sqlite"])
        assert lifecycle_script(pg, clocks["pg"]) == expected
        assert any(isinstance(step, Grant) and step.rotated for step in expected)  # the script rotated by count
        assert "VaultError" in str(expected)  # and refused what the rules refuse
    finally:
        sqlite.close()
        pg.close()


def test_material_is_sealed_at_rest(pg_database: tuple[Cluster, str, str]) -> None:
    """No column of any table holds a key's material in clear; each blob opens only as its own key version."""
    _, _, dsn = pg_database
    db = pg_vault(dsn)
    try:
        db.create_key("s", "k", BOTH)
        db.rotate("s", "k")
        _, keys = db.load()
    finally:
        db.close()
    with psycopg.connect(dsn) as conn:
        everything = b""
        for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall():
            for row in conn.execute(f'SELECT * FROM "{table}"').fetchall():
                everything += b"|".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
        sealed = dict(conn.execute("SELECT version, sealed FROM key_versions WHERE key_id = 'k'").fetchall())
    materials = [MASTER.unseal(sealed[v], material_context("s", "k", v)) for v in (1, 2)]
    for version, material in zip((1, 2), materials):
        assert len(material) == 32 and keys[("s", "k")].versions[version].same_material(DataKey(material))
        assert material not in everything and material.hex().encode() not in everything
    with pytest.raises(ValueError):
        MASTER.unseal(sealed[1], material_context("s", "k", 2))  # bound to its own version


def test_reservations_from_many_proxies_never_exceed_the_limit(pg_database: tuple[Cluster, str, str]) -> None:
    """Four vault connections (as four proxies) reserving at once: each version granted at most the limit, rotated once."""
    _, _, dsn = pg_database
    dbs = [pg_vault(dsn) for _ in range(4)]
    dbs[0].create_key("s", "k", BOTH)
    grants: list[Grant] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(dbs))

    def reserve_many(db: VaultDB) -> None:
        start.wait()
        try:
            for _ in range(25):
                grants.append(db.reserve("s", "k", 3, 10))
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=reserve_many, args=(db,)) for db in dbs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        granted: Counter[int] = Counter()
        for grant in grants:
            assert grant.version is not None
            granted[grant.version] += grant.count
        stored = {v.version: v.reserved for v in dbs[1].versions("s", "k")}
        assert stored == dict(granted)  # the database's count is exactly what was handed out
        assert max(granted.values()) <= 10, granted
        assert sum(granted.values()) == 4 * 25 * 3 - sum(3 - g.count for g in grants)
        assert all(n == 10 for v, n in granted.items() if v != max(granted))  # filled, never over, no early rotation
        assert sum(g.rotated for g in grants) == len(stored) - 1  # each new version made by exactly one proxy
    finally:
        for db in dbs:
            db.close()


def test_concurrent_sweeps_destroy_once(pg_database: tuple[Cluster, str, str]) -> None:
    _, _, dsn = pg_database
    now = [1.7e9]
    dbs = [pg_vault(dsn, clock=lambda: now[0]) for _ in range(3)]
    for i in range(3):
        dbs[0].create_key("s", f"k{i}", BOTH)
        dbs[0].schedule_deletion("s", f"k{i}", 7)
    now[0] += 7 * 86400 + 1
    destroyed: list[str] = []
    start = threading.Barrier(3)

    def sweep(db: VaultDB) -> None:
        start.wait()
        destroyed.extend(info.key_id for info in db.sweep("test"))

    threads = [threading.Thread(target=sweep, args=(db,)) for db in dbs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(destroyed) == ["k0", "k1", "k2"]
        assert dbs[2].keys("s") == []
    finally:
        for db in dbs:
            db.close()


def test_byok_import_on_postgres(pg_database: tuple[Cluster, str, str]) -> None:
    _, _, dsn = pg_database
    db, other = pg_vault(dsn), pg_vault(dsn)
    try:
        db.create_key("s", "byok", BOTH, material=False)
        params = other.import_params("s", "byok", "RSAES_OAEP_SHA_256", "RSA_2048")
        public = serialization.load_der_public_key(params.public_der)
        material = bytes(range(32))
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        wrapped = public.encrypt(material, oaep)  # type: ignore[union-attr]
        info, stored = db.import_material("s", "byok", params.token, wrapped)
        assert (info.state, info.origin, stored) == ("ENABLED", "EXTERNAL", True)
        assert other.import_material("s", "byok", params.token, wrapped)[1] is False  # same material: unchanged
        wrong = public.encrypt(bytes(32), oaep)  # type: ignore[union-attr]
        with pytest.raises(VaultError, match="different key material"):
            other.import_material("s", "byok", params.token, wrong)
        _, keys = other.load()
        assert keys[("s", "byok")].versions[1].same_material(DataKey(material))
    finally:
        db.close()
        other.close()


def test_schema_made_once_and_newer_refused(pg_database: tuple[Cluster, str, str]) -> None:
    _, _, dsn = pg_database
    opened: list[VaultDB] = []
    start = threading.Barrier(3)

    def open_one() -> None:
        start.wait()
        opened.append(pg_vault(dsn))

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 3
    _, keys = opened[0].load()
    assert [name for name in keys if name[0] == INTERNAL_STORE] == [(INTERNAL_STORE, "health")]  # one health key
    for db in opened:
        db.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    with pytest.raises(VaultError, match="schema 99, newer than this xks-proxy understands"):
        pg_vault(dsn)


def test_backup_image_and_copy_from_a_local_vault(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    """A local vault's keys move into PostgreSQL whole; a snapshot of PostgreSQL is a working SQLite vault."""
    _, _, dsn = pg_database
    local = VaultDB(tmp_path / "local.db", MASTER)
    local.create_key("s", "a", BOTH)
    local.rotate("s", "a")
    local.reserve("s", "a", 7, 100)
    local.create_key("s", "ext", BOTH, material=False)
    local.import_params("s", "ext", "RSAES_OAEP_SHA_256", "RSA_2048")
    pg = pg_vault(dsn)
    try:
        assert pg.copy_keys_from(local) == 2
        for store_keys in (lambda db: [k.to_json() for k in db.keys("s")], lambda db: [v.to_json() for v in db.versions("s", "a")]):
            assert store_keys(pg) == store_keys(local)
        with pytest.raises(VaultError, match="already holds keys"):
            pg.copy_keys_from(local)
        image = tmp_path / "image.db"
        image.write_bytes(pg.snapshot())
        restored = VaultDB(image, MASTER)
        _, from_image = restored.load()
        _, from_local = local.load()
        restored.close()
        for name in (("s", "a"), ("s", "ext")):
            assert sorted(from_image[name].versions) == sorted(from_local[name].versions)
            for version, material in from_local[name].versions.items():
                assert from_image[name].versions[version].same_material(material)
        other_master = VaultDB(tmp_path / "other.db", MasterKey.from_text(MasterKey.generate_text()))
        with pytest.raises(VaultError, match="master key does not open"):
            pg.copy_keys_from(other_master)
        other_master.close()
    finally:
        local.close()
        pg.close()


def test_unreachable_database_is_one_clear_line_without_the_password(pg_database: tuple[Cluster, str, str]) -> None:
    cluster, name, dsn = pg_database
    secret_dsn = dsn_with_password(dsn)
    db = pg_vault(secret_dsn)
    try:
        db.create_key("s", "k", BOTH)
        cluster.set_connectable(name, False)
        with pytest.raises(StorageUnavailable) as caught:
            db.disable("s", "k")
        message = str(caught.value)
        assert "\n" not in message and DSN_PASSWORD not in message
        assert f"postgresql://postgres@127.0.0.1:{cluster.port}/{name}" in message
        with pytest.raises(StorageUnavailable):
            db.key("s", "k")  # known down: fails at once until the retry interval passes
        cluster.set_connectable(name, True)
        deadline = threading.Event()
        for _ in range(50):
            try:
                assert db.disable("s", "k").state == "DISABLED"  # reconnects by itself
                break
            except StorageUnavailable:
                deadline.wait(0.1)
        else:
            raise AssertionError("the vault did not reconnect")
    finally:
        cluster.set_connectable(name, True)
        db.close()
    with pytest.raises(StorageUnavailable) as caught:
        PostgresStorage(secret_dsn.replace(f":{cluster.port}/", ":1/"))
    assert DSN_PASSWORD not in str(caught.value) and "unreachable" in str(caught.value)


async def test_database_down_spends_only_reserved_counts_then_refuses_retryably(
    tmp_path: Path, pg_database: tuple[Cluster, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Loaded keys keep working from memory; Encrypt stops (503, retryable) when the reserved block is spent."""
    cluster, name, dsn = pg_database
    home = pg_home(tmp_path / "home", dsn, count_block=20, refresh_seconds=0.1)
    home.create_key("foo")
    jwt_secret = "s" * 40
    (home.path / "admin-jwt.secret").write_text(jwt_secret)
    admin_config(home, hs256_secret_file="admin-jwt.secret")
    token = jwt.encode(claims(), jwt_secret, algorithm="HS256")
    try:
        async with serving(home) as live, ClientSession() as session:
            client = live.client
            admin = Admin(session, live.admin.port, home.path / "tls" / "ca.pem")
            status, first = await client.encrypt("foo", b"before")
            assert status == 200  # reserved a block of 20, used 1
            assert (await _health(client))["xksProxyFleetSize"] == 1
            cluster.set_connectable(name, False)
            await wait_for(lambda: _health_states(client, ("DEGRADED", "UNAVAILABLE")), timeout=5)
            status, body = await admin.call("POST", "/keys/foo/disable", token, {})
            assert (status, body["errorName"]) == (503, "DependencyTimeoutException"), body  # lifecycle: retryable refusal
            made = [await client.encrypt("foo", b"during %d" % i) for i in range(25)]
            assert [status for status, _ in made] == [200] * 19 + [503] * 6  # never one uncounted encryption
            assert {body["errorName"] for status, body in made if status == 503} == {"DependencyTimeoutException"}
            for i, (status, enc) in enumerate(made[:19]):
                status, body = await client.decrypt("foo", enc)
                assert status == 200 and unb64(body["plaintext"]) == b"during %d" % i
            assert (await client.call("metadata", "foo", requestMetadata=metadata("DescribeKey")))[0] == 200
            cluster.set_connectable(name, True)
            await wait_for(lambda: _health_states(client, ("ACTIVE", "ACTIVE")), timeout=5)
            status, after = await client.encrypt("foo", b"after")
            assert status == 200
            status, body = await admin.call("GET", "/keys/foo", token)
            assert (status, body["keyStatus"]) == (200, "ENABLED")  # the refused change was not made
            status, body = await client.decrypt("foo", first)
            assert status == 200 and unb64(body["plaintext"]) == b"before"
        db = pg_vault(dsn, master=home.config.master_key)
        try:
            assert db.versions(home.prefix, "foo")[0].reserved == 21  # exact after a clean stop: 20 + 1
        finally:
            db.close()
    finally:
        cluster.set_connectable(name, True)
    assert DSN_PASSWORD not in caplog.text
    assert any("unreachable" in r.getMessage() for r in caplog.records if r.name == "xks_proxy.vault")


async def _health(client: Client) -> dict[str, Any]:
    status, body = await client.call("health", requestMetadata={"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"})
    assert status == 200, body
    return body


async def _health_states(client: Client, expected: tuple[str, str]) -> bool:
    details = (await _health(client))["ekmFleetDetails"]
    return tuple(d["healthStatus"] for d in details) == expected and "PostgreSQL 1" in details[1]["model"]


async def test_fleet_init_moves_a_single_box_home_and_back_without_losing_a_key(
    tmp_path: Path, pg_database: tuple[Cluster, str, str]
) -> None:
    _, _, dsn = pg_database
    akid, secret = init_home(tmp_path / "box", "test", REGION, 0)
    box = Home(path=tmp_path / "box", prefix="test", access_key_id=akid, secret=secret)
    box.create_key("foo")
    made = []
    async with serving(box) as live:  # the single-box proxy, on its SQLite vault
        made.append((await live.client.encrypt("foo", b"v1"))[1])
        assert (await acli("keys", "rotate", "foo", home=box.path))[0] == 0
        await wait_for(lambda: _encrypts_as_version(live.client, 2, made))
    dsn_file = write_dsn_file(tmp_path / "pg.dsn", dsn)
    rc, out, err = await acli("fleet", "init", "--dsn-file", str(dsn_file), home=box.path)
    assert rc == 0, err
    assert json.loads(out)["keysCopied"] == 1 and DSN_PASSWORD not in out + err
    rc, out, err = await acli("fleet", "init", home=box.path)  # again: nothing more to do
    assert rc == 0 and json.loads(out)["keysCopied"] == 0, err
    async with serving(box) as live:  # the same home, now on the shared database
        for (plaintext, enc) in zip((b"v1", b"v2"), made):
            status, body = await live.client.decrypt("foo", enc)
            assert status == 200 and unb64(body["plaintext"]) == plaintext
    # A backup of the fleet restores as a single-box home (stores and keys in it).
    rc, out, err = await acli("vault", "backup", str(tmp_path / "fleet.bak"), home=box.path)
    assert rc == 0, err
    rc, out, err = await acli(
        "vault", "restore", str(tmp_path / "fleet.bak"), "--home", str(tmp_path / "restored"),
        "--master-key-file", str(box.path / "master.key"),
    )  # fmt: skip
    assert rc == 0, err
    restored = Home(path=tmp_path / "restored", prefix="test", access_key_id=akid, secret=secret)
    assert restored.config.vault.dsn is None
    async with serving(restored) as live:
        status, body = await live.client.decrypt("foo", made[1])
        assert status == 200 and unb64(body["plaintext"]) == b"v2"
    # Another box's keys are not mixed into a database that has keys.
    init_home(tmp_path / "other", "test", REGION, 0)
    Home(path=tmp_path / "other", prefix="test", access_key_id="", secret="").create_key("bar")
    rc, out, err = await acli("fleet", "init", "--dsn-file", str(dsn_file), home=tmp_path / "other")
    assert rc == 1 and "already holds 1 other key(s)" in err and "--skip-local-vault" in err
    rc, out, err = await acli("fleet", "init", "--dsn-file", str(dsn_file), "--skip-local-vault", home=tmp_path / "other")
    assert rc == 1 and "already holds key stores that differ" in err
    assert "stores" in configmod.read_raw(tmp_path / "other")  # refused: config.toml untouched


async def _encrypts_as_version(client: Client, version: int, made: list[Any]) -> bool:
    status, enc = await client.encrypt("foo", b"v2")
    ok = status == 200 and enc["ciphertextMetadata"] == base64.b64encode(struct.pack(">BI", 1, version)).decode()
    if ok:
        made.append(enc)
    return ok


def test_empty_database_points_at_fleet_init(tmp_path: Path, pg_database: tuple[Cluster, str, str]) -> None:
    from tests.fleet.test_fleet_config import _fleet_home

    _, _, dsn = pg_database
    home = tmp_path / "home"
    init_home(home, "test", REGION, 0)
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(dsn)
    dsn_file.chmod(0o600)
    _fleet_home(home, dsn_file=str(dsn_file))
    for args in (("keys", "list"), ("serve", "--http", "--port", "0")):
        done = cli(*args, home=home)
        assert done.returncode == 2 and "holds no key stores yet; run `xks-proxy fleet init`" in done.stderr, done.stderr
    assert json.loads(cli("fleet", "status", home=home).stdout)["schema"] == 0
