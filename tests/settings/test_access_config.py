"""The access-control sections of config.toml: defaults, overrides, and typos as ConfigErrors."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest

from tests.conftest import Home
from tests.support.proxy import edit_config
from xks_proxy.config import ConfigError, Quota

# Parsing does not depend on the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only


def test_defaults(home: Home) -> None:
    cfg = home.config
    assert cfg.throttle.max_in_flight == 256
    assert cfg.stores[0].quota == Quota(0.0, 0), "no per-store quota unless configured"
    assert cfg.tls.client_ca is None and cfg.tls.client_names == {"cks.kms.us-east-1.amazonaws.com"}
    assert not cfg.metrics.enabled
    assert cfg.audit.path == home.path / "audit.log" and cfg.audit.max_bytes == 100 * 1024 * 1024


def test_quota_defaults_and_overrides(home: Home) -> None:
    def configure(raw: dict[str, Any]) -> None:
        raw["throttle"] = {"rate": 100.0}
        raw["stores"][0]["regions"] = ["us-east-1", "eu-west-1"]
        raw["tls"] = {}
        raw["audit"] = {"path": ""}

    edit_config(home.path, configure)
    cfg = home.config
    assert cfg.stores[0].quota == Quota(100.0, 100), "a rate without a burst admits one second's worth"
    assert cfg.tls.client_names == {"cks.kms.us-east-1.amazonaws.com", "cks.kms.eu-west-1.amazonaws.com"}
    assert cfg.audit.path is None
    edit_config(home.path, lambda raw: raw["stores"][0].update(throttle={"burst": 7}))
    assert home.config.stores[0].quota == Quota(100.0, 7), "a store overrides what it sets, inherits the rest"


BAD: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (lambda raw: raw.update(throttle={"max_inflight": 3}), "throttle.max_inflight: unknown setting"),
    (lambda raw: raw.update(throttle={"rate": -1}), "throttle.rate"),
    (lambda raw: raw.update(throttle={"rate": "fast"}), "throttle.rate"),
    (lambda raw: raw.update(throttle={"rate": 5.0, "burst": 0}), "throttle.burst"),
    (lambda raw: raw["stores"][0].update(throttle={"rate": 1, "brust": 2}), "stores[0].throttle.brust: unknown setting"),
    (lambda raw: raw["stores"][0].update(throttle=5), "stores[0].throttle: must be a table"),
    (lambda raw: raw.update(tls={"client_ca": "missing.pem"}), "tls.client_ca: file"),
    (lambda raw: raw.update(tls={"client_names": []}), "tls.client_names"),
    (lambda raw: raw.update(tls={"client_names": ["not a name!"]}), "tls.client_names"),
    (lambda raw: raw.update(tls={"clientca": "x"}), "tls.clientca: unknown setting"),
    (lambda raw: raw.update(metrics={"enabled": "yes"}), "metrics.enabled"),
    (lambda raw: raw.update(metrics={"port": 70000}), "metrics.port"),
    (lambda raw: raw.update(audit={"max_bytes": 10}), "audit.max_bytes"),
    (lambda raw: raw.update(audit={"backup": 3}), "audit.backup: unknown setting"),
    (lambda raw: raw.update(audit="audit.log"), "audit: must be a table"),
]


@pytest.mark.parametrize("change, field", BAD, ids=[f for _, f in BAD])
def test_typos_are_config_errors(home: Home, change: Callable[[dict[str, Any]], None], field: str) -> None:
    edit_config(home.path, change)
    with pytest.raises(ConfigError, match=re.escape(field)):
        _ = home.config
