"""Configuration reload: applied whole or refused whole, restart-only settings reported, SIGHUP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Home
from tests.support.proxy import WORKTREE, Pki, client_for, edit_config, eventually, running, wait_for_line

# Config reload is the same whatever the backend: run once, on the vault.
pytestmark = pytest.mark.vault_only


async def test_bad_config_is_refused_and_the_old_one_keeps_serving(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    path = home.path / "config.toml"
    good = path.read_text()
    async with running(home.path, plain_http=True, reload_interval=0.1) as proxy, client_for(home, proxy) as client:

        def refusals() -> list[str]:
            return [r.getMessage() for r in caplog.records if "configuration reload refused" in r.getMessage()]

        bad_versions = {
            "policy typo": good + '\n[[stores.policy]]\nname = "freeze"\neffect = "dney"\n',
            "TOML syntax": good + "\n[throttle\n",
            "unknown throttle setting": good + "\n[throttle]\nmax_inflight = 3\n",
        }
        for name, text in bad_versions.items():
            before = len(refusals())
            path.write_text(text)

            async def refused() -> bool:
                return len(refusals()) > before

            await eventually(refused, what=f"the {name} is refused")
            assert (await client.encrypt("foo", b"still served"))[0] == 200, name
        assert "stores[0].policy[0].effect" in refusals()[0]
        assert "throttle.max_inflight: unknown setting" in refusals()[2]

        path.write_text(good + '\n[[stores.policy]]\nname = "freeze"\neffect = "deny"\n')

        async def frozen() -> bool:
            return (await client.encrypt("foo", b"x"))[0] == 403

        await eventually(frozen, what="the corrected policy applies")


async def test_restart_only_settings_are_reported_not_applied(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xks_proxy")
    async with running(home.path, plain_http=True, reload_interval=0.1) as proxy, client_for(home, proxy) as client:
        edit_config(home.path, lambda raw: raw["server"].update(port=1, vendor="Bank XKS"))

        async def vendor_changed() -> bool:
            status, body = await client.call("health", requestMetadata={"kmsRequestId": "h", "kmsOperation": "KmsHealthCheck"})
            return status == 200 and body["xksProxyVendor"] == "Bank XKS"

        await eventually(vendor_changed, what="the reloadable setting applies")
        assert "server.host/port changed; that takes effect at the next restart" in caplog.text


async def test_serve_over_mtls_and_reload_on_sighup(home: Home, tmp_path: Path) -> None:
    """The real `xks-proxy serve` process: mTLS, then an edit only SIGHUP can reveal, then SIGTERM."""
    pki = Pki(home.path)

    def configure(raw: dict) -> None:  # type: ignore[type-arg]
        pki.configure(raw)
        raw["stores"][0]["policy"] = [{"name": "sighup-test", "effect": "deny", "kmsOperation": "Xncrypt"}]

    edit_config(home.path, configure)
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=str(WORKTREE))
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(home.path), "--port", "0"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True,
        )
    try:
        port = int((await asyncio.to_thread(wait_for_line, log, r"serving https://127\.0\.0\.1:(\d+)"))[1])
        proxy = type("P", (), {"port": port})()
        async with client_for(home, proxy, pki.context(pki.kms)) as client:  # type: ignore[arg-type]
            assert (await client.encrypt("foo", b"before"))[0] == 200
            # An edit polling cannot see: same inode, same size, same mtime.
            path = home.path / "config.toml"
            st = os.stat(path)
            text = path.read_text()
            assert text.count("Xncrypt") == 1
            with open(path, "r+") as handle:
                handle.write(text.replace("Xncrypt", "Encrypt"))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            await asyncio.sleep(1.0)  # two poll rounds: polling alone does not notice
            assert (await client.encrypt("foo", b"unchanged"))[0] == 200
            proc.send_signal(signal.SIGHUP)

            async def denied() -> bool:
                return (await client.encrypt("foo", b"after"))[0] == 403

            await eventually(denied, what="SIGHUP reloads the configuration")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:  # a failed test: stop the supervisor and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "configuration reloaded" in text and "Traceback" not in text
    assert "changed; that takes effect" not in text  # `--port 0` is the command line's, not a change of the file
    records = [json.loads(line) for line in (home.path / "audit.log").read_text().splitlines()]
    assert [r["outcome"] for r in records[:2]] == ["OK", "OK"]
    assert records[-1]["outcome"] == "AccessDeniedException" and records[-1]["deniedBy"] == "sighup-test"
