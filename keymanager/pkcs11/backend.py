"""The PKCS#11 backend's registry entry: keys live in the HSM, which keeps their state itself.

No optional capabilities: the HSM has no key versions, scheduled deletion or import tokens of
ours (the CLI offers what `Pkcs11Admin` can do), its backups are the HSM vendor's, and a fleet
of proxies simply shares the HSM cluster. Its `[pkcs11]` section is its own
(`keymanager/pkcs11/config.py`); `Config.backend_settings` carries it back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymanager.base import Backend, KeyAdmin, KeyManager

if TYPE_CHECKING:
    from keymanager.pkcs11.config import Pkcs11Config
    from xks_proxy.settings.model import Config


def _parse_section(home: Path, raw: dict[str, Any]) -> "Pkcs11Config":
    from keymanager.pkcs11.config import parse_pkcs11

    return parse_pkcs11(home, raw)


def _key_manager(config: "Config") -> KeyManager:
    from keymanager.pkcs11.manager import Pkcs11KeyManager

    assert config.backend_settings is not None
    return Pkcs11KeyManager(config.backend_settings)


def _key_admin_for(settings: Any) -> KeyAdmin:
    """Log in to the token `settings` (a `[pkcs11]` section, parsed) names."""
    from keymanager.pkcs11.admin import Pkcs11Admin

    return Pkcs11Admin(settings)


def _key_admin(config: "Config") -> KeyAdmin:
    assert config.backend_settings is not None
    return _key_admin_for(config.backend_settings)


BACKEND = Backend(
    name="pkcs11",
    parse_section=_parse_section,
    key_manager=_key_manager,
    key_admin=_key_admin,
    key_admin_for=_key_admin_for,
)
