"""`xks-proxy credentials add|remove|list` and `xks-proxy stores add|remove|list|export`.

Each command edits config.toml as one document: read the parsed TOML, change it, validate the
result exactly as the server will (`config.from_raw`), and only then replace the file
atomically (`home.write_config`), holding an exclusive lock so two commands cannot lose each
other's change. Sections this module does not know survive the round trip (comments do not:
the file is rewritten). A running server takes the change up within a second (reload.py).
In a fleet (`[vault] dsn`) the stores live in the vault database instead: the same edit is
validated and written there in one transaction (`shared_settings.editing`), and every proxy of
the fleet takes it up within 2 seconds (fleet.py).

Secrets are sealed under the master key in the file, like key material. They are printed only
by the command that creates one (`credentials add`, `stores add`) and by `stores export`,
whose job that is. The newest credential of a store is the last one in its list. Every change
is written to the audit log (who, what, which access key id; never a secret).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import getpass
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from xks_proxy.access import audit
from xks_proxy import config as configmod
from xks_proxy.config import ACCESS_KEY_RE, REGION_RE, SECRET_RE, Config, validate_prefix
from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential, write_config

EXIT_REFUSED = 1


class Refused(Exception):
    """A command that cannot be done as asked, printed as one line."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    store_arg = argparse.ArgumentParser(add_help=False, parents=[common])
    store_arg.add_argument("--store", metavar="PREFIX", help="the key store's URI prefix (needed when there are several)")

    creds = sub.add_parser("credentials", help="SigV4 credentials of a key store").add_subparsers(metavar="ACTION")
    add = creds.add_parser("add", parents=[store_arg], help="add a credential (printed once); the newest is exported")
    add.add_argument("--access-key-id", help="use this access key id (20-30 of A-Z, 2-7) instead of a generated one")
    add.add_argument(
        "--secret-access-key-stdin", action="store_true", help="read the secret from stdin instead of generating one"
    )
    add.set_defaults(func=_command(cmd_credentials_add))
    remove = creds.add_parser("remove", parents=[store_arg], help="remove a credential (never the last one)")
    remove.add_argument("access_key_id")
    remove.set_defaults(func=_command(cmd_credentials_remove))
    creds.add_parser("list", parents=[store_arg], help="list access key ids, oldest first").set_defaults(
        func=_command(cmd_credentials_list)
    )

    stores = sub.add_parser("stores", help="logical key stores").add_subparsers(metavar="ACTION")
    sadd = stores.add_parser("add", parents=[common], help="add a key store with a new credential (printed once)")
    sadd.add_argument("prefix", help="URI path prefix: the store answers at /<prefix>/kms/xks/v1")
    sadd.add_argument("--region", action="append", required=True, help="AWS region that calls it (repeatable)")
    sadd.add_argument("--key-ids", help="comma-separated key ids this store may use (default: every key it is given)")
    sadd.set_defaults(func=_command(cmd_stores_add))
    sremove = stores.add_parser("remove", parents=[common], help="remove a key store (its keys stay in the key manager)")
    sremove.add_argument("prefix")
    sremove.add_argument("--yes", action="store_true", help="confirm: KMS loses access to every key of this store")
    sremove.set_defaults(func=_command(cmd_stores_remove))
    stores.add_parser("list", parents=[common], help="list key stores").set_defaults(func=_command(cmd_stores_list))
    export = stores.add_parser("export", parents=[common], help="print the KMS proxy configuration file (newest credential)")
    export.add_argument("prefix", nargs="?", help="the store's URI prefix (default: the only store)")
    export.set_defaults(func=_command(cmd_stores_export))


def _command(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except Refused as exc:
            print(f"xks-proxy: {exc}", file=sys.stderr)
            return EXIT_REFUSED

    return run


# --- editing config.toml ---------------------------------------------------------------------


@contextmanager
def _editing(args: argparse.Namespace) -> Iterator[tuple[Config, dict[str, Any]]]:
    """Yield (current config, a copy of its TOML to change); validate and write the copy after."""
    home = configmod.home_dir(args.home)
    lock_path = home / ".config.lock"
    if not (home / configmod.CONFIG_FILE).is_file():
        configmod.load(home)  # raises the usual "run init first" ConfigError
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = configmod.load(home, shared=False)
        if current.vault.dsn is not None:
            with _editing_shared(current) as edit:
                yield edit
            return
        current = configmod.load(home)
        raw = copy.deepcopy(current.raw)
        yield current, raw
        configmod.from_raw(home, raw)  # the server must accept what we write
        write_config(home, raw)


@contextmanager
def _editing_shared(local: Config) -> Iterator[tuple[Config, dict[str, Any]]]:
    """A fleet's stores are in its vault database: the same edit, written there in one transaction."""
    from xks_proxy.fleet import shared_settings

    with shared_settings.editing(local, _actor()) as stores:
        raw = {**copy.deepcopy(local.raw), "stores": copy.deepcopy(stores)}
        yield shared_settings.apply(local, stores), raw
        stores[:] = raw["stores"]  # validated and written by shared_settings.editing


def _audit(config: Config, action: str, **fields: object) -> None:
    """One audit record for a change this command made (after it is in config.toml, or a fleet's database)."""
    audit.append_only(config.audit)
    audit.audit({"event": "access-admin", "action": action, "actor": _actor(), "via": "cli", "outcome": "OK", **fields})


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no name for this uid
        return f"cli:uid={os.getuid()}"


def _store_index(config: Config, raw: dict[str, Any], prefix: str | None) -> int:
    store = config.store(prefix)
    for i, table in enumerate(raw["stores"]):
        if table.get("prefix") == store.prefix:
            return i
    raise Refused(f"no store with prefix {store.prefix!r}")  # unreachable: config came from raw


def _uri_path(prefix: str) -> str:
    return f"/{prefix}/kms/xks/v1" if prefix else "/kms/xks/v1"


def _all_access_key_ids(config: Config) -> set[str]:
    return {cred.access_key_id for store in config.stores for cred in store.credentials}


# --- credentials -------------------------------------------------------------------------------


def cmd_credentials_add(args: argparse.Namespace) -> int:
    secret_given = args.secret_access_key_stdin
    secret = _secret_from_stdin() if secret_given else new_secret()
    with _editing(args) as (config, raw):
        akid = args.access_key_id or new_access_key_id()
        if not ACCESS_KEY_RE.match(akid):
            raise Refused("--access-key-id: must be 20-30 characters of A-Z and 2-7")
        if akid in _all_access_key_ids(config):
            raise Refused(f"--access-key-id: {akid} is already a credential of a key store")
        i = _store_index(config, raw, args.store)
        raw["stores"][i]["credentials"].append(sealed_credential(config.master_key, akid, secret))
        uri_path = _uri_path(raw["stores"][i]["prefix"])
    _audit(config, "credentials-add", store=uri_path, accessKeyId=akid, generated=not secret_given)
    print(f"Added credential {akid} to key store {uri_path}")
    print(f"  access key id:      {akid}")
    if not secret_given:
        print(f"  secret access key:  {secret}")
        print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    print("Rotation: give it to KMS (UpdateCustomKeyStore), then `xks-proxy credentials remove` the old one.")
    return 0


def _secret_from_stdin() -> str:
    secret = sys.stdin.readline().strip()
    if not SECRET_RE.match(secret):
        raise Refused("--secret-access-key-stdin: the secret must be 43-64 characters of [a-zA-Z0-9/+=]")
    return secret


def cmd_credentials_remove(args: argparse.Namespace) -> int:
    with _editing(args) as (config, raw):
        i = _store_index(config, raw, args.store)
        creds = raw["stores"][i]["credentials"]
        kept = [c for c in creds if c.get("access_key_id") != args.access_key_id]
        if len(kept) == len(creds):
            raise Refused(f"key store {_uri_path(raw['stores'][i]['prefix'])} has no credential {args.access_key_id}")
        if not kept:
            raise Refused(f"{args.access_key_id} is the last credential of this key store; add another first")
        raw["stores"][i]["credentials"] = kept
        uri_path = _uri_path(raw["stores"][i]["prefix"])
    _audit(config, "credentials-remove", store=uri_path, accessKeyId=args.access_key_id)
    print(f"Removed credential {args.access_key_id}")
    return 0


def cmd_credentials_list(args: argparse.Namespace) -> int:
    store = configmod.load(configmod.home_dir(args.home)).store(args.store)
    for cred in store.credentials:
        print(cred.access_key_id)
    return 0


# --- stores ------------------------------------------------------------------------------------


def cmd_stores_add(args: argparse.Namespace) -> int:
    prefix = validate_prefix(args.prefix.strip("/"), "prefix")
    for region in args.region:
        if not REGION_RE.match(region):
            raise Refused(f"--region: {region!r} is not an AWS region name")
    akid, secret = new_access_key_id(), new_secret()
    with _editing(args) as (config, raw):
        if any(store.prefix == prefix for store in config.stores):
            raise Refused(f"there is already a key store with prefix {prefix!r}")
        credential = sealed_credential(config.master_key, akid, secret)
        table: dict[str, Any] = {"prefix": prefix, "regions": list(dict.fromkeys(args.region)), "credentials": [credential]}
        if args.key_ids is not None:
            table["key_ids"] = sorted({k.strip() for k in args.key_ids.split(",") if k.strip()})
        elif config.backend == "pkcs11":
            print("xks-proxy: note: this store can use every key on the token; limit it with --key-ids", file=sys.stderr)
        raw["stores"].append(table)
    _audit(config, "stores-add", store=_uri_path(prefix), regions=table["regions"], keyIds=table.get("key_ids"), accessKeyId=akid)
    print(f"Added key store {_uri_path(prefix)}")
    print(f"  access key id:      {akid}")
    print(f"  secret access key:  {secret}")
    print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    return 0


def cmd_stores_remove(args: argparse.Namespace) -> int:
    prefix = args.prefix.strip("/")
    if not args.yes:
        raise Refused(f"removing key store {_uri_path(prefix)} cuts KMS off from all its keys; confirm with --yes")
    with _editing(args) as (config, raw):
        i = _store_index(config, raw, prefix)
        if len(raw["stores"]) == 1:
            raise Refused("this is the only key store; the proxy needs at least one")
        del raw["stores"][i]
    _audit(config, "stores-remove", store=_uri_path(prefix))
    print(f"Removed key store {_uri_path(prefix)} (its keys remain in the key manager)")
    return 0


def cmd_stores_list(args: argparse.Namespace) -> int:
    config = configmod.load(configmod.home_dir(args.home))
    for store in config.stores:
        keys = "all" if store.key_ids is None else ",".join(sorted(store.key_ids)) or "-"
        print(
            f"{store.uri_path}\tregions={','.join(sorted(store.regions))}\tcredentials={len(store.credentials)}"
            f"\tpolicy_rules={len(store.policy.rules)}\tkey_ids={keys}"
        )
    return 0


def cmd_stores_export(args: argparse.Namespace) -> int:
    store = configmod.load(configmod.home_dir(args.home)).store(args.prefix)
    credential = store.credentials[-1]  # the newest
    print(
        json.dumps(
            {
                "XksProxyUriPath": store.uri_path,
                "XksProxyAuthenticationCredential": {
                    "AccessKeyId": credential.access_key_id,
                    "RawSecretAccessKey": credential.secret,
                },
            },
            indent=2,
        )
    )
    return 0
