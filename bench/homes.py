"""Proxy homes made for the benchmark, and the servers started on them.

A `Home` is a fresh `xks-proxy init --seal file` home (vault) or a SoftHSMv2 token imported from
the AWS sample proxy's settings (pkcs11), with default logging and audit (audit.log in the home).
Many keys and stores are made in-process through the backend's key administration, since one
CLI call per key would take minutes for 1,000 keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
PREFIX = "bench"
KEY = "bench-key"


@dataclass(frozen=True)
class Credential:
    prefix: str
    access_key_id: str
    secret: str


def cli(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-m", "xks_proxy.cli", *args], check=True, capture_output=True, text=True, env=env).stdout


@dataclass
class Home:
    """One proxy home: its stores' credentials and the keys made in each."""

    path: Path
    backend: str
    env: dict[str, str]
    stores: list[Credential] = field(default_factory=list)
    keys: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def create(cls, workdir: Path, name: str, backend: str = "vault") -> "Home":
        path = workdir / name
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if backend == "pkcs11":
            env = softhsm_home(path, workdir / f"{name}-softhsm", env)
        else:
            cli("init", "--home", str(path), "--uri-prefix", PREFIX, "--region", REGION, "--seal", "file", env=env)
        home = cls(path, backend, env)
        home.stores.append(home._credential(PREFIX))
        home.add_keys(PREFIX, [KEY])
        return home

    def _credential(self, prefix: str) -> Credential:
        cred = json.loads(cli("stores", "export", prefix, "--home", str(self.path), env=self.env))["XksProxyAuthenticationCredential"]
        return Credential(prefix, cred["AccessKeyId"], cred["RawSecretAccessKey"])

    def add_store(self, prefix: str) -> Credential:
        cli("stores", "add", prefix, "--region", REGION, "--home", str(self.path), env=self.env)
        self.stores.append(self._credential(prefix))
        return self.stores[-1]

    def add_keys(self, store: str, key_ids: list[str]) -> None:
        """Create keys through the backend's key administration, in this process (fast for 1,000)."""
        if self.backend != "vault":
            for key_id in key_ids:
                cli("keys", "create", key_id, "--store", store, "--home", str(self.path), env=self.env)
        else:
            from keymanager import create_key_admin
            from keymanager.base import KeyUsage
            from xks_proxy import config as configmod

            admin = create_key_admin(configmod.load(self.path))
            for key_id in key_ids:
                admin.create_key(store, key_id, (KeyUsage.ENCRYPT, KeyUsage.DECRYPT))
        self.keys.setdefault(store, []).extend(key_ids)

    def serve(self, port: int, workers: int, cores: str | None, tls: bool = False) -> "subprocess.Popen[bytes]":
        cmd = [sys.executable, "-m", "xks_proxy.cli", "serve", "--home", str(self.path), "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers)] + ([] if tls else ["--http"])  # fmt: skip
        return procs.start(procs.pinned(cmd, cores), port, self.env, self.path.parent / f"{self.path.name}-serve.log")


def serve_baseline(workdir: Path, port: int, workers: int, cores: str | None) -> "subprocess.Popen[bytes]":
    cmd = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--port", str(port), "--workers", str(workers)]
    return procs.start(procs.pinned(cmd, cores), port, dict(os.environ), workdir / "baseline.log")


SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")  # fmt: skip
SOFTHSM_LABEL, SOFTHSM_PIN = "xks-bench", "bench-pin-1234"


def softhsm_module() -> str:
    """SoftHSMv2's PKCS#11 module; the run stops with the package to install when it is missing."""
    module = next((m for m in SOFTHSM_MODULES if Path(m).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("the pkcs11 benchmark needs SoftHSMv2: apt-get install softhsm2")
    return module


def softhsm_token(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """A fresh SoftHSMv2 token (file object store) under `workdir`; `env` with its SOFTHSM2_CONF."""
    tokens = workdir / "tokens"
    tokens.mkdir(parents=True)
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(env, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", SOFTHSM_LABEL, "--so-pin", "bench-so-1234",
                    "--pin", SOFTHSM_PIN], check=True, capture_output=True, env=env)  # fmt: skip
    return env


def softhsm_home(home: Path, workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """A fresh SoftHSMv2 token and a pkcs11 home over it, made the way a migrating operator would:
    the AWS sample proxy's settings.toml, imported with `xks-proxy import-config`."""
    module = softhsm_module()
    env = softhsm_token(workdir, env)
    pin = SOFTHSM_PIN
    from xks_proxy.cli.home import new_access_key_id, new_secret

    settings = workdir / "aws-settings.toml"
    settings.write_text("\n".join([
        "[server]", 'ip = "127.0.0.1"', "port = 8000", f'region = "{REGION}"', 'service = "kms-xks-proxy"',
        "[security]", "is_sigv4_auth_enabled = true", "is_tls_enabled = false", "is_mtls_enabled = false",
        "[pkcs11]", "session_pool_max_size = 16", "session_pool_timeout_milli = 5000", f'user_pin = "{pin}"',
        f'PKCS11_HSM_MODULE = "{module}"', "context_read_timeout_milli = 1000",
        "[limits]", "max_plaintext_in_base64 = 8192", "max_aad_in_base64 = 16384",
        "[hsm_capabilities]", "can_generate_iv = false", "is_zero_iv_required = false",
        "[[external_key_stores]]", f'uri_path_prefix = "/{PREFIX}"', f'sigv4_access_key_id = "{new_access_key_id()}"',
        f'sigv4_secret_access_key = "{new_secret()}"', "",
    ]))  # fmt: skip
    cli("import-config", str(settings), "--home", str(home), env=env)
    return env
