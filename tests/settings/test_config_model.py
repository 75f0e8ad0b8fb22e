"""The configuration's layout (issue 12): one typed model, each backend parsing its own section.

The messages and defaults are tested with the settings they belong to (test_access_config.py,
test_fleet_config.py, ...); this checks how the pieces fit, which those tests would not notice.
"""

from __future__ import annotations

from keymanager import registry
from tests.conftest import Home
from xks_proxy import config as configmod
from xks_proxy.settings import fields


def test_each_backend_parses_its_own_section(home: Home) -> None:
    cfg = configmod.load(home.path)
    assert registry.backend(cfg.backend).parse_section is not None
    assert type(cfg.backend_settings).__module__ == f"keymanager.{cfg.backend}.config"
    if cfg.backend == "vault":
        assert cfg.backend_settings is cfg.vault and cfg.pkcs11 is None
    else:  # [vault] is read on every backend (vault.dsn is the fleet switch), and is not a fleet here
        assert cfg.pkcs11 is cfg.backend_settings and cfg.vault.dsn is None


def test_every_backend_has_a_section_parser() -> None:
    assert all(registry.backend(name).parse_section is not None for name in registry.NAMES)


def test_one_error_class_whichever_module_raises_it() -> None:
    """Callers catch `configmod.ConfigError`; the backends' parsers raise the leaf's: the same class."""
    assert configmod.ConfigError is fields.ConfigError
