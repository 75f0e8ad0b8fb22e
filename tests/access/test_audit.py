"""The audit log: one JSON record per request with the issue's fields, rotation, and no secrets anywhere."""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import stat
from typing import Any

import pytest

from keymanager.vault.db import material_context
from tests.conftest import Client, Home, b64, unb64
from tests.support.proxy import Pki, cli, client_for, edit_config, eventually, running
from xks_proxy.access import audit
from xks_proxy.config import AuditConfig

FIELDS = (
    "time", "kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn", "kmsViaService",
    "store", "keyId", "keyVersion", "outcome", "deniedBy", "latencyMs",
)


def meta(operation: str, request_id: str, **extra: str) -> dict[str, str]:
    return {
        "kmsRequestId": request_id,
        "kmsOperation": operation,
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/app",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/0000-audit",
        "kmsViaService": "ebs.us-east-1.amazonaws.com",
        **extra,
    }


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could show up in a log: raw, base64 (both alphabets), hex."""
    b = base64.b64encode(secret)
    return [secret, b, b.rstrip(b"="), base64.urlsafe_b64encode(secret).rstrip(b"="), secret.hex().encode(), secret.hex().upper().encode()]


async def encrypt(client: Client, rid: str, plaintext: bytes, aad: bytes, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"requestMetadata": meta("Encrypt", rid), "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM",
            "additionalAuthenticatedData": b64(aad), **extra}
    return await client.call("encrypt", "foo" if "key" not in extra else extra.pop("key"), **body)


async def decrypt(client: Client, rid: str, enc: dict[str, Any], aad: bytes, key: str = "foo") -> tuple[int, dict[str, Any]]:
    body = {"requestMetadata": meta("Decrypt", rid), "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": b64(aad),
            **{k: enc[k] for k in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata")}}
    return await client.call("decrypt", key, **body)


async def test_full_run_leaves_no_data_or_secret_in_any_log(home: Home, caplog: pytest.LogCaptureFixture) -> None:
    """On each backend: the vault's key versions and master key, or the HSM's PIN, must not leak either."""
    caplog.set_level(logging.DEBUG)
    on_vault = home.backend == "vault"

    def version(number: int) -> int | None:  # the vault names key versions; the HSM backend does not
        return number if on_vault else None

    pki = Pki(home.path)
    home.create_key("guarded")

    def configure(raw: dict[str, Any]) -> None:
        pki.configure(raw)
        raw["metrics"] = {"enabled": True, "port": 0}
        raw["stores"][0]["policy"] = [{"name": "guarded-ebs-only", "effect": "allow", "keys": "guarded", "kmsViaService": "ec2.*"}]

    edit_config(home.path, configure)
    plaintexts = [os.urandom(48) for _ in range(4)]
    aads = [os.urandom(40) for _ in range(4)]
    cli_output = ""
    expected: dict[str, tuple[str, int | None]] = {}  # kmsRequestId -> (outcome, keyVersion)
    async with running(home.path, reload_interval=0.1) as proxy, client_for(home, proxy, pki.context(pki.kms)) as client:
        status, v1 = await encrypt(client, "enc-1", plaintexts[0], aads[0], ciphertextDataIntegrityValueAlgorithm="SHA_256")
        assert status == 200, v1
        expected["enc-1"] = ("OK", version(1))
        assert (await decrypt(client, "dec-1", v1, aads[0]))[0] == 200
        expected["dec-1"] = ("OK", version(1))
        assert (await decrypt(client, "dec-bad-aad", v1, aads[1]))[1]["errorName"] == "InvalidCiphertextException"
        expected["dec-bad-aad"] = ("InvalidCiphertextException", version(1))

        if on_vault:  # a key rotation: version 2 for new ciphertexts, version 1 still decrypts
            db = home.vault()
            db.rotate("test", "foo")
            db.close()

            async def rotated() -> bool:
                status, body = await encrypt(client, "enc-probe", plaintexts[1], aads[1])
                return status == 200 and unb64(body["ciphertextMetadata"])[-1] == 2

            await eventually(rotated, what="the proxy serves key version 2")
        status, v2 = await encrypt(client, "enc-2", plaintexts[2], aads[2])
        expected["enc-2"] = ("OK", version(2))
        assert (await decrypt(client, "dec-2", v2, aads[2]))[1] == {"plaintext": b64(plaintexts[2])}
        expected["dec-2"] = ("OK", version(2))
        assert (await decrypt(client, "dec-old", v1, aads[0]))[1] == {"plaintext": b64(plaintexts[0])}
        expected["dec-old"] = ("OK", version(1))

        status, body = await client.call("encrypt", "guarded", requestMetadata=meta("Encrypt", "denied-1"),
                                         plaintext=b64(plaintexts[3]), encryptionAlgorithm="AES_GCM",
                                         additionalAuthenticatedData=b64(aads[3]))
        assert status == 403
        expected["denied-1"] = ("AccessDeniedException", None)
        status, body = await client.call("metadata", "foo", requestMetadata=meta("CreateKey", "md-1"))
        assert status == 200
        expected["md-1"] = ("OK", None)
        status, body = await client.call("health", requestMetadata={"kmsRequestId": "health-1", "kmsOperation": "KmsHealthCheck"})
        assert status == 200
        expected["health-1"] = ("OK", None)

        # A new credential from the CLI, used; and a forged signature with a wrong secret.
        added = cli(home.path, "credentials", "add")
        cli_output += added.stderr
        new_akid = next(line.split()[-1] for line in added.stdout.splitlines() if "access key id" in line)
        new_secret = next(line.split()[-1] for line in added.stdout.splitlines() if "secret access key" in line)
        async with client_for(home, proxy, pki.context(pki.kms), access_key_id=new_akid, secret=new_secret) as rotated_client:

            async def accepted() -> bool:
                return (await encrypt(rotated_client, "enc-new-cred", plaintexts[3], aads[3]))[0] == 200

            await eventually(accepted, what="the new credential works")
        expected["enc-new-cred"] = ("OK", version(2))
        forged_secret = "F" * 64
        async with client_for(home, proxy, pki.context(pki.kms), secret=forged_secret) as forger:
            assert (await encrypt(forger, "forged", plaintexts[1], aads[1]))[0] == 401
        cli_output += cli(home.path, "credentials", "list").stdout + cli(home.path, "stores", "list").stdout

    # Secrets the run used: plaintexts, AADs, key material, the master key, credentials, the PIN.
    master_text = (home.path / "master.key").read_text().strip()
    secrets = plaintexts + aads + [base64.b64decode(master_text)]
    text_secrets = [master_text, home.secret, new_secret, forged_secret]
    if on_vault:
        conn = sqlite3.connect(home.config.vault.path)
        master = home.config.master_key
        for store, key_id, number, sealed in conn.execute("SELECT store, key_id, version, sealed FROM key_versions"):
            secrets.append(master.unseal(sealed, material_context(store, key_id, number)))
        conn.close()
        assert len(secrets) == 8 + 1 + 4  # foo v1, v2, guarded v1, the internal health key
    else:
        assert home.hsm is not None
        secrets.append(home.material("foo"))  # imported by the test; "guarded" never left the HSM
        text_secrets.append(home.hsm.pin)

    audit_bytes = b"".join(p.read_bytes() for p in home.path.glob("audit.log*"))
    server_log = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records) + caplog.text + cli_output
    assert len(server_log) > 1000 and b"enc-1" in audit_bytes
    for haystack, name in ((audit_bytes, "audit log"), (server_log.encode(), "server log")):
        # Booleans, so a failure message cannot print the secret it found.
        for number, secret in enumerate(secrets):
            leaked = any(form in haystack for form in forms(secret))
            assert not leaked, f"secret #{number} ({len(secret)} bytes) is in the {name}"
        for number, text in enumerate(text_secrets):
            leaked = text.encode() in haystack
            assert not leaked, f"text secret #{number} (credential secret or master key) is in the {name}"

    everything = [json.loads(line) for line in audit_bytes.decode().splitlines()]
    assert [r["action"] for r in everything if r["event"] == "access-admin"] == ["credentials-add"]
    everything = [r for r in everything if r["event"] == "xks.request"]
    records = {r["kmsRequestId"]: r for r in everything if r["kmsRequestId"]}
    for request_id, (outcome, version) in expected.items():
        record = records[request_id]
        assert all(field in record for field in FIELDS), record
        assert (record["outcome"], record["keyVersion"]) == (outcome, version), record
    assert records["denied-1"]["deniedBy"] == "implicit-deny:key"
    assert records["enc-1"]["kmsViaService"] == "ebs.us-east-1.amazonaws.com" and records["enc-1"]["store"] == "test"
    assert records["health-1"]["kmsOperation"] == "KmsHealthCheck"
    # (the forged request, and tries of the new credential before the proxy had taken it up)
    unauthenticated = [r for r in everything if r["outcome"] == "AuthenticationFailedException"]
    assert unauthenticated and all(r["status"] == 401 for r in unauthenticated)
    # Nothing from the body of a request that failed authentication is trusted into the log.
    assert all(r["kmsRequestId"] is None and r["awsPrincipalArn"] is None for r in unauthenticated)


@pytest.mark.vault_only
async def test_rotation_by_size_and_private_files(home: Home) -> None:
    edit_config(home.path, lambda raw: raw.update(audit={"path": "logs/audit.jsonl", "max_bytes": 4096, "backups": 2}))
    async with running(home.path, plain_http=True) as proxy, client_for(home, proxy) as client:
        for i in range(40):
            assert (await client.encrypt("foo", b"x"))[0] == 200
    files = sorted(p.name for p in (home.path / "logs").iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        path = home.path / "logs" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size <= 4096
        assert all(json.loads(line)["outcome"] == "OK" for line in path.read_text().splitlines())


def test_audit_helper_for_other_components(tmp_path) -> None:  # type: ignore[no-untyped-def]
    audit.audit({"event": "dropped"})  # no audit log configured: nowhere to go, no error
    sink = audit.AuditLog(AuditConfig(path=tmp_path / "a.log"))
    audit.audit({"event": "admin.key.disable", "actor": "ops@bank.example", "keyId": "foo"})
    sink.close()
    (line,) = (tmp_path / "a.log").read_text().splitlines()
    record = json.loads(line)
    assert list(record)[:2] == ["time", "event"] and record["event"] == "admin.key.disable"
    assert record["time"].endswith("Z") and record["actor"] == "ops@bank.example"


@pytest.mark.vault_only
async def test_unwritable_audit_file_stops_the_start(home: Home) -> None:
    from xks_proxy.config import ConfigError
    from xks_proxy.process.worker import start

    edit_config(home.path, lambda raw: raw.update(audit={"path": "config.toml/audit.log"}))  # its "directory" is a file
    with pytest.raises(ConfigError, match="audit.path: cannot write"):
        await start(home.config, port=0, plain_http=True)


@pytest.mark.vault_only
def test_key_lifecycle_from_the_cli_is_audited_to_the_file(home: Home) -> None:
    result = cli(home.path, "keys", "disable", "foo")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (home.path / "audit.log").read_text().splitlines()]
    (record,) = [r for r in records if r.get("event") == "key-lifecycle"]
    assert (record["action"], record["keyId"], record["outcome"]) == ("disable", "foo", "OK")
    assert record["actor"].startswith("cli:") and stat.S_IMODE((home.path / "audit.log").stat().st_mode) == 0o600
