"""`xks-proxy credentials add|remove|list`: the SigV4 credentials of a key store.

Secrets are sealed under the master key in config.toml (or a fleet's database), like key
material, and printed only by `credentials add` when it makes one (and by `stores export`).
The newest credential of a store is the last one in its list: the one `stores export` gives
KMS. Rotation: add, give the new one to KMS, remove the old. Edits go through `editing`.
"""

from __future__ import annotations

import argparse
import sys

from xks_proxy.cli.common import CommandError, load
from xks_proxy.cli.editing import audit_change, editing, store_index, uri_path
from xks_proxy.cli.home import new_access_key_id, new_secret, sealed_credential
from xks_proxy.cli.nouns import add_json_flag, credential_json, print_listing
from xks_proxy.config import ACCESS_KEY_RE, SECRET_RE, Config


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    store_arg = argparse.ArgumentParser(add_help=False, parents=[common])
    store_arg.add_argument("--store", metavar="PREFIX", help="the key store's URI prefix (needed when there are several)")

    creds = sub.add_parser("credentials", help="SigV4 credentials of a key store").add_subparsers(metavar="ACTION")
    add = creds.add_parser("add", parents=[store_arg], help="add a credential (printed once); the newest is exported")
    add.add_argument("--access-key-id", help="use this access key id (20-30 of A-Z, 2-7) instead of a generated one")
    add.add_argument(
        "--secret-access-key-stdin", action="store_true", help="read the secret from stdin instead of generating one"
    )
    add.set_defaults(func=cmd_credentials_add)
    remove = creds.add_parser("remove", parents=[store_arg], help="remove a credential (never the last one)")
    remove.add_argument("access_key_id")
    remove.set_defaults(func=cmd_credentials_remove)
    listing = creds.add_parser("list", parents=[store_arg], help="list access key ids, oldest first (never secrets)")
    add_json_flag(listing)
    listing.set_defaults(func=cmd_credentials_list)


def cmd_credentials_add(args: argparse.Namespace) -> int:
    secret_given = args.secret_access_key_stdin
    secret = _secret_from_stdin() if secret_given else new_secret()
    with editing(args) as (config, raw):
        akid = args.access_key_id or new_access_key_id()
        if not ACCESS_KEY_RE.match(akid):
            raise CommandError("--access-key-id: must be 20-30 characters of A-Z and 2-7")
        if akid in _all_access_key_ids(config):
            raise CommandError(f"--access-key-id: {akid} is already a credential of a key store")
        i = store_index(config, raw, args.store)
        raw["stores"][i]["credentials"].append(sealed_credential(config.master_key, akid, secret))
        prefix = raw["stores"][i]["prefix"]
    audit_change(config, "credentials-add", store=prefix, accessKeyId=akid, generated=not secret_given)
    print(f"Added credential {akid} to key store {uri_path(prefix)}")
    print(f"  access key id:      {akid}")
    if not secret_given:
        print(f"  secret access key:  {secret}")
        print("Keep the secret safe: it is shown here and by `xks-proxy stores export` only.")
    print("Rotation: give it to KMS (UpdateCustomKeyStore), then `xks-proxy credentials remove` the old one.")
    return 0


def _secret_from_stdin() -> str:
    secret = sys.stdin.readline().strip()
    if not SECRET_RE.match(secret):
        raise CommandError("--secret-access-key-stdin: the secret must be 43-64 characters of [a-zA-Z0-9/+=]")
    return secret


def _all_access_key_ids(config: Config) -> set[str]:
    return {cred.access_key_id for store in config.stores for cred in store.credentials}


def cmd_credentials_remove(args: argparse.Namespace) -> int:
    with editing(args) as (config, raw):
        i = store_index(config, raw, args.store)
        creds = raw["stores"][i]["credentials"]
        kept = [c for c in creds if c.get("access_key_id") != args.access_key_id]
        if len(kept) == len(creds):
            raise CommandError(f"key store {uri_path(raw['stores'][i]['prefix'])} has no credential {args.access_key_id}")
        if not kept:
            raise CommandError(f"{args.access_key_id} is the last credential of this key store; add another first")
        raw["stores"][i]["credentials"] = kept
        prefix = raw["stores"][i]["prefix"]
    audit_change(config, "credentials-remove", store=prefix, accessKeyId=args.access_key_id)
    print(f"Removed credential {args.access_key_id}")
    return 0


def cmd_credentials_list(args: argparse.Namespace) -> int:
    store = load(args).store(args.store)
    credentials = (credential_json(store, cred) for cred in store.credentials)
    print_listing(credentials, args.json, lambda credential: credential["accessKeyId"])
    return 0
