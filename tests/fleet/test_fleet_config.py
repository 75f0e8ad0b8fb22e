"""`[vault] dsn`, `dsn_file`, `dsn_env` and `[fleet]`: validated at load, a password never in config.toml or output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REGION
from tests.support.lifecycle import acli, cli, patch_config
from xks_proxy import config as configmod
from xks_proxy.config import ConfigError
from xks_proxy.cli.home import init_home

PASSWORD = "pw-77c3-not-for-config"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    init_home(path, "test", REGION, 0)
    return path


def _fleet_home(home: Path, **vault: Any) -> None:
    """A fleet node's config.toml: the given [vault] settings, no [[stores]] (they live in the database)."""
    import tomllib

    from xks_proxy.cli.home import write_config

    raw = tomllib.loads((home / "config.toml").read_text())
    raw.pop("stores")
    raw["vault"].update(vault)
    write_config(home, raw)


@pytest.mark.parametrize(
    ("vault", "message"),
    [
        ({"dsn": "postgresql://xks@db/xks", "dsn_env": "X"}, "vault.dsn_env: give only one of dsn, dsn_file or dsn_env"),
        ({"dsn": f"postgresql://xks:{PASSWORD}@db/xks"}, "vault.dsn: holds a password"),
        ({"dsn": f"host=db password={PASSWORD}"}, "vault.dsn: holds a password"),
        ({"dsn": "   "}, "vault.dsn: is empty"),
        ({"dsn": f"no-such-key={PASSWORD}"}, "vault.dsn: not a PostgreSQL connection string"),
        ({"dsn_env": "XKS_TEST_UNSET_DSN"}, "vault.dsn_env: the environment variable XKS_TEST_UNSET_DSN is not set"),
        ({"dsn_file": "missing.dsn"}, "vault.dsn_file: file"),
        ({"dsn": 5}, "vault.dsn: must be a str"),
    ],
)
def test_bad_dsn_settings_name_the_field_and_never_echo_it(home: Path, vault: dict[str, Any], message: str) -> None:
    _fleet_home(home, **vault)
    with pytest.raises(ConfigError) as caught:
        configmod.load(home, shared=False)
    assert message in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_dsn_file_must_be_owner_only(home: Path) -> None:
    dsn_file = home / "pg.dsn"
    dsn_file.write_text(f"postgresql://xks:{PASSWORD}@db.internal:5433/xks\n")
    dsn_file.chmod(0o640)
    _fleet_home(home, dsn_file="pg.dsn")
    with pytest.raises(ConfigError, match="readable or writable by others; chmod 600"):
        configmod.load(home, shared=False)
    dsn_file.chmod(0o600)
    config = configmod.load(home, shared=False)
    assert config.vault.dsn_display == "postgresql://xks@db.internal:5433/xks"
    assert PASSWORD not in repr(config) and PASSWORD not in repr(config.vault)


def test_dsn_env_and_fleet_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XKS_TEST_DSN", f"host=db.internal dbname=xks user=xks password={PASSWORD}")
    _fleet_home(home, dsn_env="XKS_TEST_DSN")
    patch_config(home, fleet={"proxy_id": "zone-a-1", "heartbeat_seconds": 0.5})
    config = configmod.load(home, shared=False)
    assert (config.fleet.name(8443), config.fleet.heartbeat_seconds) == ("zone-a-1", 0.5)
    assert config.stores == ()
    patch_config(home, fleet={"heartbeat_seconds": 60})
    with pytest.raises(ConfigError, match="fleet.heartbeat_seconds: must be between 0.1 and 30"):
        configmod.load(home, shared=False)
    patch_config(home, fleet={"heartbeat_seconds": 1, "proxy_name": "x"})
    with pytest.raises(ConfigError, match="fleet.proxy_name: unknown setting"):
        configmod.load(home, shared=False)


def test_fleet_without_a_shared_vault_and_dsn_on_pkcs11_are_refused(home: Path) -> None:
    patch_config(home, fleet={"proxy_id": "a"})
    with pytest.raises(ConfigError, match="fleet: a fleet shares its vault in PostgreSQL; set vault.dsn"):
        configmod.load(home)
    patch_config(home, vault={"dsn": "postgresql://xks@db/xks"}, keymanager={"backend": "pkcs11"})
    with pytest.raises(ConfigError, match='vault.dsn: a shared vault database is for keymanager.backend = "vault"'):
        configmod.load(home)


def test_cli_against_a_database_that_is_not_there(home: Path, tmp_path: Path) -> None:
    """Every command that needs the database says so in one line, exit 1, without the password."""
    dsn_file = tmp_path / "pg.dsn"
    dsn_file.write_text(f"postgresql://xks:{PASSWORD}@127.0.0.1:1/xks")
    dsn_file.chmod(0o600)
    _fleet_home(home, dsn_file=str(dsn_file))
    for args in (("keys", "list"), ("keys", "create", "k"), ("stores", "export"), ("fleet", "status")):
        done = cli(*args, home=home)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "postgresql://xks@127.0.0.1:1/xks is unreachable" in done.stderr, done.stderr
        assert PASSWORD not in done.stdout + done.stderr


async def test_drain_turns_liveness_to_503_while_the_api_still_answers(home: Path) -> None:
    """A rolling upgrade's first step: the load balancer sees /ping fail; requests that still come are served."""
    from tests.conftest import Home
    from tests.support.lifecycle import serving

    akid_home = configmod.load(home)
    store = akid_home.stores[0]
    h = Home(path=home, prefix="test", access_key_id=store.credentials[0].access_key_id, secret=store.credentials[0].secret)
    h.create_key("foo")
    async with serving(h) as live:
        session = live.client.session
        ping = live.client.base_url + "/ping"
        async with session.get(ping) as resp:
            assert resp.status == 200
        done = await acli("fleet", "drain", home=home)
        assert done[0] == 0 and "503" in done[1], done
        async with session.get(ping) as resp:
            assert (resp.status, await resp.text()) == (503, "draining\n")
        assert (await live.client.encrypt("foo", b"still served"))[0] == 200
        assert (await acli("fleet", "resume", home=home))[0] == 0
        async with session.get(ping) as resp:
            assert resp.status == 200

