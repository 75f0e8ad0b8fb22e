"""Each noun the CLI lists, as one JSON object wherever it appears, and the `--json` flag that asks for it.

A key and a key version are the lifecycle's own objects (`KeyInfo.to_json`, `VersionInfo.to_json`,
what the admin API answers too); a key store and a credential are built here, once, for
`stores list --json` and `credentials list --json` alike. A credential object never holds its
secret: only `stores add`, `credentials add` and `stores export` print one. Without `--json` a
listing is for a person: one line per object, or a table whose columns say what they count.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Iterable, Sequence

from keymanager.base import iso_time
from xks_proxy.config import Credential, Store

#: A credential's state: the newest is the one `stores export` gives KMS; older ones verify until removed.
CURRENT, ACCEPTED = "CURRENT", "ACCEPTED"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON array of objects (for scripts), not lines")


def credential_json(store: Store, credential: Credential) -> dict[str, Any]:
    """A credential without its secret: access key id, store, when made (null if not recorded), state."""
    return {
        "accessKeyId": credential.access_key_id,
        "store": store.prefix,
        "created": iso_time(credential.created_at),
        "state": CURRENT if credential is store.credentials[-1] else ACCEPTED,
    }


def store_json(store: Store) -> dict[str, Any]:
    """A key store as `stores list --json` shows it, with its credentials as `credentials list --json` does."""
    return {
        "prefix": store.prefix,
        "uriPath": store.uri_path,
        "regions": sorted(store.regions),
        "keyIds": None if store.key_ids is None else sorted(store.key_ids),
        "policyRules": len(store.policy.rules),
        "credentials": [credential_json(store, credential) for credential in store.credentials],
    }


def print_listing(items: Iterable[dict[str, Any]], as_json: bool, line: Callable[[dict[str, Any]], str]) -> None:
    """A JSON array of the objects, or one line per object (`line`) for people."""
    objects = list(items)
    if as_json:
        print(json.dumps(objects, indent=2))
        return
    for obj in objects:
        print(line(obj))


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows under named columns, aligned, so a person reads which number is which (scripts use --json)."""
    cells = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
