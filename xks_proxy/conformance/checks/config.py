"""What CreateCustomKeyStore and CreateKey validate before they ever call the proxy.

Catching a malformed XksProxyUriPath, credential or key id here saves a round trip through the
KMS console. The secret is described only by its length and alphabet, never shown.
"""

from __future__ import annotations

import re

from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.results import Outcome

URI_PATH_RE = re.compile(r"^(/[A-Za-z0-9/_-]{1,117})?/kms/xks/v1$")
ACCESS_KEY_RE = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{43,64}$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check(run: Run) -> None:
    _uri_path(run)
    _credential(run)
    _key_ids(run)


def _uri_path(run: Run) -> None:
    path = run.settings.uri_path
    ok = 10 <= len(path) <= 128 and bool(URI_PATH_RE.match(path))
    run.check("config/uri-path", "XksProxyUriPath format", ok=ok,
              expected="/[<prefix>/]kms/xks/v1, 10-128 characters, prefix of [A-Za-z0-9/_-]",
              actual=f"{path!r} ({len(path)} characters)",
              kms=Outcome("OK", "CreateCustomKeyStore accepts the path") if ok else
              Outcome("ValidationException", "CreateCustomKeyStore rejects XksProxyUriPath with ValidationException"))


def _credential(run: Run) -> None:
    cred = run.settings.credential
    problems = []
    if not ACCESS_KEY_RE.match(cred.access_key_id):
        problems.append(f"access key id is {len(cred.access_key_id)} characters, not 20-30 of [A-Z2-7]")
    if not SECRET_RE.match(cred.secret):
        problems.append(f"secret is {len(cred.secret)} characters, not 43-64 of [A-Za-z0-9/+=]")
    run.check("config/credential", "XksProxyAuthenticationCredential format", ok=not problems,
              expected="AccessKeyId 20-30 chars of [A-Z2-7]; RawSecretAccessKey 43-64 chars of [A-Za-z0-9/+=]",
              actual="; ".join(problems) or f"access key id {cred.access_key_id}; secret {len(cred.secret)} characters (not shown)",
              kms=Outcome("OK", "CreateCustomKeyStore accepts the credential") if not problems else
              Outcome("ValidationException", "CreateCustomKeyStore rejects the credential with ValidationException"))


def _key_ids(run: Run) -> None:
    probes = run.settings.probes
    ids = [k for k in (run.settings.key_id, probes.encrypt_only, probes.decrypt_only, probes.no_usage, probes.disabled) if k]
    bad = [k for k in ids if not KEY_ID_RE.match(k)]
    run.check("config/key-id", "XksKeyId format", ok=not bad,
              expected="1-128 characters of [A-Za-z0-9._-]",
              actual=f"invalid: {', '.join(repr(k) for k in bad)}" if bad else f"{len(ids)} key id(s) well-formed",
              kms=Outcome("OK", "CreateKey accepts the XksKeyId") if not bad else
              Outcome("ValidationException", "CreateKey rejects the XksKeyId with ValidationException"))
