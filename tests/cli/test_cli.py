"""The CLI as operators run it: a real subprocess per command, and a real `serve` process."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import metadata
from xks_proxy import sigv4


def run(*args: str, home: Path | None = None, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "xks_proxy.cli", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    home = tmp_path / "h"
    run("init", "--seal", "file", "--uri-prefix", "corp/keys", "--region", "eu-west-1", "--port", str(free_port()), home=home)
    return home


def test_init_makes_an_owner_only_home(cli_home: Path) -> None:
    for path in cli_home.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is mode {oct(mode)}"
    config = tomllib.loads((cli_home / "config.toml").read_text())
    assert config["stores"][0]["prefix"] == "corp/keys"
    cred = config["stores"][0]["credentials"][0]
    assert "secret_access_key" not in cred  # only the sealed form is on disk


def test_init_refuses_to_overwrite(cli_home: Path) -> None:
    before = (cli_home / "master.key").read_text()
    result = run("init", "--seal", "file", home=cli_home, check=False)
    assert result.returncode != 0
    assert "refusing to overwrite" in result.stderr
    assert (cli_home / "master.key").read_text() == before


def test_export_prints_the_kms_proxy_configuration(cli_home: Path) -> None:
    exported = json.loads(run("stores", "export", home=cli_home).stdout)
    assert exported["XksProxyUriPath"] == "/corp/keys/kms/xks/v1"
    cred = exported["XksProxyAuthenticationCredential"]
    assert len(cred["AccessKeyId"]) >= 20 and len(cred["RawSecretAccessKey"]) >= 43
    assert json.loads(run("stores", "export", "corp/keys", home=cli_home).stdout) == exported
    assert run("stores", "export", "nope", home=cli_home, check=False).returncode != 0


def test_home_from_environment(cli_home: Path) -> None:
    env = dict(os.environ, XKS_PROXY_HOME=str(cli_home))
    run("keys", "create", "envkey", env=env)
    assert "envkey" in run("keys", "list", env=env).stdout


def test_key_commands(cli_home: Path) -> None:
    shown = json.loads(run("keys", "create", "k1", home=cli_home).stdout)
    assert shown["keyStatus"] == "ENABLED" and shown["keyUsage"] == ["ENCRYPT", "DECRYPT"]
    assert json.loads(run("keys", "create", "k2", "--usage", "", home=cli_home).stdout)["keyUsage"] == []
    assert json.loads(run("keys", "create", "k3", "--usage", "encrypt", home=cli_home).stdout)["keyUsage"] == ["ENCRYPT"]
    assert json.loads(run("keys", "disable", "k1", home=cli_home).stdout)["keyStatus"] == "DISABLED"
    assert json.loads(run("keys", "enable", "k1", home=cli_home).stdout)["keyStatus"] == "ENABLED"
    assert json.loads(run("keys", "rotate", "k1", home=cli_home).stdout)["versions"] == 2
    assert json.loads(run("keys", "show", "k1", "--store", "corp/keys", home=cli_home).stdout)["versions"] == 2
    listing = run("keys", "list", home=cli_home).stdout
    assert [line.split("\t")[0] for line in listing.splitlines()] == ["k1", "k2", "k3"]
    for bad in (["keys", "create", "k1"], ["keys", "show", "none"], ["keys", "create", "bad/id"],
                ["keys", "create", "k9", "--usage", "SIGN"], ["keys", "disable", "none"]):  # fmt: skip
        result = run(*bad, home=cli_home, check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, (bad, result.stderr)
        assert "Traceback" not in result.stderr


def _break(home: Path, old: str, new: str) -> None:
    path = home / "config.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "old,new,field",
    [
        ('prefix = "corp/keys"', 'prefix = "bad prefix!"', "stores[0].prefix"),
        ('prefix = "corp/keys"', 'prefix = "/leading"', "stores[0].prefix"),
        ('access_key_id = "', 'access_key_id = "lower', "stores[0].credentials[0].access_key_id"),
        ('secret_access_key_sealed = "', 'secret_access_key_sealed = "AAAA', "secret_access_key_sealed"),
        ('"eu-west-1"', '"Mars"', "stores[0].regions"),
        ('file = "master.key"', 'file = "missing.key"', "master_key.file"),
        ('tls_cert = "tls/server.pem"', 'tls_cert = "tls/nothing.pem"', "server.tls_cert"),
        ("[server]", "[server]\nfleet_size = 0", "server.fleet_size"),
        ('backend = "vault"', 'backend = "magic"', "keymanager.backend"),
        ("[limits]\nmax_plaintext_bytes = 8192", "[limits]\nmax_plaintext_bytes = 100", "limits.max_plaintext_bytes"),
        ("[server]", "this is not toml", "not valid TOML"),
    ],
)
def test_bad_configuration_is_one_clear_line(cli_home: Path, old: str, new: str, field: str) -> None:
    _break(cli_home, old, new)
    result = run("serve", "--http", home=cli_home, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and field in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_prefix_is_refused(cli_home: Path) -> None:
    text = (cli_home / "config.toml").read_text()
    store = text[text.index("[[stores]]") :]
    other = store.replace('access_key_id = "', 'access_key_id = "B', 1)
    (cli_home / "config.toml").write_text(text + "\n" + other)
    result = run("keys", "list", home=cli_home, check=False)
    assert result.returncode == 2 and "stores[1]" in result.stderr


def test_missing_home_is_explained(tmp_path: Path) -> None:
    result = run("keys", "list", home=tmp_path / "nothing", check=False)
    assert result.returncode == 2 and "xks-proxy init" in result.stderr


def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start listening")


def _signed_post(url: str, path: str, body: dict, cred: dict, region: str, context: ssl.SSLContext | None) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    host = url.split("://", 1)[1]
    headers = sigv4.sign(
        method="POST", url_path=path, host=host, body=data, access_key_id=cred["AccessKeyId"],
        secret=cred["RawSecretAccessKey"], region=region, extra_headers={"Content-Type": "application/json"},
    )  # fmt: skip
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("tls", [True, False])
def test_serve_process_end_to_end(cli_home: Path, tls: bool) -> None:
    """`serve` as a real process: HTTPS with the home's dev CA (or --http), and CLI changes within 2 s."""
    port = int(tomllib.loads((cli_home / "config.toml").read_text())["server"]["port"])
    run("keys", "create", "foo", home=cli_home)
    cred = json.loads(run("stores", "export", home=cli_home).stdout)["XksProxyAuthenticationCredential"]
    args = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(cli_home), "--workers", "2"]
    args += [] if tls else ["--http"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(port, proc)
        context = ssl.create_default_context(cafile=str(cli_home / "tls" / "ca.pem")) if tls else None
        url = f"{'https' if tls else 'http'}://localhost:{port}"
        path = "/corp/keys/kms/xks/v1/keys/foo/metadata"
        status, body = _signed_post(url, path, {"requestMetadata": metadata("CreateKey")}, cred, "eu-west-1", context)
        assert (status, body["keyStatus"]) == (200, "ENABLED")
        run("keys", "disable", "foo", home=cli_home)
        time.sleep(2.0)  # the promise: every worker sees a CLI change within 2 seconds
        for _ in range(20):  # whichever worker answers
            status, body = _signed_post(url, path, {"requestMetadata": metadata("CreateKey")}, cred, "eu-west-1", context)
            assert body["keyStatus"] == "DISABLED"
        if tls:
            with pytest.raises(ssl.SSLError):  # KMS refuses anything below TLS 1.2, and so do we
                old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
                old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.minimum_version = ssl.TLSVersion.TLSv1
                old.set_ciphers("ALL:@SECLEVEL=0")
                with socket.create_connection(("127.0.0.1", port)) as raw, old.wrap_socket(raw):
                    pass
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert '"outcome":"OK"' in stderr and '"kmsRequestId":"4a0f2f55' in stderr  # one access line per request
    assert stderr.count('"message":"serving ') == 1, "a line logged before the fork is written once, not once per worker"
    assert cred["RawSecretAccessKey"] not in stderr


def test_master_key_from_environment(tmp_path: Path) -> None:
    """For containers: the master key may come from the environment instead of the file."""
    home = tmp_path / "h"
    run("init", "--seal", "file", home=home)
    key_text = (home / "master.key").read_text()
    (home / "master.key").unlink()
    assert run("keys", "list", home=home, check=False).returncode == 2
    env = dict(os.environ, XKS_PROXY_MASTER_KEY=key_text.strip())
    run("keys", "create", "k", home=home, env=env)
    wrong = dict(os.environ, XKS_PROXY_MASTER_KEY="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    result = run("keys", "list", home=home, env=wrong, check=False)
    assert result.returncode == 2 and "does not open" in result.stderr


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_supervisor_replaces_a_dead_worker(cli_home: Path) -> None:
    port = int(tomllib.loads((cli_home / "config.toml").read_text())["server"]["port"])
    run("keys", "create", "foo", home=cli_home)
    cred = json.loads(run("stores", "export", home=cli_home).stdout)["XksProxyAuthenticationCredential"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(cli_home), "--workers", "2", "--http"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_listening(port, proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_children(proc.pid)) < 3:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 3  # two workers and the sidecar that writes the audit log
        os.kill(workers[0], 9)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(_children(proc.pid)) < 3 or workers[0] in _children(proc.pid)):
            time.sleep(0.05)
        replaced = _children(proc.pid)
        assert len(replaced) == 3 and workers[0] not in replaced
        path = "/corp/keys/kms/xks/v1/keys/foo/metadata"
        for _ in range(10):
            status, body = _signed_post(f"http://127.0.0.1:{port}", path, {"requestMetadata": metadata("CreateKey")}, cred, "eu-west-1", None)
            assert status == 200, body
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "starting a new one" in stderr
