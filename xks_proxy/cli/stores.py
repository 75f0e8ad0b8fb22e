"""`xks-proxy stores add|remove|list|export`: the logical key stores, each answering at its URI prefix.

`stores add` makes the store's first credential and prints its secret once; `stores export`
prints the newest credential as the KMS proxy configuration file, which is its job. Edits go
through `editing` (config.toml, or a fleet's database), like `credentials`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xks_proxy.cli.common import CommandError, load
from xks_proxy.cli.editing import audit_change, editing, store_index, uri_path
from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential
from xks_proxy.cli.nouns import add_json_flag, print_listing, store_json
from xks_proxy.config import REGION_RE, validate_prefix


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    stores = sub.add_parser("stores", help="logical key stores").add_subparsers(metavar="ACTION")
    sadd = stores.add_parser("add", parents=[common], help="add a key store with a new credential (printed once)")
    sadd.add_argument("prefix", help="URI path prefix: the store answers at /<prefix>/kms/xks/v1")
    sadd.add_argument("--region", action="append", required=True, help="AWS region that calls it (repeatable)")
    sadd.add_argument("--key-ids", help="comma-separated key ids this store may use (default: every key it is given)")
    sadd.set_defaults(func=cmd_stores_add)
    sremove = stores.add_parser("remove", parents=[common], help="remove a key store (its keys stay in the key manager)")
    sremove.add_argument("prefix")
    sremove.add_argument("--yes", action="store_true", help="confirm: KMS loses access to every key of this store")
    sremove.set_defaults(func=cmd_stores_remove)
    slist = stores.add_parser("list", parents=[common], help="list key stores (never a secret)")
    add_json_flag(slist)
    slist.set_defaults(func=cmd_stores_list)
    export = stores.add_parser("export", parents=[common], help="print the KMS proxy configuration file (newest credential)")
    export.add_argument("prefix", nargs="?", help="the store's URI prefix (default: the only store)")
    export.set_defaults(func=cmd_stores_export)


def cmd_stores_add(args: argparse.Namespace) -> int:
    prefix = validate_prefix(args.prefix.strip("/"), "prefix")
    for region in args.region:
        if not REGION_RE.match(region):
            raise CommandError(f"--region: {region!r} is not an AWS region name")
    akid, secret = new_access_key_id(), new_secret()
    with editing(args) as (config, raw):
        if any(store.prefix == prefix for store in config.stores):
            raise CommandError(f"there is already a key store with prefix {prefix!r}")
        credential = sealed_credential(config.master_key, akid, secret)
        table: dict[str, Any] = {"prefix": prefix, "regions": list(dict.fromkeys(args.region)), "credentials": [credential]}
        if args.key_ids is not None:
            table["key_ids"] = sorted({k.strip() for k in args.key_ids.split(",") if k.strip()})
        elif config.backend == "pkcs11":
            print("xks-proxy: note: this store can use every key on the token; limit it with --key-ids", file=sys.stderr)
        raw["stores"].append(table)
    audit_change(config, "stores-add", store=prefix, regions=table["regions"], keyIds=table.get("key_ids"), accessKeyId=akid)
    print(f"Added key store {uri_path(prefix)}")
    print(f"  access key id:      {akid}")
    print(f"  secret access key:  {secret}")
    print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    return 0


def cmd_stores_remove(args: argparse.Namespace) -> int:
    prefix = args.prefix.strip("/")
    if not args.yes:
        raise CommandError(f"removing key store {uri_path(prefix)} cuts KMS off from all its keys; confirm with --yes")
    with editing(args) as (config, raw):
        i = store_index(config, raw, prefix)
        if len(raw["stores"]) == 1:
            raise CommandError("this is the only key store; the proxy needs at least one")
        del raw["stores"][i]
    audit_change(config, "stores-remove", store=prefix)
    print(f"Removed key store {uri_path(prefix)} (its keys remain in the key manager)")
    return 0


def cmd_stores_list(args: argparse.Namespace) -> int:
    print_listing((store_json(store) for store in load(args).stores), args.json, _store_line)
    return 0


def _store_line(store: dict[str, Any]) -> str:
    keys = "all" if store["keyIds"] is None else ",".join(store["keyIds"]) or "-"
    return (
        f"{store['uriPath']}\tregions={','.join(store['regions'])}\tcredentials={len(store['credentials'])}"
        f"\tpolicy_rules={store['policyRules']}\tkey_ids={keys}"
    )


def cmd_stores_export(args: argparse.Namespace) -> int:
    store = load(args).store(args.prefix)
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
