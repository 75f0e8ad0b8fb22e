"""Reading one field of a TOML table, validated, and `ConfigError` naming the field when it is bad.

A leaf (it imports nothing of ours): every section parser uses it, including the backends' own
(`keymanager/<backend>/config.py`), which must not import the configuration's entry
(`xks_proxy.config` reaches the backends through the registry: that would be a cycle).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration problem, phrased as `field: what is wrong`."""


def table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The sub-table `name` of `raw` ({} if absent)."""
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table")
    return value


def get(table: dict[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
    """`table[key]` of type `kind` (an int is accepted as a float); `default` None means required."""
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: must be a {kind.__name__}")
    return value


def choice(table: dict[str, Any], where: str, key: str, options: tuple[str, ...], default: str) -> str:
    value = get(table, where, key, str, default)
    if value not in options:
        raise ConfigError(f"{where}: must be one of {', '.join(options)}")
    return value


def int_range(table: dict[str, Any], where: str, key: str, default: int, low: int, high: int) -> int:
    value = get(table, where, key, int, default)
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be between {low} and {high}")
    return value


def float_range(table: dict[str, Any], where: str, key: str, default: float, low: float, high: float) -> float:
    value = get(table, where, key, float, default)
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be between {low:g} and {high:g}")
    return value


def file(home: Path, table: dict[str, Any], where: str, key: str, default: str | None) -> Path | None:
    """An existing file, relative to the home; None when not set (or set to "")."""
    value = table.get(key, default)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a path")
    path = (home / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: file {path} does not exist")
    return path


def owner_only(path: Path, where: str) -> Path:
    """`path`, refused if others may read or write it: it holds a secret (a PIN, a DSN's password)."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{where}: {path} is readable or writable by others; chmod 600 it")
    return path


def only(table: dict[str, Any], where: str, names: tuple[str, ...]) -> None:
    """A misspelt setting must not be silently ignored."""
    for key in table:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown setting (expected one of {', '.join(names)})")
