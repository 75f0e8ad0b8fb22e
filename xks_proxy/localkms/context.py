"""What every operation of the local KMS works with: its state, its keyring, its region and account.

One `Local` per running service (and per `local-kms principal add`). Operations are plain
functions of (Local, caller, request) so each noun's module stays free of HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

from keymanager.crypto import DataKey, Keyring
from xks_proxy.localkms.state import State


@dataclass(frozen=True)
class Caller:
    """An authenticated principal, and what KMS would pass on about the call."""

    access_key_id: str
    arn: str
    request_id: str
    via_service: str | None = None


@dataclass
class Local:
    state: State
    keyring: Keyring
    region: str = "us-east-1"
    account: str = "111122223333"
    ca_bundle: str | None = None
    #: open XKS clients by custom key store id (closed on disconnect, update and shutdown)
    clients: dict[str, Any] = field(default_factory=dict)
    #: one lock per custom key store: a change and its proxy call are one step for other requests
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, store_id: str) -> asyncio.Lock:
        return self.locks.setdefault(store_id, asyncio.Lock())

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:{name}"

    def seal(self, secret: bytes, context: str) -> str:
        return base64.b64encode(self.keyring.seal(secret, "local-kms " + context)).decode()

    def unseal(self, sealed: str, context: str) -> bytes:
        return self.keyring.unseal(base64.b64decode(sealed), "local-kms " + context)

    def new_key(self, context: str) -> str:
        """Fresh AES-256 key material, sealed (the bytes stay in keymanager.crypto)."""
        sealed, _ = self.keyring.seal_new_key("local-kms " + context)
        return base64.b64encode(sealed).decode()

    def data_key(self, sealed: str, context: str) -> DataKey:
        return self.keyring.data_key(base64.b64decode(sealed), "local-kms " + context)


def now() -> float:
    return round(time.time(), 3)


def page(items: list[Any], limit: int | None, marker: str | None) -> tuple[list[Any], dict[str, Any]]:
    """One page of a list operation, and its Truncated/NextMarker fields (the marker is an offset)."""
    from xks_proxy.localkms.errors import KmsApiError

    start = 0
    if marker is not None:
        if not marker.isdigit() or int(marker) > len(items):
            raise KmsApiError("InvalidMarkerException", "the marker does not come from a previous response")
        start = int(marker)
    end = start + (limit or 100)
    more = {"Truncated": end < len(items)}
    if end < len(items):
        more["NextMarker"] = str(end)
    return items[start:end], more
