"""What `serve` writes on stderr and in the audit file, read from a real supervised proxy.

Log shippers need each stderr line to be one JSON object; a person at a terminal reads text.
Both carry the same millisecond UTC time; a reload is told once per proxy, not once per worker;
a stop says so; every audit record (requests, CLI changes, key lifecycle, the server's own
auto-rotation) names a store by its prefix and has a millisecond time.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from tests.support.proxy import edit_config, eventually
from tests.conftest import Client
from tests.support.sealed_proxy import SealedHome, Served, client, init, kill, round_trip, start
from xks_proxy.process.logsink import JsonFormatter

MS_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON log: each must be a whole JSON object (a shipper drops anything else)."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # raises on any line that is not JSON
        assert isinstance(record, dict) and MS_TIME.match(record["time"]), line
        records.append(record)
    return records


def messages(records: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [r for r in records if text in r.get("message", "")]


@pytest.fixture
def home(tmp_path: Path) -> SealedHome:
    made = init(tmp_path / "home", "--seal", "file")
    assert made.run("keys", "create", "foo").returncode == 0
    return made


@asynccontextmanager
async def serving(home: SealedHome, log: Path, workers: int, *extra: str) -> AsyncIterator[tuple[Served, Client]]:
    """`serve` answering a round trip; stopped cleanly (exit 0) at the end, killed if the test failed first."""
    served = start(home.path, log, workers=workers, http=True, extra=extra)
    try:
        async with client(home, served, http=True) as c:
            await eventually(lambda: round_trip(c), deadline=15, what="the workers serve")
            yield served, c
        assert served.stop() == 0
    finally:
        kill(served.proc)


async def test_serve_writes_json_lines_with_the_access_record_and_a_stop_line(home: SealedHome, tmp_path: Path) -> None:
    async with serving(home, tmp_path / "serve.log", 2) as (served, c):
        for _ in range(5):
            assert await round_trip(c)
    records = json_lines(served.text)
    assert messages(records, "serving http://127.0.0.1:")[0]["level"] == "INFO"
    access = [r for r in records if r.get("event") == "xks.request"]
    assert len(access) >= 12 and {r["store"] for r in access} == {"test"}, "the access record is on stderr, as JSON"
    audited = {line for line in (home.path / "audit.log").read_text().splitlines() if '"xks.request"' in line}
    on_stderr = {line for line in served.text.splitlines() if '"xks.request"' in line}
    assert on_stderr == audited, "one record, built once: the same line on stderr and in the audit file"
    stops = messages(records, "stopped")
    assert len(stops) == 1 and stops[0]["logger"] == "xks_proxy", records[-5:]


async def test_text_format_is_for_a_person(home: SealedHome, tmp_path: Path) -> None:
    async with serving(home, tmp_path / "serve.log", 1, "--log-format", "text") as (served, _):
        pass
    lines = served.text.splitlines()
    assert lines and not [line for line in lines if line.startswith("{")], lines
    for line in lines:
        when, level, name = line.split(" ", 3)[:3]
        assert MS_TIME.match(when) and level in ("INFO", "WARNING") and name.startswith("xks_proxy"), line
    assert [line for line in lines if " INFO xks_proxy.access {" in line], "the access record, after the text prefix"


async def test_a_reload_is_logged_once_per_proxy_not_per_worker(home: SealedHome, tmp_path: Path) -> None:
    async with serving(home, tmp_path / "serve.log", 3) as (served, c):
        for n in range(3):
            edit_config(home.path, lambda raw: raw["stores"][0].update(regions=["us-east-1", f"eu-west-{n + 1}"]))
            served.proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return len(messages(json_lines(served.text), "configuration reloaded")) > n

            await eventually(reloaded, deadline=10, what="the reload is logged")
        await eventually(lambda: round_trip(c), deadline=5, what="still serving")
    assert len(messages(json_lines(served.text), "configuration reloaded")) == 3, "one line per reload, not one per worker"


async def test_every_audit_record_names_its_store_by_prefix_with_a_millisecond_time(home: SealedHome, tmp_path: Path) -> None:
    edit_config(home.path, lambda raw: raw.setdefault("vault", {}).update(rotate_after_encryptions=3, count_block=1))
    assert home.run("keys", "create", "bar").returncode == 0
    assert home.run("credentials", "add", "--store", "test").returncode == 0
    assert home.run("stores", "add", "other", "--region", "us-east-1").returncode == 0
    async with serving(home, tmp_path / "serve.log", 1) as (_, c):
        for _ in range(4):  # past rotate_after_encryptions: the server rotates bar itself
            assert await round_trip(c, "bar")
    records = json_lines((home.path / "audit.log").read_text())
    kinds = {(r["event"], r.get("action")) for r in records}
    assert {("key-lifecycle", "create"), ("access-admin", "credentials-add"), ("access-admin", "stores-add")} <= kinds
    assert ("key-lifecycle", "auto-rotate") in kinds, "the server's own key change is audited too"
    assert ("xks.request", None) in kinds
    stores = {r["store"] for r in records if "store" in r}
    assert stores == {"test", "other"}, stores


def test_a_logged_exception_stays_one_json_line_with_its_traceback() -> None:
    """log.exception in a serving process: the traceback goes in the record's `exception`
    field, so a shipper still reads one object per line."""
    try:
        {}["missing"]
    except KeyError:
        record = logging.getLogger("xks_proxy").makeRecord(
            "xks_proxy", logging.ERROR, __file__, 1, "reload check failed; %s", ("serving the current configuration",),
            exc_info=sys.exc_info(),
        )  # fmt: skip
    line = JsonFormatter().format(record)
    (parsed,) = json_lines(line)
    assert parsed["level"] == "ERROR" and parsed["message"] == "reload check failed; serving the current configuration"
    assert parsed["exception"].startswith("Traceback (most recent call last):")
    assert parsed["exception"].rstrip().endswith("KeyError: 'missing'")
