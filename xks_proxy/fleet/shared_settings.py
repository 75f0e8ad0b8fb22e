"""The settings a fleet shares through its vault database: the key stores.

With `[vault] dsn` the `[[stores]]` tables (prefix, regions, credentials with their secrets
sealed under the master key exactly as in config.toml, key_ids) are one TOML document in the
database's `settings` table, so every proxy of the fleet serves the same stores and
credentials. Each proxy takes a change up within `vault.refresh_seconds` (`xks_proxy.fleet.member`),
validating it exactly as config.toml is validated; an invalid document is refused with one log
line and the previous stores keep serving. Writers validate before they write, inside the
vault's writer lock, so two edits from two machines never lose each other.

`xks_proxy.config.load` calls `load_into`; this module builds on `xks_proxy.settings` (the model
and the stores' validation), never on `xks_proxy.config`, so the two do not import each other.
"""

from __future__ import annotations

import time
import tomllib
from contextlib import contextmanager
from typing import Any, Iterator

import tomli_w

from keymanager.base import SharedStorage
from keymanager.registry import backend
from xks_proxy.settings.fields import ConfigError
from xks_proxy.settings.model import Config
from xks_proxy.settings.stores import with_stores

STORES = "stores"
WHERE = "stores (in the vault database)"


def open_storage(config: Config) -> SharedStorage:
    """The fleet's shared database, through the backend's fleet capability (`vault.dsn`)."""
    fleet = backend(config.backend).fleet
    if fleet is None:  # config validation refuses vault.dsn on such a backend first
        raise ConfigError(f"keymanager.backend {config.backend!r} has no shared fleet storage")
    return fleet.shared_storage(config)


def parse(document: str) -> list[dict[str, Any]]:
    """The `[[stores]]` tables of a shared document (unvalidated)."""
    try:
        stores = tomllib.loads(document).get("stores", [])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{WHERE}: not valid TOML: {exc}") from None
    if not isinstance(stores, list):
        raise ConfigError(f"{WHERE}: must be a list of tables")
    return stores


def dump(stores: list[dict[str, Any]]) -> str:
    return tomli_w.dumps({"stores": stores})


def read(storage: SharedStorage) -> tuple[list[dict[str, Any]], int] | None:
    """(stores, revision) from the database, or None if no stores were ever put there."""
    if storage.schema_version() == 0:
        return None  # an empty database: `xks-proxy fleet init` has not run
    with storage.read() as tx:
        found = tx.setting(STORES)
    return (parse(found[0]), found[1]) if found else None


def apply(config: Config, stores: list[dict[str, Any]]) -> Config:
    """`config` serving these shared stores, validated as config.toml's (ConfigError otherwise)."""
    return with_stores(config, stores, WHERE)


def stores_raw(config: Config) -> list[dict[str, Any]]:
    """The fleet's `[[stores]]` tables as its vault database holds them (secrets sealed)."""
    storage = open_storage(config)
    try:
        found = read(storage)
    finally:
        storage.close()
    if found is None:
        raise ConfigError(
            f"stores: the vault database {storage.display} holds no key stores yet; run `xks-proxy fleet init` "
            "with a home whose config.toml has them"
        )
    return found[0]


def load_into(config: Config) -> Config:
    """`config` with the fleet's stores, read from its vault database."""
    return apply(config, stores_raw(config))


class StoresChanged(Exception):
    """The stores are no longer at the revision an edit started from."""


@contextmanager
def editing(config: Config, actor: str, expect_revision: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """Yield the shared stores to change in place; validate the result and write it, atomically.

    The read, the check and the write are one transaction under the vault's writer lock.
    Anything raised inside leaves the database unchanged. With `expect_revision`, raises
    StoresChanged unless the stores are still at that revision.
    """
    storage = open_storage(config)
    try:
        with storage.write() as tx:
            found = tx.setting(STORES)
            revision = found[1] if found else 0
            if expect_revision is not None and revision != expect_revision:
                raise StoresChanged(f"the key stores changed since revision {expect_revision} (now {revision})")
            stores = parse(found[0]) if found else []
            yield stores
            apply(config, stores)  # every proxy must accept what we write
            tx.put_setting(STORES, dump(stores), time.time(), actor)
    finally:
        storage.close()
