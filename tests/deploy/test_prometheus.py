"""deploy/prometheus (alert rules and their promtool unit tests) and deploy/grafana (the dashboard).

The rules and the dashboard must name only metrics a real proxy exports: both are checked
against what real proxies serve on /metrics, so a renamed metric cannot leave an alert that
silently never fires.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import aiohttp
from keymanager.base import iso_time
from tests.access.test_metrics import served_with_metrics
from tests.conftest import Home, need
from tests.support import ROOT
from tests.support.proxy import edit_config, eventually, running

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "xks-proxy.rules.yml"
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "xks-proxy.json"

#: Series Prometheus makes itself, not the proxy: `up` of each scrape target.
PROMETHEUS_OWN = {"up"}
#: The sample names a family of each type exposes (prometheus_client's text format).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
#: Words of PromQL that look like names.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # A variable's label_values(<selector>, <label>): the selector is PromQL, the label is not.
    queries = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query) for query in queries]


def metric_names(exprs: Iterable[str]) -> set[str]:
    """The series names PromQL expressions select (strings, label matchers, ranges and groupings dropped)."""
    names: set[str] = set()
    for expr in exprs:
        bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)', " ", expr)
        for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", bare):
            if match[2] is None and match[1] not in PROMQL_WORDS:
                names.add(match[1])
    return names


def exported(text: str) -> set[str]:
    """Every sample name a /metrics page declares (a family without samples yet still declares its names)."""
    return {f.name + suffix for f in text_string_to_metric_families(text) for suffix in SUFFIXES.get(f.type, ("",))}


async def _metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def _ratio_told(port: int) -> bool:
    return "xks_key_gcm_invocations_ratio" in exported(await _metrics_text(port))


def test_rules_are_valid() -> None:
    done = subprocess.run([need("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_example_configuration_is_valid_and_names_the_rules_job() -> None:
    config = PROMETHEUS / "prometheus.yml"
    done = subprocess.run([need("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = [job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]]
    down = next(rule["expr"] for rule in _alerts() if rule["alert"] == "XksProxyDown")
    assert jobs == ["xks-proxy"] and down == 'up{job="xks-proxy"} == 0'


def test_alert_unit_tests_pass() -> None:
    assert UNIT_TESTS
    done = subprocess.run(
        [need("promtool"), "test", "rules", *map(str, UNIT_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_fires_it(tmp_path: Path) -> None:
    """An alert whose expression can never fire fails the unit tests: each one is tested firing."""
    promtool = need("promtool")
    (tmp_path / "tests").mkdir()
    for test in UNIT_TESTS:
        (tmp_path / "tests" / test.name).write_text(test.read_text())
    for alert in _alerts():
        rules = yaml.safe_load(RULES.read_text())
        for rule in rules["groups"][0]["rules"]:
            if rule["alert"] == alert["alert"]:
                rule["expr"] = "vector(0) > 1"
        (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
        done = subprocess.run(
            [promtool, "test", "rules", *(str(tmp_path / "tests" / t.name) for t in UNIT_TESTS)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0 and f"alertname: {alert['alert']}" in done.stdout + done.stderr, alert["alert"]


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "xks-proxy"
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_names_are_parsed_from_promql() -> None:
    """The parser the next test relies on: names out, functions, labels and keywords not."""
    expr = 'histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{x="y"}[5m]))) / on (i) b_total > bool 2 or up'
    assert metric_names([expr]) == {"a_bucket", "b_total", "up"}


@pytest.mark.vault_only
async def test_rules_and_dashboard_name_only_metrics_a_proxy_exports(home: Home, tmp_path: Path) -> None:
    used = metric_names([rule["expr"] for rule in _alerts()] + _dashboard_exprs())
    assert {"xks_requests_total", "xks_proxy_credential_age_days", "xks_vault_database_up", "xks_key_gcm_invocations_ratio", "up"} <= used
    # One proxy process: its registry declares every family it has, samples or not; the AES-GCM
    # ratio's family is made with the key manager's first answer (a backend that does not count has none).
    edit_config(home.path, lambda raw: raw.update(metrics={"enabled": True, "host": "127.0.0.1", "port": 0}))
    async with running(home.path, plain_http=True) as proxy:
        port = proxy.metrics_port
        assert port is not None

        await eventually(lambda: _ratio_told(port), deadline=10, what="the vault's first AES-GCM ratio")
        names = exported(await _metrics_text(port))
    # `serve --workers 2`, as operators run it: the sidecar adds the scrape-time credential age.
    edit_config(home.path, lambda raw: raw["stores"][0]["credentials"][0].update(created_at=iso_time(time.time())))
    async with served_with_metrics(home, tmp_path) as port:
        await eventually(lambda: _ratio_told(port), deadline=10, what="the workers' AES-GCM ratio (livemax) through the sidecar")
        names |= exported(await _metrics_text(port))
    assert used - PROMETHEUS_OWN <= names, sorted(used - PROMETHEUS_OWN - names)
