"""The `[vault]` section: where the vault keeps its keys (an SQLite file, or a fleet's PostgreSQL
database), how fast serving processes see changes, and when key versions rotate.

Parsed by the vault backend itself (`Backend.parse_section`), so the proxy's configuration never
imports PostgreSQL helpers; `Config.vault` holds the result. The DSN may carry a password (from
`dsn_file` or `$dsn_env`): it is never in config.toml, in a message, or in a repr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xks_proxy.settings.fields import ConfigError, file, get, int_range, owner_only, table as subtable


@dataclass(frozen=True, slots=True)
class VaultConfig:
    path: Path
    refresh_seconds: float = 0.5
    #: A key version gets a successor before it exceeds this many encryptions (AES-GCM limit: 2^32).
    rotate_after_encryptions: int = 1 << 31
    #: Encryptions a server reserves in the vault at a time (what a crash can leave counted but unused).
    count_block: int = 1 << 16
    #: PostgreSQL connection string of a vault shared by a fleet; None: the SQLite file at `path`.
    #: It may hold a password (from dsn_file or dsn_env): never print it, use `dsn_display`.
    dsn: str | None = field(default=None, repr=False)

    @property
    def dsn_display(self) -> str:
        from keymanager.vault.postgres import display_dsn

        return display_dsn(self.dsn) if self.dsn else str(self.path)


def parse_vault(home: Path, raw: dict[str, Any]) -> VaultConfig:
    """The `[vault]` table of the document `raw` (defaults when absent)."""
    table = subtable(raw, "vault")
    path = get(table, "vault.path", "path", str, "vault.db")
    refresh = get(table, "vault.refresh_seconds", "refresh_seconds", float, 0.5)
    if not 0.05 <= refresh <= 2.0:
        raise ConfigError("vault.refresh_seconds: must be between 0.05 and 2 (changes must show within 2 s)")
    return VaultConfig(
        dsn=_dsn(home, table),
        path=(home / path).resolve(),
        refresh_seconds=refresh,
        rotate_after_encryptions=int_range(
            table, "vault.rotate_after_encryptions", "rotate_after_encryptions", 1 << 31, 1, 1 << 32
        ),
        count_block=int_range(table, "vault.count_block", "count_block", 1 << 16, 1, 1 << 24),
    )


def _dsn(home: Path, table: dict[str, Any]) -> str | None:
    """The PostgreSQL connection string of a shared vault, from dsn, dsn_file (owner-only) or $dsn_env.

    A password may sit in the file or the environment, never in config.toml (nor in any message).
    """
    given = [name for name in ("dsn", "dsn_file", "dsn_env") if name in table]
    if len(given) > 1:
        raise ConfigError(f"vault.{given[1]}: give only one of dsn, dsn_file or dsn_env")
    if not given:
        return None
    where = f"vault.{given[0]}"
    if given[0] == "dsn":
        text = get(table, where, "dsn", str, None)
    elif given[0] == "dsn_file":
        path = file(home, table, where, "dsn_file", None)
        if path is None:
            raise ConfigError(f"{where}: must name a file")
        text = owner_only(path, where).read_text().strip()
    else:
        name = get(table, where, "dsn_env", str, None)
        text = os.environ.get(name, "").strip()
        if not text:
            raise ConfigError(f"{where}: the environment variable {name} is not set")
    if not text.strip():
        raise ConfigError(f"{where}: is empty")
    from keymanager.vault.postgres import check_dsn  # psycopg's parser: only when a DSN is given

    try:
        params = check_dsn(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if given[0] == "dsn" and params.get("password"):
        raise ConfigError(
            "vault.dsn: holds a password, which config.toml must not; put the DSN in a file named by "
            "vault.dsn_file (chmod 600) or in the environment variable named by vault.dsn_env, or use ~/.pgpass"
        )
    return text.strip()
