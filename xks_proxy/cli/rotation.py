"""`xks-proxy vault rekey` and `vault rotate-master-key`: changing what guards the keys, while serving.

rekey: a new seal (new shares, a new passphrase, another kind) for the same master keys: one
atomic write of the seal record. Serving proxies hold the same master keys and see no change.

rotate-master-key: a new master key, in steps that each commit whole, so a SIGKILL at any
instant leaves a home that opens and serves every key, and running the command again finishes:
  1. the record names the new key current and keeps the old one (a rotation in progress);
     from here every process seals anything new under the new key (`Keyring.seal` follows
     the record), and both keys open;
  2. the backend re-seals everything under the new key in ONE transaction (a fleet's shared
     stores' credentials in the same one); serving processes reload on its commit and adopt the
     new key from the record when a blob no longer opens under the keys they hold;
  3. config.toml's credentials re-sealed (one atomic file replace);
  4. a final sweep (nothing left, normally) and the record keeps only the new key (a fleet: in
     the sweep's transaction).
A home from before seals (master.key is the master key) is first given a record of the file
seal whose key file is master.key: master.key then opens the record, and backups made before
still open with it.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

from keymanager.base import KeyRefused, audit
from keymanager.crypto import Kek, Keyring, MasterKey
from keymanager.seal.home import open_with, record_store
from keymanager.seal.kinds import file_kek
from keymanager.seal.record import SealError, SealRecord, wrap_all
from xks_proxy import config as configmod
from xks_proxy.cli.common import CommandError, actor
from xks_proxy.cli.secrets_input import open_kek
from xks_proxy.settings.stores import credential_context

LEGACY_KEY_FILE = "master.key"


def add_parsers(vault: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from xks_proxy.cli.serve import seal_arguments

    rekey = vault.add_parser(
        "rekey", parents=[common], help="a new seal (shares, passphrase or kind) for the same master key; needs the current one"
    )
    seal_arguments(rekey)
    current_seal_arguments(rekey)
    rekey.set_defaults(func=cmd_rekey)
    rotate = vault.add_parser(
        "rotate-master-key", parents=[common], help="a new master key, everything re-sealed under it while serving (resumable)"
    )
    current_seal_arguments(rotate)
    rotate.set_defaults(func=cmd_rotate)


def current_seal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--current-passphrase-file", help="passphrase seal: the CURRENT passphrase from this file (else stdin/a prompt)")
    parser.add_argument("--current-passphrase-env", help="passphrase seal: the NAME of an environment variable holding the current one")


def open_home(home: Path, dsn: str | None, record: SealRecord | None, given: Keyring | None, args: argparse.Namespace) -> Keyring:
    """The home's keyring: as it opened by itself (`given`), else from a person (shares, passphrase)."""
    if given is not None:
        return given
    if record is None:
        raise CommandError("this home has neither a seal record nor a master key")
    try:
        kek = open_kek(record, getattr(args, "current_passphrase_file", None), getattr(args, "current_passphrase_env", None))
        return open_with(home, dsn, record, kek)
    except SealError as exc:
        raise CommandError(str(exc)) from None


def _base(args: argparse.Namespace) -> tuple[Path, configmod.Config, Any, SealRecord | None]:
    home = configmod.home_dir(args.home)
    base = configmod.load(home, shared=False)  # this node's settings; the keyring if the seal opens by itself
    store = record_store(home, base.vault.dsn)
    try:
        return home, base, store, store.read()
    except SealError as exc:
        raise CommandError(str(exc)) from None


# --- rekey --------------------------------------------------------------------------------------


def cmd_rekey(args: argparse.Namespace) -> int:
    from keymanager.seal.kinds import make, open_keyring
    from xks_proxy.cli.serve import hand_out, new_seal

    home, base, store, record = _base(args)
    keyring = open_home(home, base.vault.dsn, record, base.keyring, args)
    if args.seal == "file":  # init's file seal keeps the master key in clear; a rekey makes a key file
        try:
            seal = make("file", key_file=_free_name(home, "seal.key"))
        except (SealError, OSError) as exc:
            raise CommandError(f"cannot make the file seal's key file: {exc}") from None
    else:
        seal = new_seal(args)
    assert seal is not None
    masters = [keyring.master(kid) for kid in keyring.key_ids]
    new = SealRecord(seal.kind, seal.params, keyring.current.key_id, wrap_all(seal.kek, masters), dict(record.links) if record else {})
    hand_out(seal, args.share_dir)  # before the record changes: shares nobody holds would lock the vault
    _replace(store, record, new)
    try:
        open_keyring(store.read(), seal.kek)  # verify what was written opens, before removing anything
    except SealError as exc:
        raise CommandError(f"the new seal record does not open after writing it: {exc}") from None
    removed = _after_rekey(home, record)
    audit({"event": "seal", "action": "rekey", "actor": actor(), "seal": seal.kind, "outcome": "OK"})
    print(json.dumps({"seal": seal.kind, "masterKeys": len(masters), "record": store.display, "removed": removed}, indent=2))
    return 0


def _free_name(home: Path, name: str) -> Path:
    path, n = home / name, 1
    while path.exists():
        n += 1
        path = home / f"{Path(name).stem}-{n}{Path(name).suffix}"
    return path


def _after_rekey(home: Path, old: SealRecord | None) -> list[str]:
    """What no longer guards the home: the old key file (and, from before seals, `[master_key]`)."""
    from xks_proxy.cli.home import write_config

    removed: list[str] = []
    if old is None:
        raw = configmod.read_raw(home)
        if raw.pop("master_key", None) is not None:
            write_config(home, raw)
            removed.append("config.toml [master_key]")
        old_file = LEGACY_KEY_FILE
    elif old.kind == "file":
        old_file = str(old.params.get("file", LEGACY_KEY_FILE))
    else:
        return removed
    path = home / old_file  # this home's only: a fleet's other homes are the operator's (docs/rotation.md)
    if path.exists():
        path.unlink()
        removed.append(old_file)
    return removed


# --- rotate-master-key --------------------------------------------------------------------------


def cmd_rotate(args: argparse.Namespace) -> int:
    from keymanager.registry import backend

    home, base, store, record = _base(args)
    dsn = base.vault.dsn
    if record is None:
        assert base.keyring is not None  # no record: the legacy master key opened it
        record = _convert_legacy(home, store, base.keyring)
        keyring = open_with(home, dsn, record, Kek.of_master(base.keyring.current))
    else:
        keyring = open_home(home, dsn, record, base.keyring, args)
    resumed = bool(record.retiring)
    if not resumed:  # step 1
        new = MasterKey.generate()
        started = record
        record = record.with_keys(
            new.key_id, {**record.keys, new.key_id: keyring.kek.wrap(new)}, {**record.links, new.key_id: keyring.link(new)}
        )
        _replace(store, started, record)
    keyring.adopt(record.current, record.keys, record.links)
    config = configmod.load(home, keyring=keyring)
    reseal = backend(config.backend).reseal
    shared = _SharedStores(keyring) if dsn is not None else None
    counts: dict[str, int] = {}
    try:
        if reseal is not None:  # step 2
            counts = reseal(config, keyring, shared)
        if dsn is None:  # step 3
            counts["credentials"] = _reseal_config(home, keyring)
        # The link (the new key sealed under the old) lets running proxies opened before a rekey
        # adopt the new key; it must not outlive the rotation, or whoever holds the old key (the
        # reason to rotate) would read the new one from the record. Give them time to reload first.
        time.sleep(_link_grace(config))
        final = record.with_keys(record.current, {record.current: record.keys[record.current]}, links={})
        if reseal is not None:  # step 4: a last sweep, and for a fleet the record in its transaction
            swept = reseal(config, keyring, shared.then_write(store, record, final) if shared else None)
            leftover = sum(v for k, v in swept.items() if k != "recordWritten")
            counts = {k: counts.get(k, 0) + swept.get(k, 0) for k in counts}
            if leftover:
                counts["sweptAfter"] = leftover
        if shared is None:
            _replace(store, record, final)
    except (KeyRefused, SealError) as exc:
        raise CommandError(str(exc)) from None
    keyring.adopt(final.current, final.keys, final.links)
    audit({"event": "seal", "action": "rotate-master-key", "actor": actor(), "masterKeyId": final.current, "outcome": "OK"})
    print(json.dumps({"masterKeyId": final.current, "retired": list(record.retiring), "resumed": resumed, "resealed": counts}, indent=2))
    return 0


def _link_grace(config: configmod.Config) -> float:
    """Seconds for every serving process to see step 2 (a vault reload) and adopt the new key."""
    return 2 * config.vault.refresh_seconds + 1.0


def _convert_legacy(home: Path, store: Any, keyring: Keyring) -> SealRecord:
    """A home from before seals as the file seal whose key file is master.key (which then guards the record)."""
    master = keyring.current
    try:
        kek = file_kek(home, None, LEGACY_KEY_FILE)
        same = MasterKey.from_text((home / LEGACY_KEY_FILE).read_text()).key_id == master.key_id
    except (SealError, OSError, ValueError):
        same = False
    if not same:
        raise CommandError(f"rotating needs this home's master key in {home / LEGACY_KEY_FILE} (it becomes the file seal's key)")
    record = SealRecord("file", {"file": LEGACY_KEY_FILE}, master.key_id, wrap_all(kek, [master]))
    _replace(store, None, record)
    return record


def _replace(store: Any, expected: SealRecord | None, record: SealRecord) -> None:
    """The record replaced only if it is still the one this command read (one line otherwise)."""
    try:
        store.replace(expected, record)
    except SealError as exc:
        raise CommandError(str(exc)) from None


def reseal_stores(stores: list[dict[str, Any]], keyring: Keyring) -> int:
    """Re-seal every credential secret of `[[stores]]` tables in place; how many changed."""
    changed = 0
    for table in stores:
        for cred in table.get("credentials", []) if isinstance(table, dict) else []:
            sealed = cred.get("secret_access_key_sealed") if isinstance(cred, dict) else None
            if not sealed:
                continue
            context = credential_context(str(cred.get("access_key_id")))
            try:
                new = keyring.reseal(base64.b64decode(sealed, validate=True), context)
            except ValueError:
                raise CommandError(f"the credential {cred.get('access_key_id')} opens under none of the master keys") from None
            if new is not None:
                cred["secret_access_key_sealed"] = base64.b64encode(new).decode()
                changed += 1
    return changed


def _reseal_config(home: Path, keyring: Keyring) -> int:
    from xks_proxy.cli.home import write_config

    raw = configmod.read_raw(home)
    changed = reseal_stores(raw.get("stores", []), keyring)
    if changed:
        write_config(home, raw)
    return changed


class _SharedStores:
    """A fleet's stores (credentials sealed) in the vault database, re-sealed inside the vault's transaction."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def __call__(self, tx: Any) -> dict[str, int]:
        from xks_proxy.fleet import shared_settings

        found = tx.setting(shared_settings.STORES)
        if not found:
            return {"credentials": 0}
        stores = shared_settings.parse(found[0])
        changed = reseal_stores(stores, self._keyring)
        if changed:  # a new revision: every proxy takes the stores up again
            tx.put_setting(shared_settings.STORES, shared_settings.dump(stores), time.time(), actor())
        return {"credentials": changed}

    def then_write(self, store: Any, expected: SealRecord, record: SealRecord) -> Any:
        def step(tx: Any) -> dict[str, int]:
            counts = self(tx)
            store.replace(expected, record, tx=tx)
            return {**counts, "recordWritten": 1}

        return step
