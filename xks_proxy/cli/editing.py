"""One edit of the key stores, as `stores` and `credentials` make it: locked, validated, written, audited.

Each command edits config.toml as one document: read the parsed TOML, change it, validate the
result exactly as the server will (`config.from_raw`), and only then replace the file
atomically (`home.write_config`), holding an exclusive lock so two commands cannot lose each
other's change. Sections the CLI does not know survive the round trip (comments do not: the
file is rewritten). A running server takes the change up within a second (reload.py).
In a fleet (`[vault] dsn`) the stores live in the vault database instead: the same edit is
validated and written there in one transaction (`shared_settings.editing`), and every proxy of
the fleet takes it up within 2 seconds (fleet/member.py).

Every change is written to the audit log (who, what, which access key id; never a secret).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
from contextlib import contextmanager
from typing import Any, Iterator

from xks_proxy import config as configmod
from xks_proxy.access import audit
from xks_proxy.cli.common import CommandError, actor
from xks_proxy.cli.home import write_config
from xks_proxy.config import Config


@contextmanager
def editing(args: argparse.Namespace) -> Iterator[tuple[Config, dict[str, Any]]]:
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

    with shared_settings.editing(local, actor()) as stores:
        raw = {**copy.deepcopy(local.raw), "stores": copy.deepcopy(stores)}
        yield shared_settings.apply(local, stores), raw
        stores[:] = raw["stores"]  # validated and written by shared_settings.editing


def audit_change(config: Config, action: str, **fields: object) -> None:
    """One audit record for a change this command made (after it is in config.toml, or a fleet's database).

    A store is named by its URI prefix (`store="demo"`), as in every other audit record.
    """
    audit.append_only(config.audit)
    audit.audit({"event": "access-admin", "action": action, "actor": actor(), "via": "cli", "outcome": "OK", **fields})


def store_index(config: Config, raw: dict[str, Any], prefix: str | None) -> int:
    """Where the store `prefix` (or the only one) is in raw["stores"]."""
    store = config.store(prefix)
    for i, table in enumerate(raw["stores"]):
        if table.get("prefix") == store.prefix:
            return i
    raise CommandError(f"no store with prefix {store.prefix!r}")  # unreachable: config came from raw


def uri_path(prefix: str) -> str:
    return f"/{prefix}/kms/xks/v1" if prefix else "/kms/xks/v1"
