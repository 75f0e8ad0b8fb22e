"""`[[stores]]`: the logical key stores (prefix, regions, sealed credentials, key_ids, policy,
quota), and `with_stores`, which gives a configuration other stores and re-derives what follows
from them.

The same validation serves config.toml and a fleet's stores in its database
(`xks_proxy.fleet.shared_settings`), so every proxy accepts exactly what a single box would.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from typing import Any

from keymanager.crypto import Keyring
from xks_proxy.access.policy import Policy, PolicyError, compile_policy
from xks_proxy.settings import sections
from xks_proxy.settings.fields import ConfigError, get, int_range, only, table as subtable
from xks_proxy.settings.model import DEFAULT_QUOTA, Config, Credential, Quota, Store

PREFIX_RE = re.compile(r"^[a-zA-Z0-9_-]+(/[a-zA-Z0-9_-]+)*$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ACCESS_KEY_RE = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET_RE = re.compile(r"^[a-zA-Z0-9/+=]{43,64}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


def with_stores(config: Config, stores_raw: Any, where: str = "stores") -> Config:
    """`config` serving the `[[stores]]` tables `stores_raw`, validated as config.toml's are.

    (A fleet's stores come from its database; what derives from them, such as the default mTLS
    client names, is derived again here.)
    """
    try:
        stores = parse(stores_raw, config.keyring, default_quota(config.raw))
        tls = sections.tls(config.home, subtable(config.raw, "tls"), stores)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where != "stores" else str(exc)) from None
    return replace(config, stores=stores, tls=tls)


def default_quota(raw: dict[str, Any]) -> Quota:
    """`[throttle]` rate and burst: the quota of every store that sets none of its own."""
    return quota(subtable(raw, "throttle"), "throttle", DEFAULT_QUOTA)


def quota(table: dict[str, Any], where: str, default: Quota) -> Quota:
    """A token bucket; a rate given without a burst admits one second's worth at once."""
    rate = get(table, f"{where}.rate", "rate", float, default.rate)
    if not 0 <= rate <= 1e6:
        raise ConfigError(f"{where}.rate: must be between 0 (no quota) and 1000000 requests per second")
    default_burst = max(1, int(rate)) if "rate" in table else default.burst
    burst = int_range(table, f"{where}.burst", "burst", default_burst, 0, 10_000_000)
    if rate > 0 and burst < 1:
        raise ConfigError(f"{where}.burst: must be at least 1 when a rate is set")
    return Quota(rate=rate, burst=burst)


def validate_prefix(prefix: str, where: str = "prefix") -> str:
    if prefix and (len(prefix) > 117 or not PREFIX_RE.match(prefix)):
        raise ConfigError(
            f"{where}: {prefix!r} must be empty or up to 117 characters of [a-zA-Z0-9_-] in '/'-separated segments"
        )
    return prefix


def credential_context(access_key_id: str) -> str:
    """What a sealed secret is bound to: it opens only for this access key id."""
    return f"xks-proxy credential {access_key_id}"


def parse(raw: Any, master_key: Keyring | None, default: Quota) -> tuple[Store, ...]:
    """The `[[stores]]` tables; prefixes and access key ids must be unique across all of them."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stores: at least one [[stores]] table is required")
    stores: list[Store] = []
    seen_prefixes: set[str] = set()
    seen_keys: set[str] = set()
    for i, table in enumerate(raw):
        where = f"stores[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        prefix = validate_prefix(get(table, f"{where}.prefix", "prefix", str, None), f"{where}.prefix")
        if prefix in seen_prefixes:
            raise ConfigError(f"{where}.prefix: {prefix!r} is used by another store")
        seen_prefixes.add(prefix)
        regions = table.get("regions")
        if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
            raise ConfigError(f"{where}.regions: must be a non-empty list of region names")
        for region in regions:
            if not REGION_RE.match(region):
                raise ConfigError(f"{where}.regions: {region!r} is not an AWS region name")
        creds = _credentials(table.get("credentials"), f"{where}.credentials", master_key, seen_keys)
        stores.append(
            Store(
                prefix=prefix,
                regions=frozenset(regions),
                credentials=creds,
                key_ids=_key_ids(table, f"{where}.key_ids"),
                policy=_policy(table, where),
                quota=_store_quota(table, where, default),
            )
        )
    return tuple(stores)


def _policy(table: dict[str, Any], where: str) -> Policy:
    """`[[stores.policy]]` rules, compiled (see access/policy.py and docs/access-control.md)."""
    try:
        return compile_policy(table.get("policy", []), f"{where}.policy")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None


def _store_quota(table: dict[str, Any], where: str, default: Quota) -> Quota:
    """`[stores.throttle]`: this store's rate and burst, else the `[throttle]` defaults."""
    throttle = table.get("throttle", {})
    if not isinstance(throttle, dict):
        raise ConfigError(f"{where}.throttle: must be a table")
    only(throttle, f"{where}.throttle", ("rate", "burst"))
    return quota(throttle, f"{where}.throttle", default)


def _key_ids(table: dict[str, Any], where: str) -> frozenset[str] | None:
    """A store's optional allow-list of key ids (absent: every key the backend has)."""
    raw = table.get("key_ids")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{where}: must be a list of key ids")
    for key_id in raw:
        if not KEY_ID_RE.match(key_id):
            raise ConfigError(f"{where}: {key_id!r} is not 1-128 characters of [A-Za-z0-9._-]")
    return frozenset(raw)


def _credentials(raw: Any, where: str, master_key: Keyring | None, seen: set[str]) -> tuple[Credential, ...]:
    """SigV4 credentials; each secret is opened here, once, from its sealed form (not while sealed)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: at least one credential is required")
    creds = []
    for j, table in enumerate(raw):
        here = f"{where}[{j}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: must be a table")
        akid = get(table, f"{here}.access_key_id", "access_key_id", str, None)
        if not ACCESS_KEY_RE.match(akid):
            raise ConfigError(f"{here}.access_key_id: must be 20-30 characters of A-Z and 2-7")
        if akid in seen:
            raise ConfigError(f"{here}.access_key_id: {akid} is used by another credential")
        seen.add(akid)
        sealed = get(table, f"{here}.secret_access_key_sealed", "secret_access_key_sealed", str, None)
        created = created_at(table, here)
        if master_key is None:  # sealed home: the secret stays sealed, nothing can verify with it
            creds.append(Credential(access_key_id=akid, secret=None, created_at=created))
            continue
        try:
            secret = master_key.unseal_text(sealed, credential_context(akid))
        except ValueError as exc:
            raise ConfigError(f"{here}.secret_access_key_sealed: {exc}") from None
        if not SECRET_RE.match(secret):
            raise ConfigError(f"{here}.secret_access_key_sealed: the secret must be 43-64 characters of [a-zA-Z0-9/+=]")
        creds.append(Credential(access_key_id=akid, secret=secret, created_at=created))
    return tuple(creds)


def created_at(table: dict[str, Any], where: str) -> float | None:
    """A credential's `created_at` (ISO 8601 with its offset, as `credentials add` writes it), or None if absent."""
    text = table.get("created_at")
    if text is None:
        return None
    when = None
    if isinstance(text, str):
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            pass
    if when is None or when.tzinfo is None:
        raise ConfigError(f"{where}.created_at: must be a date and time with its offset, like 2026-01-31T12:00:00Z")
    return when.timestamp()
