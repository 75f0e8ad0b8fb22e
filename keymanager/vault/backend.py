"""The vault backend's registry entry: what the proxy builds from it, and its capabilities.

The vault has them all: a full key lifecycle (versions, scheduled deletion, BYOK import), a home
of its own (the SQLite file `vault.db`), consistent backups, and a fleet mode (the same tables in
PostgreSQL, shared by several proxies). Everything here is a thin factory; heavy modules (psycopg)
are imported only when a capability is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymanager.base import Backend, KeyAdmin, KeyLifecycle, KeyManager, KeyRefused, SharedStorage

if TYPE_CHECKING:
    from keymanager.crypto import MasterKey
    from keymanager.vault.db import VaultDB
    from xks_proxy.config import Config

INTERNAL_STORE = "#internal"  # as keymanager.vault.model.INTERNAL_STORE (kept light: no import of it here)
VAULT_FILE = "vault.db"


def _parse_section(home: Path, raw: dict[str, Any]) -> Any:
    from keymanager.vault.config import parse_vault

    return parse_vault(home, raw)


def _key_manager(config: "Config") -> KeyManager:
    from keymanager.vault.manager import VaultKeyManager

    vault = config.vault
    return VaultKeyManager(
        vault.path,
        config.master_key,
        vault.refresh_seconds,
        rotate_after=vault.rotate_after_encryptions,
        count_block=vault.count_block,
        dsn=vault.dsn,
    )


def _key_admin(config: "Config") -> KeyAdmin:
    from keymanager.vault.db import VaultDB
    from xks_proxy.settings.fields import ConfigError

    if config.vault.dsn is None and not config.vault.path.is_file():
        raise ConfigError(f"vault.path: file {config.vault.path} does not exist")
    return VaultDB.open(config.vault.path, config.master_key, config.vault.dsn)


def _lifecycle(admin: Any, store: str, actor: str, via: str) -> KeyLifecycle:
    from keymanager.vault.lifecycle import VaultLifecycle

    return VaultLifecycle(admin, store, actor, via)


def _init_home(home: Path, master_key: "MasterKey") -> dict[str, Any]:
    """A new, empty vault (schema and internal health key) and the sections that name it."""
    from keymanager.vault.db import VaultDB

    VaultDB.create(home / VAULT_FILE, master_key).close()
    return {"keymanager": {"backend": "vault"}, "vault": {"path": VAULT_FILE, "refresh_seconds": 0.5}}


class _Backup:
    """`xks-proxy vault backup|restore`: the vault as one SQLite file (online backup API)."""

    file_name = VAULT_FILE

    def snapshot(self, config: "Config") -> bytes:
        from keymanager.vault.db import VaultDB

        db = VaultDB.open(config.vault.path, config.master_key, config.vault.dsn)
        try:
            db.sweep(actor="cli:vault-backup")
            return db.snapshot()
        finally:
            db.close()

    def check_restored(self, config: "Config", cancel_deletions: bool) -> dict[str, Any]:
        from keymanager.base import iso_time
        from keymanager.vault.db import PENDING_DELETION, VaultDB
        from keymanager.vault.lifecycle import VaultLifecycle

        db = VaultDB(config.vault.path, config.master_key)
        try:
            _, keys = db.load()
            if not any(k.versions for (store, _), k in keys.items() if store == INTERNAL_STORE):
                raise KeyRefused("the master key does not open the restored vault (another home's key?)")
            unreadable = [f"{s}/{k}" for (s, k), key in keys.items() if key.current is not None and key.current not in key.versions]
            if unreadable:
                raise KeyRefused(f"key material of {', '.join(unreadable)} does not open under this master key")
            pending = []
            for store in config.stores:
                for info in db.keys(store.prefix):
                    if info.state != PENDING_DELETION:
                        continue
                    if cancel_deletions:
                        VaultLifecycle(db, store.prefix, "cli:vault-restore", "cli").cancel_deletion(info.key_id)
                    pending.append({"keyId": info.key_id, "store": store.prefix, "deletionDate": iso_time(info.deletion_date)})
            count = sum(1 for (store, _) in keys if store != INTERNAL_STORE)
        finally:
            db.close()
        return {"keys": count, ("deletionCancelled" if cancel_deletions else "pendingDeletion"): pending}


class _Fleet:
    """Several proxies on one vault in PostgreSQL (`vault.dsn`)."""

    def shared_storage(self, config: "Config") -> SharedStorage:
        from keymanager.vault.postgres import PostgresStorage

        assert config.vault.dsn is not None
        return PostgresStorage(config.vault.dsn)

    def seal_record(self, dsn: str) -> "_DatabaseRecord":
        return _DatabaseRecord(dsn)

    def move_into(self, config: "Config", copy_local: bool) -> int:
        from keymanager.vault.db import VaultDB

        db = VaultDB.open(config.vault.path, config.master_key, config.vault.dsn)
        try:
            return _copy_local_vault(config, db) if copy_local else 0
        finally:
            db.close()


class _DatabaseRecord:
    """A fleet's seal record: the row `seal` of vault_secrets (every proxy unseals with the same shares).

    Holds no connection between calls: it is read at start, at unseal and when a rotation shows.
    """

    NAME = "seal"

    def __init__(self, dsn: str) -> None:
        from keymanager.vault.postgres import display_dsn

        self._dsn = dsn
        self.display = f"the seal record in {display_dsn(dsn)}"

    def read(self) -> Any:
        from keymanager.seal.record import SealRecord
        from keymanager.vault.postgres import PostgresStorage

        storage = PostgresStorage(self._dsn)
        try:
            if storage.schema_version() == 0:  # no vault in this database yet (before `fleet init`)
                return None
            with storage.read() as tx:
                data = tx.secret(self.NAME)
        finally:
            storage.close()
        return None if data is None else SealRecord.from_bytes(bytes(data), self.display)

    def replace(self, expected: Any, record: Any, tx: Any = None) -> None:
        """Write `record` only if the row still holds `expected` (SealError otherwise): read and
        written under the vault's writer lock, so a rekey and a rotation never overwrite each other."""
        import time

        from keymanager.seal.record import CHANGED, SealError, SealRecord

        def swap(own: Any) -> None:
            data = own.secret(self.NAME)
            if (None if data is None else SealRecord.from_bytes(bytes(data), self.display)) != expected:
                raise SealError(CHANGED)
            own.replace_secret(self.NAME, record.to_bytes(), time.time())

        if tx is not None:
            swap(tx)
            return
        from keymanager.vault.postgres import PostgresStorage

        storage = PostgresStorage(self._dsn)
        try:
            with storage.write() as own:
                swap(own)
        finally:
            storage.close()

    def write(self, record: Any, tx: Any = None) -> None:
        """Replace the record, in `tx` (a rotation's transaction) or a transaction of its own."""
        import time

        if tx is not None:
            tx.replace_secret(self.NAME, record.to_bytes(), time.time())
            return
        from keymanager.vault.postgres import PostgresStorage

        storage = PostgresStorage(self._dsn)
        try:
            with storage.write() as own:
                own.replace_secret(self.NAME, record.to_bytes(), time.time())
        finally:
            storage.close()


def _copy_local_vault(config: "Config", db: "VaultDB") -> int:
    """The local vault's keys into the (empty) database; nothing if they are there already."""
    from keymanager.vault.db import VaultDB

    if not config.vault.path.is_file():
        return 0
    local = VaultDB(config.vault.path, config.master_key)
    try:
        mine = _key_names(local)
        if not mine:
            return 0
        theirs = _key_names(db)
        if mine <= theirs:
            return 0  # a second run: copied before
        if theirs:
            raise KeyRefused(
                f"the database already holds {len(theirs)} other key(s); the {len(mine)} key(s) of {config.vault.path} "
                "are copied only into an empty one (--skip-local-vault leaves them out)"
            )
        return db.copy_keys_from(local)
    finally:
        local.close()


def _key_names(db: "VaultDB") -> set[tuple[str, str]]:
    _, keys = db.load()
    return {name for name in keys if name[0] != INTERNAL_STORE}


def _reseal(config: "Config", keyring: Any, also: Any) -> dict[str, int]:
    from keymanager.vault.rotation import reseal_vault

    return reseal_vault(config.vault.path, keyring, config.vault.dsn, also)


BACKEND = Backend(
    name="vault",
    parse_section=_parse_section,
    key_manager=_key_manager,
    key_admin=_key_admin,
    lifecycle=_lifecycle,
    init_home=_init_home,
    backup=_Backup(),
    fleet=_Fleet(),
    reseal=_reseal,
)
