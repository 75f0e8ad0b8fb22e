"""Callers of the local KMS: access keys, each mapping to an IAM user ARN KMS passes on to the proxy.

An access key id looks like AWS's (AKIA + 16 base-32 characters) and its 40-character secret is
sealed under the state's master key; SigV4 verification asks `secret_for` per request, so a
principal added by `local-kms principal add` while the server runs is known at once.
"""

from __future__ import annotations

import re
import secrets
import string

from xks_proxy.localkms.context import Local, now

_AKID_ALPHABET = string.ascii_uppercase + "234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
NAME_RE = re.compile(r"[\w+=,.@-]{1,64}")
FIRST_PRINCIPAL = "local-admin"


class PrincipalError(ValueError):
    """A principal that cannot be added (bad or taken name)."""


def _context(access_key_id: str) -> str:
    return f"principal {access_key_id} secret"


def add(local: Local, name: str) -> tuple[str, str, str]:
    """A new principal: (arn, access key id, secret). The secret is shown once and kept sealed."""
    if not NAME_RE.fullmatch(name):
        raise PrincipalError(f"principal name {name!r}: 1-64 of letters, digits and +=,.@_-")
    arn = f"arn:aws:iam::{local.account}:user/{name}"
    if any(doc["arn"] == arn for doc in local.state.all("principal")):
        raise PrincipalError(f"a principal named {name} exists already")
    while True:
        access_key_id = "AKIA" + "".join(secrets.choice(_AKID_ALPHABET) for _ in range(16))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
        doc = {"access_key_id": access_key_id, "name": name, "arn": arn, "secret": local.seal(secret.encode(), _context(access_key_id))}
        if local.state.insert("principal", access_key_id, doc, now()):
            return arn, access_key_id, secret


def arn_of(local: Local, access_key_id: str) -> str | None:
    doc = local.state.get("principal", access_key_id)
    return doc["arn"] if doc else None


def secret_for(local: Local, access_key_id: str) -> str | None:
    doc = local.state.get("principal", access_key_id)
    return local.unseal(doc["secret"], _context(access_key_id)).decode() if doc else None


def credentials_text(arn: str, access_key_id: str, secret: str) -> str:
    """The three lines `local-kms` prints for a new principal (pasteable into ~/.aws/credentials)."""
    return f"principal {arn}\naws_access_key_id = {access_key_id}\naws_secret_access_key = {secret}\n"
