"""The pkcs11 seal: the master key wrapped by an AES-256 key that never leaves an HSM.

As HashiCorp Vault's PKCS#11 seal: the KEK is a token object (CKA_TOKEN, CKA_SENSITIVE, not
CKA_EXTRACTABLE), the HSM does the AES-GCM, and the proxy opens itself at start with the token's
user PIN from config.toml's `[seal] pin_file` (owner-only) or `pin_env`. The seal record holds
only the module path, the token label and the key label: nothing secret, and no PIN location
(in a fleet the record is shared; where each proxy keeps its PIN is that proxy's config).

Every HSM operation runs in a short-lived child process (`hsm_child`, see its docstring for
why): the proxy's own processes never load the PKCS#11 module for the seal, so the supervisor
forks workers with no module state, and a pkcs11-backend worker's module, sessions and login are
never touched by the seal (a rotation's keyring refresh in a worker starts its own child too).
The master key's bytes leave `keymanager.crypto` only into the child's stdin pipe, to the HSM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from keymanager.crypto import MasterKey, hsm_unwrap, hsm_wrap
from keymanager.seal.record import SealError

CHILD = Path(__file__).with_name("hsm_child.py")
#: How long one HSM operation may take (a network HSM's login included) before the seal gives up.
TIMEOUT_SECONDS = 60.0
DEFAULT_KEY_LABEL = "xks-proxy-seal"


class HsmUnavailable(SealError, OSError):
    """The HSM cannot be reached or refuses us (module, token, PIN, key): one line, safe to show.

    Also an OSError, so a keyring refresh in a serving worker (which tolerates an unreadable
    record) keeps the keys it holds instead of failing the request; at start it is a SealError,
    which stops `serve` with this line.
    """


def make_hsm_kek(params: dict[str, Any], pin: str | None) -> tuple[dict[str, Any], "HsmKek"]:
    """`init --seal pkcs11`: log in, find the key by label or generate it on the token; (record params, KEK).

    An existing key with the label is used only if it is a non-extractable, sensitive AES-256 key.
    """
    kek = open_hsm_kek(_record_params(params), pin)
    kek.call("prepare")
    return dict(kek.params), kek


def open_hsm_kek(params: dict[str, Any], pin: str | None) -> "HsmKek":
    """The KEK named by the record's params. Nothing is asked of the HSM until it wraps or unwraps."""
    if not pin:
        raise SealError("the pkcs11 seal needs the token's user PIN: set [seal] pin_file (chmod 600) or pin_env in config.toml")
    try:
        checked = {name: params[name] for name in ("module", "token_label", "key_label")}
    except (KeyError, TypeError):
        raise SealError("the seal record's pkcs11 parameters are malformed (module, token_label, key_label)") from None
    if not all(isinstance(value, str) and value for value in checked.values()):
        raise SealError("the seal record's pkcs11 parameters are malformed (module, token_label, key_label)")
    return HsmKek(checked, pin)


def _record_params(given: dict[str, Any]) -> dict[str, Any]:
    """module (an absolute path, so `serve` finds it from any directory), token_label, key_label."""
    return {
        "module": os.path.abspath(str(given.get("module") or "")),
        "token_label": str(given.get("token_label") or ""),
        "key_label": str(given.get("key_label") or DEFAULT_KEY_LABEL),
    }


class HsmKek:
    """A KEK that is a key on a PKCS#11 token: `wrap`/`unwrap` as `keymanager.crypto.Kek`.

    unwrap raises ValueError when the HSM says the blob does not open with this key, and
    HsmUnavailable when the HSM cannot be asked (no module or token, a refused PIN, no key).
    """

    __slots__ = ("params", "_pin")

    def __init__(self, params: dict[str, str], pin: str) -> None:
        self.params = params
        self._pin = pin

    def __repr__(self) -> str:
        return f"HsmKek(token={self.params['token_label']!r}, key={self.params['key_label']!r})"

    def wrap(self, master: MasterKey) -> bytes:
        return hsm_wrap(master, lambda iv, plaintext, aad: self.call("encrypt", iv, plaintext, aad))

    def unwrap(self, blob: bytes, key_id: str) -> MasterKey:
        return hsm_unwrap(blob, key_id, lambda iv, data, aad: self.call("decrypt", iv, data, aad))

    def call(self, op: str, iv: bytes = b"", data: bytes = b"", aad: bytes = b"") -> bytes:
        """One operation in a fresh child process; its answer's data. Raises as the class docstring says."""
        request = dict(self.params, op=op, pin=self._pin, iv=iv.hex(), data=data.hex(), aad=aad.hex())
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(CHILD)], input=json.dumps(request) + "\n", capture_output=True, text=True,
                timeout=TIMEOUT_SECONDS, process_group=0,  # its own group: a terminal's ^C does not cut a login short
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise HsmUnavailable(f"token {self.params['token_label']!r}: the HSM did not answer within {TIMEOUT_SECONDS:.0f} s") from None
        except OSError as exc:
            raise HsmUnavailable(f"cannot start the PKCS#11 seal's helper process: {exc.strerror}") from None
        try:
            answer = json.loads(done.stdout.splitlines()[-1])
        except (IndexError, ValueError):
            # The module crashed the helper (stderr is not shown: nothing of ours is in it, but a vendor's may be).
            raise HsmUnavailable(
                f"the PKCS#11 seal's helper process ended without an answer (exit status {done.returncode})"
            ) from None
        if "error" in answer:
            message = str(answer["error"]).splitlines()[0] if answer["error"] else "the PKCS#11 seal failed"
            if answer.get("kind") == "no-open":
                raise ValueError(message)
            if answer.get("kind") == "refused":
                raise SealError(message)
            raise HsmUnavailable(message)
        return bytes.fromhex(answer.get("data", ""))
