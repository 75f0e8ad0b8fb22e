"""`xks-proxy fleet init|status`: move a home onto a shared PostgreSQL vault, and look at the fleet.

`fleet get-stores` / `fleet put-stores` edit the fleet's `[[stores]]` document (policies above
all, which have no command of their own) the way config.toml is edited on one box: the file
names the revision it was read at, and `put-stores` refuses it if someone changed the stores
since, so no edit is lost.

`fleet init` turns a single-box home into the first member of a fleet, in an order that loses
nothing if it stops half-way (every step can be run again):
  1. the vault schema and health key in the database (the backend's fleet capability creates them);
  2. the home's local vault keys copied into the database, in one transaction, when it has none
     (sealed blobs as they are: every proxy of the fleet must use the same master key);
  3. config.toml's `[[stores]]` (sealed credentials as they are) put into the database;
  4. config.toml rewritten without `[[stores]]`, with the DSN setting given on the command line.
Other proxies then need a copy of the home's config.toml, master key and TLS files: nothing else.
The local vault file is left where it was, unused (keep it as a backup, or remove it).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any

from keymanager.seal.home import read_record, record_store
from keymanager.seal.record import SEAL_FILE, FileRecord, SealRecord
from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError, actor
from xks_proxy.config import Config, ConfigError
from xks_proxy.cli.secrets_input import open_record


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    fleet = sub.add_parser("fleet", help="a fleet of proxies sharing their vault in PostgreSQL").add_subparsers(metavar="ACTION")
    init = fleet.add_parser("init", parents=[common], help="put this home's vault and key stores into the shared database")
    dsn = init.add_mutually_exclusive_group()
    dsn.add_argument("--dsn-file", help="file holding the PostgreSQL connection string (chmod 600; written as vault.dsn_file)")
    dsn.add_argument("--dsn-env", help="environment variable holding the connection string (written as vault.dsn_env)")
    init.add_argument(
        "--skip-local-vault", action="store_true", help="do not copy the home's local vault keys (the database keeps its own)"
    )
    init.set_defaults(func=cmd_init)
    status = fleet.add_parser("status", parents=[common], help="the shared database and the proxies heartbeating into it")
    status.set_defaults(func=cmd_status)
    get = fleet.add_parser("get-stores", parents=[common], help="print the fleet's [[stores]] (secrets sealed) to edit them")
    get.set_defaults(func=cmd_get_stores)
    put = fleet.add_parser("put-stores", parents=[common], help="validate an edited [[stores]] file and make it the fleet's")
    put.add_argument("file", help="the file from get-stores, edited (policies, regions, key_ids, throttle)")
    put.set_defaults(func=cmd_put_stores)
    drain = fleet.add_parser("drain", parents=[common], help="make this proxy's GET /ping answer 503 (before stopping it)")
    drain.set_defaults(func=cmd_drain)
    resume = fleet.add_parser("resume", parents=[common], help="make this proxy's GET /ping answer 200 again")
    resume.set_defaults(func=cmd_resume)


def cmd_init(args: argparse.Namespace) -> int:
    home = configmod.home_dir(args.home)
    raw = configmod.read_raw(home)
    new_raw = copy.deepcopy(raw)
    vault_table = new_raw.setdefault("vault", {})
    if args.dsn_file or args.dsn_env:
        for name in ("dsn", "dsn_file", "dsn_env"):
            vault_table.pop(name, None)
        vault_table["dsn_file" if args.dsn_file else "dsn_env"] = args.dsn_file or args.dsn_env
    local_stores = new_raw.pop("stores", None)
    local_record = FileRecord(home).read()  # a sealed home's record moves into the database too
    keyring = open_record(home, None, local_record, raw.get("seal", {})) if local_record is not None else None
    config = configmod.from_raw(home, new_raw, shared=False, keyring=keyring)
    if config.vault.dsn is None:
        raise ConfigError("vault.dsn: no database named; give --dsn-file or --dsn-env (or set vault.dsn_file in config.toml)")
    if config.sealed:  # run again: the record is in the database already
        record = read_record(home, config.vault.dsn)
        assert record is not None
        config = configmod.from_raw(home, new_raw, shared=False, keyring=open_record(home, config.vault.dsn, record, raw.get("seal", {})))
    if local_stores is not None:
        configmod.with_stores(config, local_stores)  # valid before anything is written
    from keymanager.base import KeyRefused
    from keymanager.registry import backend

    fleet = backend(config.backend).fleet
    assert fleet is not None  # config validation allows vault.dsn only on a backend with a fleet mode
    try:
        copied = fleet.move_into(config, copy_local=not args.skip_local_vault)
    except KeyRefused as exc:
        raise CommandError(str(exc)) from None
    if local_record is not None:
        _move_record(home, config.vault.dsn, local_record)
    stores = _put_stores(config, local_stores)
    from xks_proxy.cli.home import write_config

    write_config(home, new_raw)
    print(
        json.dumps(
            {
                "database": config.vault.dsn_display,
                "keysCopied": copied,
                "stores": [s.uri_path for s in stores.stores],
                "config": f"{home / configmod.CONFIG_FILE}: key stores now live in the database",
            },
            indent=2,
        )
    )
    return 0


def _move_record(home: Path, dsn: str, record: SealRecord) -> None:
    """seal.json into the database's row (every proxy of the fleet unseals from it), then out of the home."""
    shared = record_store(home, dsn)
    existing = shared.read()
    if existing is None:
        shared.write(record)
    elif existing.current != record.current:
        raise CommandError("the database's seal record guards another master key: this home is not of this fleet")
    (home / SEAL_FILE).unlink()


def _put_stores(config: Config, local: list[dict[str, Any]] | None) -> Config:
    """config.toml's stores into the database, unless it has them (the same, or others: refused)."""
    from xks_proxy.fleet import shared_settings

    with shared_settings.editing(config, actor()) as shared:
        if not shared and not local:
            raise ConfigError("stores: neither config.toml nor the database has a key store")
        if local and not shared:
            shared.extend(local)
        elif local and shared != local:
            raise CommandError(
                "the database already holds key stores that differ from config.toml's; keep the database's "
                "by removing [[stores]] from config.toml, then run this again"
            )
        merged = shared_settings.apply(config, shared)
    return merged


def cmd_status(args: argparse.Namespace) -> int:
    from xks_proxy.fleet import shared_settings
    from xks_proxy.fleet.member import live

    config = configmod.load(configmod.home_dir(args.home), shared=False)
    if config.vault.dsn is None:
        raise ConfigError("vault.dsn: this home's vault is a local file, not a fleet's shared database")
    storage = shared_settings.open_storage(config)
    try:
        schema = storage.schema_version()
        rows = storage.proxies() if schema else []
        generation = storage.generation() if schema else None
        revision = storage.setting_revision(shared_settings.STORES) if schema else 0
    finally:
        storage.close()
    proxies = [
        {"proxyId": r.proxy_id, "host": r.host, "port": r.port, "pid": r.pid, "lastSeenSecondsAgo": round(r.age_seconds, 1),
         "live": live(r)}
        for r in rows
    ]  # fmt: skip
    print(
        json.dumps(
            {
                "database": storage.display,
                "serverVersion": storage.server_version,
                "schema": schema,
                "generation": generation,
                "storesRevision": revision,
                "fleetSize": len({p["proxyId"] for p in proxies if p["live"]}),
                "processes": proxies,
            },
            indent=2,
        )
    )
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """The load balancer stops sending new requests here within its check interval; the API still answers."""
    from xks_proxy.server import DRAIN_FILE

    home = configmod.home_dir(args.home)
    configmod.read_raw(home)  # a home, not any directory
    (home / DRAIN_FILE).write_text(f"drained by {actor()}\n")
    print(f"{home}: GET /ping now answers 503; stop the proxy once the load balancer has taken it out")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from xks_proxy.server import DRAIN_FILE

    home = configmod.home_dir(args.home)
    configmod.read_raw(home)
    (home / DRAIN_FILE).unlink(missing_ok=True)
    print(f"{home}: GET /ping answers 200 again")
    return 0


_REVISION = re.compile(r"^# revision (\d+)\b", re.MULTILINE)


def _fleet_config(args: argparse.Namespace) -> Config:
    config = configmod.load(configmod.home_dir(args.home), shared=False)
    if config.vault.dsn is None:
        raise ConfigError("vault.dsn: this home's key stores are in its config.toml; edit that instead")
    return config


def cmd_get_stores(args: argparse.Namespace) -> int:
    from xks_proxy.fleet import shared_settings

    config = _fleet_config(args)
    storage = shared_settings.open_storage(config)
    try:
        found = shared_settings.read(storage)
    finally:
        storage.close()
    if found is None:
        raise CommandError("the database holds no key stores yet; run `xks-proxy fleet init`")
    stores, revision = found
    print(f"# revision {revision} of the key stores in {config.vault.dsn_display}; secrets are sealed under the master key.")
    print("# Edit, then: xks-proxy fleet put-stores FILE (refused if the stores changed since this revision).")
    print(shared_settings.dump(stores), end="")
    return 0


def cmd_put_stores(args: argparse.Namespace) -> int:
    from xks_proxy.fleet import shared_settings

    config = _fleet_config(args)
    try:
        text = Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.file}: {exc}") from None
    new = shared_settings.parse(text)
    read_at = _REVISION.search(text)
    if read_at is None:
        raise CommandError(f"{args.file} has no '# revision N' line; start from `xks-proxy fleet get-stores`")
    try:
        with shared_settings.editing(config, actor(), expect_revision=int(read_at[1])) as stores:
            stores[:] = new  # validated as every proxy will, then written, by `editing`
    except shared_settings.StoresChanged as exc:
        raise CommandError(f"{exc}; get them again and redo the edit") from None
    applied = shared_settings.apply(config, new)
    print(f"key stores replaced: {', '.join(s.uri_path for s in applied.stores)}; every proxy serves them within 2 s")
    return 0
