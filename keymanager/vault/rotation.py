"""A master key rotation's vault step: every sealed blob re-sealed under the keyring's current key.

Why one transaction: the vault must open under exactly one master key at any instant (a
SIGKILL mid-way leaves it all under the old key, or all under the new), and serving processes
reload on the generation the commit bumps, so they meet one consistent set of blobs. Blobs
already under the current key are left alone (`Keyring.reseal` says None), so running it again
after an interruption, or as the final sweep, changes nothing more.

Sealed here: key material of every version (bound to store, key id and version), import
parameters' RSA wrapping keys, and the vault secrets (the import-token signing key). The row
'seal' of `vault_secrets` is a fleet's seal record, not sealed under the master key: skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from keymanager.vault.byok import _SIGNER_SECRET, _signer_context, _wrapping_context
from keymanager.vault.model import VaultError, material_context
from keymanager.vault.rows import DUMP_TABLES

if TYPE_CHECKING:
    from keymanager.crypto import Keyring

SEAL_ROW = "seal"
_SECRET_CONTEXTS = {_SIGNER_SECRET: _signer_context()}


def _col(table: str, name: str) -> int:
    return DUMP_TABLES[table].index(name)


def reseal_tx(tx: Any, keyring: "Keyring") -> dict[str, int]:
    """Re-seal every sealed column of the vault inside `tx`. VaultError names a blob no key opens."""
    counts = {"keyVersions": 0, "importParams": 0, "vaultSecrets": 0}
    dump = tx.dump()
    s, k, v, b = (_col("key_versions", c) for c in ("store", "key_id", "version", "sealed"))
    for row in dump["key_versions"]:
        new = _reseal(keyring, bytes(row[b]), material_context(row[s], row[k], row[v]), f"key {row[s]}/{row[k]} v{row[v]}")
        if new is not None:
            tx.update_sealed("key_versions", (row[s], row[k], row[v]), new)
            counts["keyVersions"] += 1
    p, s, k, b = (_col("import_params", c) for c in ("params_id", "store", "key_id", "sealed_private"))
    for row in dump["import_params"]:
        new = _reseal(keyring, bytes(row[b]), _wrapping_context(row[s], row[k], row[p]), f"import parameters of {row[s]}/{row[k]}")
        if new is not None:
            tx.update_sealed("import_params", (row[p],), new)
            counts["importParams"] += 1
    for name, sealed, _ in dump["vault_secrets"]:
        if name == SEAL_ROW:
            continue
        if name not in _SECRET_CONTEXTS:
            raise VaultError(f"the vault secret {name!r} is unknown to this xks-proxy; refusing to rotate around it")
        new = _reseal(keyring, bytes(sealed), _SECRET_CONTEXTS[name], f"the vault secret {name!r}")
        if new is not None:
            tx.update_sealed("vault_secrets", (name,), new)
            counts["vaultSecrets"] += 1
    return counts


def _reseal(keyring: "Keyring", blob: bytes, context: str, what: str) -> bytes | None:
    try:
        return keyring.reseal(blob, context)
    except ValueError:
        raise VaultError(f"{what} opens under none of the keyring's master keys; the rotation stops, nothing changed") from None


def reseal_vault(path: Path, keyring: "Keyring", dsn: str | None, also: Callable[[Any], dict[str, int]] | None) -> dict[str, int]:
    """The vault at `path` (or `dsn`) re-sealed in one write transaction, with `also(tx)` in it."""
    from keymanager.vault.db import VaultDB

    db = VaultDB.open(path, keyring, dsn)
    try:
        with db.storage.write() as tx:  # bumps the generation: every serving process reloads
            counts = reseal_tx(tx, keyring)
            if also is not None:
                counts.update(also(tx))
    finally:
        db.close()
    return counts
