"""The pkcs11 seal's HSM work, run as a short-lived child process (`keymanager.seal.hsm` starts it).

Why a child process: `xks-proxy serve` opens the seal in its supervisor and then forks workers,
and a worker of the pkcs11 backend initialises the same PKCS#11 module itself. A module left
initialised or logged in across a fork is undefined behaviour in PKCS#11 (SoftHSMv2 keeps its
state and locks in the process), and finalising it in a worker would close the backend's own
sessions. So the seal never loads the module in the proxy's processes at all: each operation
is one fresh process that initialises the module, logs in, does one thing, logs out (closing
its session), finalises and exits.

Run by path with `python -I` (no imports from this project: only python-pkcs11 and the standard
library). One JSON request on stdin (the PIN travels only there, never in argv or the
environment), one JSON answer on stdout:

    request  {"op": "prepare" | "encrypt" | "decrypt", "module", "token_label", "key_label",
              "pin", "iv", "aad", "data" (hex)}
    answer   {"ok": true, "data": hex, "created": bool} or {"error": "one line", "kind": ...}

`kind` is "unavailable" (module, token, PIN, key: the seal cannot be reached), "refused" (a key
with that label that the seal must not use) or "no-open" (the HSM says the blob does not open).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

#: PKCS#11 return values by python-pkcs11's exception class, for the common refusals.
_CKR = {
    "PinIncorrect": "CKR_PIN_INCORRECT", "PinLocked": "CKR_PIN_LOCKED", "PinExpired": "CKR_PIN_EXPIRED",
    "PinInvalid": "CKR_PIN_INVALID", "PinLenRange": "CKR_PIN_LEN_RANGE", "TokenNotPresent": "CKR_TOKEN_NOT_PRESENT",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED", "DeviceRemoved": "CKR_DEVICE_REMOVED", "DeviceError": "CKR_DEVICE_ERROR",
    "DeviceMemory": "CKR_DEVICE_MEMORY", "UserTypeInvalid": "CKR_USER_TYPE_INVALID", "MechanismInvalid": "CKR_MECHANISM_INVALID",
    "KeyFunctionNotPermitted": "CKR_KEY_FUNCTION_NOT_PERMITTED", "FunctionFailed": "CKR_FUNCTION_FAILED",
    "GeneralError": "CKR_GENERAL_ERROR", "SessionReadOnly": "CKR_SESSION_READ_ONLY",
    "TemplateInconsistent": "CKR_TEMPLATE_INCONSISTENT", "AttributeValueInvalid": "CKR_ATTRIBUTE_VALUE_INVALID",
    "EncryptedDataInvalid": "CKR_ENCRYPTED_DATA_INVALID", "EncryptedDataLenRange": "CKR_ENCRYPTED_DATA_LEN_RANGE",
}  # fmt: skip
#: What a decryption that does not authenticate raises (vendors differ in which they return).
_NO_OPEN = ("EncryptedDataInvalid", "EncryptedDataLenRange", "FunctionFailed", "GeneralError", "SignatureInvalid")
KEY_BYTES = 32
TAG_BITS = 128


class Refusal(Exception):
    """One line for the operator, and its kind (see the module docstring)."""

    def __init__(self, message: str, kind: str = "unavailable") -> None:
        super().__init__(message)
        self.kind = kind


def ckr(exc: BaseException) -> str:
    name = type(exc).__name__
    return _CKR.get(name, name)


def main() -> int:
    # Held until exit: SoftHSM rewrites its token file on C_Login and C_GenerateKey, and a
    # process killed in the middle would leave it empty. The parent waits for this process.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        request = json.loads(sys.stdin.readline())
        answer: dict[str, Any] = {"ok": True, **run(request)}
    except Refusal as exc:
        answer = {"error": str(exc), "kind": exc.kind}
    except Exception as exc:  # never a traceback (it could quote a frame's locals): its class only
        answer = {"error": f"the PKCS#11 seal failed: {type(exc).__name__}", "kind": "unavailable"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


def run(request: dict[str, Any]) -> dict[str, Any]:
    import pkcs11

    module, token_label, key_label = request["module"], request["token_label"], request["key_label"]
    try:
        library = pkcs11.lib(module)
    except Exception as exc:  # python-pkcs11 raises RuntimeError/OSError variants for a bad path
        raise Refusal(f"cannot load the PKCS#11 module {module} ({type(exc).__name__})") from None
    try:
        try:
            token = library.get_token(token_label=token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise Refusal(f"no token labelled {token_label!r} in {module}") from None
        except pkcs11.exceptions.MultipleTokensReturned:
            raise Refusal(f"several tokens are labelled {token_label!r} in {module}") from None
        try:
            session = token.open(user_pin=request["pin"], rw=request["op"] == "prepare")
        except pkcs11.exceptions.PKCS11Error as exc:
            raise Refusal(f"logging in to token {token_label!r} failed: {ckr(exc)} (check the seal's PIN)") from None
        try:
            return operate(session, request, token_label, key_label)
        except pkcs11.exceptions.PKCS11Error as exc:
            if request["op"] == "decrypt" and type(exc).__name__ in _NO_OPEN:
                raise Refusal(f"the wrapped master key does not open with the key {key_label!r}", "no-open") from None
            raise Refusal(f"token {token_label!r}, key {key_label!r}: {request['op']} failed: {ckr(exc)}") from None
        finally:
            session.close()  # the last session closed: the login ends with it
    finally:
        try:
            library.finalize()
        except Exception:
            pass


def operate(session: Any, request: dict[str, Any], token_label: str, key_label: str) -> dict[str, Any]:
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
    from pkcs11.mechanisms import GCMParams

    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}))
    if len(found) > 1:
        raise Refusal(f"{len(found)} keys on token {token_label!r} are labelled {key_label!r}; the seal needs exactly one", "refused")
    if request["op"] == "prepare":
        if found:
            check_key(found[0], token_label, key_label)
            return {"created": False}
        session.generate_key(
            KeyType.AES, KEY_BYTES * 8, label=key_label, store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False, Attribute.UNWRAP: False,
            },
        )  # fmt: skip
        return {"created": True}
    if not found:
        raise Refusal(f"no key labelled {key_label!r} on token {token_label!r}: the seal's key is gone")
    key = found[0]
    check_key(key, token_label, key_label)
    params = GCMParams(bytes.fromhex(request["iv"]), bytes.fromhex(request["aad"]), TAG_BITS)
    data = bytes.fromhex(request["data"])
    op = key.encrypt if request["op"] == "encrypt" else key.decrypt
    return {"data": bytes(op(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)).hex()}


def check_key(key: Any, token_label: str, key_label: str) -> None:
    """Only a non-extractable, sensitive AES-256 key that may encrypt and decrypt seals."""
    from pkcs11 import Attribute, KeyType

    attrs = key.get_attributes(
        [Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.EXTRACTABLE, Attribute.SENSITIVE, Attribute.ENCRYPT, Attribute.DECRYPT]
    )
    faults = []
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or attrs.get(Attribute.VALUE_LEN) != KEY_BYTES:
        faults.append("not AES-256")
    if attrs.get(Attribute.EXTRACTABLE) is not False:
        faults.append("extractable")
    if attrs.get(Attribute.SENSITIVE) is not True:
        faults.append("not sensitive")
    if not (attrs.get(Attribute.ENCRYPT) and attrs.get(Attribute.DECRYPT)):
        faults.append("not allowed to encrypt and decrypt")
    if faults:
        raise Refusal(
            f"the key labelled {key_label!r} on token {token_label!r} is {', '.join(faults)}; "
            "the pkcs11 seal uses only a non-extractable AES-256 key (choose another --pkcs11-key-label)",
            "refused",
        )


if __name__ == "__main__":
    sys.exit(main())
