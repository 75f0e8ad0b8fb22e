"""`xks-proxy keys ...`: key lifecycle on the local backend, or through a running proxy's admin API.

Every action is a `KeyLifecycle` call (`_lifecycle`): the admin API client with --admin-url,
else the configured backend's full lifecycle (the vault: versions, deletion, BYOK, and due
deletions swept first) or the plain `KeyAdminLifecycle` over its `KeyAdmin` (an HSM). A single
key's results print as JSON; the listings print for a person unless --json asks for JSON (`keys
list`: one line per key, `keys versions`: a table of each version's encryptions performed and
reserved); refusals are one line. Lifecycle actions are audited, from the CLI too.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from keymanager.base import KeyAdminError
from keymanager.crypto_transfer import WRAPPING_ALGORITHMS, WRAPPING_KEY_SPECS
from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError, actor, load
from xks_proxy.cli.nouns import add_json_flag, print_listing, table

if TYPE_CHECKING:
    from xks_proxy.admin.lifecycle import KeyLifecycle


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="keys in the key manager").add_subparsers(metavar="ACTION")
    store_arg = argparse.ArgumentParser(add_help=False, parents=[common])
    store_arg.add_argument("--store", help="the key store's URI prefix (needed when there are several)")
    store_arg.add_argument("--admin-url", help="act through a running proxy's admin API (https://HOST:PORT), not the local vault")
    store_arg.add_argument("--admin-token-file", help="file holding the admin API bearer token (a JWT)")
    store_arg.add_argument("--admin-ca", help="CA bundle that signed the admin API's certificate (default: system CAs)")
    create = keys.add_parser("create", parents=[store_arg], help="create a key")
    create.add_argument("key_id")
    create.add_argument("--usage", default="ENCRYPT,DECRYPT", help="comma-separated ENCRYPT,DECRYPT (may be empty)")
    create.add_argument("--no-material", action="store_true", help="create without key material (PENDING_IMPORT), to import your own")
    create.set_defaults(func=_ACTIONS["create"], action_name="create")
    listing = keys.add_parser("list", parents=[store_arg], help="list keys")
    add_json_flag(listing)
    listing.set_defaults(func=_ACTIONS["list"], action_name="list")
    for name, helptext in (
        ("show", "show one key"),
        ("disable", "disable a key (crypto refused, metadata says DISABLED)"),
        ("enable", "enable a disabled key"),
        ("rotate", "add a new key version; old ciphertexts keep decrypting"),
        ("versions", "a key's versions: creation time, encryptions performed and reserved"),
        ("cancel-deletion", "cancel a scheduled deletion (the key becomes DISABLED)"),
    ):
        action = keys.add_parser(name, parents=[store_arg], help=helptext)
        action.add_argument("key_id")
        if name == "versions":
            add_json_flag(action)
        action.set_defaults(func=_ACTIONS[name], action_name=name)
    schedule = keys.add_parser(
        "schedule-deletion", parents=[store_arg], help="destroy a key after a waiting period (crypto refused meanwhile)"
    )
    schedule.add_argument("key_id")
    schedule.add_argument("--pending-days", type=int, default=30, help="waiting period, 7 to 30 days (default 30)")
    schedule.set_defaults(func=_ACTIONS["schedule-deletion"], action_name="schedule-deletion")
    params = keys.add_parser(
        "get-import-params", parents=[store_arg], help="write a wrapping public key and import token for `keys import`"
    )
    params.add_argument("key_id")
    params.add_argument("--wrapping-algorithm", required=True, choices=WRAPPING_ALGORITHMS)
    params.add_argument("--wrapping-key-spec", required=True, choices=tuple(WRAPPING_KEY_SPECS))
    params.add_argument("--out-dir", default=".", help="where to write WrappingPublicKey.der/.pem and ImportToken (default: .)")
    params.set_defaults(func=_ACTIONS["get-import-params"], action_name="get-import-params")
    imp = keys.add_parser("import", parents=[store_arg], help="import wrapped key material into a key made with --no-material")
    imp.add_argument("key_id")
    imp.add_argument("--import-token", required=True, metavar="FILE", help="the ImportToken file from get-import-params")
    imp.add_argument("--encrypted-key-material", required=True, metavar="FILE", help="the key material wrapped to the public key")
    imp.set_defaults(func=_ACTIONS["import"], action_name="import")


def vault_admin(config: configmod.Config) -> Any:  # the vault's KeyAdmin (VaultDB), with sweep()
    """`key_admin`, for the commands that need the vault (versions, deletion dates, the demo's key)."""
    if config.backend != "vault":
        raise CommandError(f"this command needs the vault backend, not {config.backend!r}")
    return key_admin(config)


def key_admin(config: configmod.Config) -> Any:  # keymanager.base.KeyAdmin
    """The configured backend's key administration (the vault file, or the HSM token)."""
    from keymanager import create_key_admin

    try:
        return create_key_admin(config)
    except KeyAdminError as exc:
        raise CommandError(str(exc)) from None


def _key_command(action: Callable[..., object]) -> Callable[[argparse.Namespace], int]:
    """Run a lifecycle action on the local backend or through --admin-url; refusals are one-line errors."""

    def run(args: argparse.Namespace) -> int:
        from xks_proxy.admin.client import AdminError

        try:
            with _lifecycle(args) as keys:
                result = action(keys, args)
        except (KeyAdminError, AdminError) as exc:
            raise CommandError(str(exc)) from None
        if result is not None:
            print(json.dumps(result, indent=2))
        return 0

    return run


@contextmanager
def _lifecycle(args: argparse.Namespace) -> Iterator["KeyLifecycle"]:
    """The admin API client (--admin-url), or the local backend after destroying keys that are due."""
    from keymanager.registry import backend

    if args.admin_url:
        from xks_proxy.admin.client import AdminClient

        if not args.admin_token_file:
            raise CommandError("--admin-url needs --admin-token-file")
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"--admin-token-file: {exc.strerror}: {args.admin_token_file}") from None
        yield AdminClient(args.admin_url, token, args.store, ca_file=args.admin_ca)
        return
    config = load(args)
    store = config.store(args.store)
    key_id = getattr(args, "key_id", None)
    if key_id is not None and not store.allows(key_id):
        raise CommandError(f"key id {key_id} is not in the key_ids of store {store.prefix!r} (config.toml)")
    from xks_proxy.access import audit

    audit.append_only(config.audit)  # lifecycle actions are audited, from the CLI too
    full_lifecycle = backend(config.backend).lifecycle  # the vault's; its KeyAdmin also sweeps due deletions
    if full_lifecycle is None:
        from xks_proxy.admin.lifecycle import KeyAdminLifecycle

        admin = key_admin(config)
        try:
            yield KeyAdminLifecycle(admin, store, args.action_name, config.backend)
        finally:
            admin.close()
        return
    db = vault_admin(config)
    try:
        who = actor()
        for info in db.sweep(actor=who):
            print(f"xks-proxy: destroyed key {info.key_id} in store {info.store!r}: its deletion date passed", file=sys.stderr)
        yield full_lifecycle(db, store.prefix, who, "cli")
    finally:
        db.close()


def _list(keys: "KeyLifecycle", args: argparse.Namespace) -> None:
    """One line per key, or (--json) an array of the objects `keys show` and the admin API give."""
    print_listing(keys.list(), args.json, _key_line)


def _key_line(info: dict[str, Any]) -> str:
    usage = ",".join(info["keyUsage"]) or "-"
    last = f"versions={info['versions']}" if "versions" in info else f"keySpec={info['keySpec']}"
    line = f"{info['keyId']}\t{info['keyStatus']}\t{usage}\t{last}"
    return line + (f"\tdeletion={info['deletionDate']}" if info.get("deletionDate") else "")


def _versions(keys: "KeyLifecycle", args: argparse.Namespace) -> dict[str, Any] | None:
    """The key's versions, each naming encryptions performed apart from encryptions reserved.

    The vault holds only reservations (`encryptionsReserved`, an upper bound for every server
    together); the encryptions performed are counted in a serving process's memory, so only the
    admin API can tell them (its `encryptionsPerformed`); the local vault's version objects have
    them null, unknown rather than zero. Printed as a table, or JSON (--json).
    """
    result = keys.versions(args.key_id)
    if args.json:
        return result
    print(f"key {result['keyId']} in store {result['store']}: encryptions per version")
    rows = [_version_row(version) for version in result["versions"]]
    print("\n".join(table(("VERSION", "STATE", "CREATED", "PERFORMED", "RESERVED"), rows)))
    if any(version["encryptionsPerformed"] is None for version in result["versions"]):
        print("performed: counted by a running server; ask it with --admin-url")
    return None


def _version_row(version: dict[str, Any]) -> tuple[str, ...]:
    """A version's cells: only the current version encrypts, every version decrypts."""
    performed = version["encryptionsPerformed"]
    return (
        str(version["version"]),
        "current" if version["current"] else "decrypt-only",
        version["created"] or "-",
        "unknown" if performed is None else str(performed),
        str(version["encryptionsReserved"]),
    )


def _get_import_params(keys: "KeyLifecycle", args: argparse.Namespace) -> dict[str, object]:
    """Write the wrapping public key (DER and PEM) and the import token, as KMS's console offers them."""
    from cryptography.hazmat.primitives import serialization

    params = keys.import_params(args.key_id, args.wrapping_algorithm, args.wrapping_key_spec)
    der = base64.b64decode(params["publicKey"])
    pem = serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"WrappingPublicKey.der": der, "WrappingPublicKey.pem": pem, "ImportToken": params["importToken"].encode() + b"\n"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    summary = {k: v for k, v in params.items() if k not in ("publicKey", "importToken")}
    return {**summary, "files": [str(out / name) for name in files]}


def _import(keys: "KeyLifecycle", args: argparse.Namespace) -> dict[str, object]:
    try:
        token = Path(args.import_token).read_text().strip()
        material = Path(args.encrypted_key_material).read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {getattr(exc, 'filename', None) or 'the import token'}: {exc}") from None
    return keys.import_material(args.key_id, token, material)


#: Each `keys` action: what it does on a KeyLifecycle, run by `_key_command`.
_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": _key_command(lambda keys, args: keys.create(args.key_id, args.usage, args.no_material)),
    "list": _key_command(_list),
    "show": _key_command(lambda keys, args: keys.show(args.key_id)),
    "disable": _key_command(lambda keys, args: keys.disable(args.key_id)),
    "enable": _key_command(lambda keys, args: keys.enable(args.key_id)),
    "rotate": _key_command(lambda keys, args: keys.rotate(args.key_id)),
    "versions": _key_command(_versions),
    "schedule-deletion": _key_command(lambda keys, args: keys.schedule_deletion(args.key_id, args.pending_days)),
    "cancel-deletion": _key_command(lambda keys, args: keys.cancel_deletion(args.key_id)),
    "get-import-params": _key_command(_get_import_params),
    "import": _key_command(_import),
}
