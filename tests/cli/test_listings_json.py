"""`--json` on the listing commands (issue 15): one object shape per noun, wherever the noun is shown.

Real `xks-proxy` subprocesses on a real home: a key listed is the object `keys show` and the admin
API give; a store's credentials are the objects `credentials list --json` gives; a key version
names encryptions performed apart from encryptions reserved, performed counted by a real server.
Without --json each listing is text for a person. No output ever holds a secret.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import jwt
import pytest

from tests.conftest import Home
from tests.support.admin import admin_config, claims
from tests.support.lifecycle import acli, cli, cli_json, serving

pytestmark = pytest.mark.vault_only  # stores, credentials and key versions are the vault home's

CREDENTIAL_FIELDS = {"accessKeyId", "store", "created", "state"}
STORE_FIELDS = {"prefix", "uriPath", "regions", "keyIds", "policyRules", "credentials"}
VERSION_FIELDS = {"version", "created", "current", "countedSince", "encryptionsPerformed", "encryptionsReserved"}


def _added_secret(stdout: str) -> str:
    """The secret `credentials add` / `stores add` print once (the one place they may)."""
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if "secret access key:" in line)


def _version_rows(text: str) -> list[list[str]]:
    """The cells under `keys versions`' header line, which must name performed and reserved apart."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("VERSION"))
    assert lines[header].split() == ["VERSION", "STATE", "CREATED", "PERFORMED", "RESERVED"]
    return [line.split() for line in lines[header + 1 :] if line[:1].isdigit()]


def test_stores_and_credentials_list_json_share_one_credential_shape_and_no_secret(home: Home) -> None:
    added = cli("credentials", "add", home=home.path)
    other = cli("stores", "add", "second", "--region", "eu-west-1", "--key-ids", "b,a", home=home.path)
    assert added.returncode == 0 and other.returncode == 0, added.stderr + other.stderr
    stores = cli_json("stores", "list", "--json", home=home.path)
    assert [s["prefix"] for s in stores] == ["test", "second"]
    assert all(set(s) == STORE_FIELDS for s in stores)
    test, second = stores
    assert second["uriPath"] == "/second/kms/xks/v1" and second["keyIds"] == ["a", "b"] and second["regions"] == ["eu-west-1"]
    assert test["keyIds"] is None and test["policyRules"] == 0
    for store in stores:  # the same credential objects as `credentials list --json` of that store
        assert store["credentials"] == cli_json("credentials", "list", "--json", "--store", store["prefix"], home=home.path)
    creds = test["credentials"]
    assert all(set(c) == CREDENTIAL_FIELDS and c["store"] == "test" for c in creds)
    assert [c["accessKeyId"] for c in creds][0] == home.access_key_id
    assert [c["state"] for c in creds] == ["ACCEPTED", "CURRENT"]  # the newest is the one `stores export` gives KMS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", creds[-1]["created"])  # `credentials add` records it
    text = cli("stores", "list", home=home.path).stdout + cli("credentials", "list", "--store", "test", home=home.path).stdout
    assert text.splitlines()[0].startswith("/test/kms/xks/v1\tregions=") and home.access_key_id in text.splitlines()
    shown = json.dumps(stores) + text
    for secret in (home.secret, _added_secret(added.stdout), _added_secret(other.stdout)):
        assert secret not in shown


def test_keys_list_json_is_the_objects_keys_show_gives(home: Home) -> None:
    assert cli("keys", "create", "bar", "--usage", "ENCRYPT", home=home.path).returncode == 0
    listed = cli_json("keys", "list", "--json", home=home.path)
    assert [k["keyId"] for k in listed] == ["bar", "foo"]
    for key in listed:
        assert key == cli_json("keys", "show", key["keyId"], home=home.path)
    assert cli("keys", "list", home=home.path).stdout.splitlines()[0] == "bar\tENABLED\tENCRYPT\tversions=1"


async def test_key_versions_name_encryptions_performed_and_reserved(home: Home, tmp_path: Any) -> None:
    """Performed: counted by the serving process, so known through its admin API, unknown (null) from the vault."""
    secret = secrets.token_hex(32)
    (home.path / "admin-jwt.secret").write_text(secret + "\n")
    admin_config(home, hs256_secret_file="admin-jwt.secret")
    (tmp_path / "token").write_text(jwt.encode(claims(role="viewer"), secret, algorithm="HS256"))
    async with serving(home) as live:
        for _ in range(3):
            assert (await live.client.encrypt("foo", b"counted"))[0] == 200
        admin = ["--admin-url", f"https://127.0.0.1:{live.admin.port}", "--admin-token-file", str(tmp_path / "token"),
                 "--admin-ca", str(home.path / "tls" / "ca.pem")]  # fmt: skip
        rc, out, err = await acli("keys", "versions", "foo", "--json", *admin)
        assert rc == 0, err
        (served,) = json.loads(out)["versions"]
        rc, text, err = await acli("keys", "versions", "foo", *admin)
        assert rc == 0, err
        rc, out, err = await acli("keys", "list", "--json", *admin)
        assert rc == 0, err
        through_api = json.loads(out)
    assert served["encryptionsPerformed"] == 3
    assert served["encryptionsReserved"] == home.config.vault.count_block  # reserved a whole block ahead of use
    assert set(served) == VERSION_FIELDS | {"encryptionsByThisServer"}
    assert through_api == cli_json("keys", "list", "--json", home=home.path)  # the admin API's key objects, the same
    assert _version_rows(text) == [["1", "current", served["created"], "3", str(served["encryptionsReserved"])]]
    assert "performed: counted by a running server" not in text  # a server answered: performed is known
    local = cli_json("keys", "versions", "foo", "--json", home=home.path)
    (version,) = local["versions"]
    assert set(version) == VERSION_FIELDS
    assert version["encryptionsPerformed"] is None  # the vault holds reservations, not uses
    assert version["encryptionsReserved"] == 3  # the server gave back its unused block when it stopped


def test_key_versions_print_a_table_by_default_and_json_with_the_flag(home: Home) -> None:
    """For a person, the columns say which count is which; from the vault alone performed is unknown, and said so."""
    assert cli("keys", "rotate", "foo", home=home.path).returncode == 0
    shown = cli("keys", "versions", "foo", home=home.path)
    assert shown.returncode == 0, shown.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(shown.stdout)
    versions = cli_json("keys", "versions", "foo", "--json", home=home.path)["versions"]
    assert [v["version"] for v in versions] == [1, 2] and all(set(v) == VERSION_FIELDS for v in versions)
    expected = [[str(v["version"]), state, v["created"], "unknown", str(v["encryptionsReserved"])]
                for v, state in zip(versions, ("decrypt-only", "current"))]  # fmt: skip
    assert _version_rows(shown.stdout) == expected
    assert shown.stdout.splitlines()[-1] == "performed: counted by a running server; ask it with --admin-url"
