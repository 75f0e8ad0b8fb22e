"""PKCS#11 failures by name: the spec's CKR_ return codes, python-pkcs11's exceptions, and what
each means to the proxy (a bad ciphertext, a refused usage, a lost device, a refused PIN).

Kept apart from the token access (token.py) because it is a table, not behaviour: every log line
and every XKS error that names an HSM failure takes its words from here, never a raw number.
"""

from __future__ import annotations

import re
from typing import NoReturn

from pkcs11 import exceptions as p11

from xks_proxy.errors import InvalidCiphertextException, InvalidKeyUsageException

PKCS11Error = p11.PKCS11Error

# --- errors ----------------------------------------------------------------------------------------


class HsmError(Exception):
    """A PKCS#11 failure, described for the operator by its CKR name (never with a PIN or data)."""

    def __init__(self, message: str, ckr: str | None = None) -> None:
        super().__init__(message)
        self.ckr = ckr


class TokenLost(HsmError):
    """The token or the library stopped working: close every session, re-initialise, reconnect."""


class LoginRefused(HsmError):
    """The HSM refused the PIN. Nobody retries: repeated wrong PINs lock the account."""


class StaleHandle(HsmError):
    """A cached object handle no longer names an object: look the label up again."""


#: Every return value of the PKCS#11 v3.0 spec (pkcs11t.h), by code. python-pkcs11 exposes no
#: CKR_* constants to Python (its constants module has attributes, mechanisms and flags only),
#: so the spec's table is written out once here; a vendor code shows as CKR_VENDOR_DEFINED+0x...
CKR_NAMES: dict[int, str] = {
    0x1: "CKR_CANCEL", 0x2: "CKR_HOST_MEMORY", 0x3: "CKR_SLOT_ID_INVALID", 0x5: "CKR_GENERAL_ERROR",
    0x6: "CKR_FUNCTION_FAILED", 0x7: "CKR_ARGUMENTS_BAD", 0x8: "CKR_NO_EVENT", 0x9: "CKR_NEED_TO_CREATE_THREADS",
    0xA: "CKR_CANT_LOCK", 0x10: "CKR_ATTRIBUTE_READ_ONLY", 0x11: "CKR_ATTRIBUTE_SENSITIVE",
    0x12: "CKR_ATTRIBUTE_TYPE_INVALID", 0x13: "CKR_ATTRIBUTE_VALUE_INVALID", 0x1B: "CKR_ACTION_PROHIBITED",
    0x20: "CKR_DATA_INVALID", 0x21: "CKR_DATA_LEN_RANGE", 0x30: "CKR_DEVICE_ERROR", 0x31: "CKR_DEVICE_MEMORY",
    0x32: "CKR_DEVICE_REMOVED", 0x40: "CKR_ENCRYPTED_DATA_INVALID", 0x41: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    0x50: "CKR_FUNCTION_CANCELED", 0x51: "CKR_FUNCTION_NOT_PARALLEL", 0x54: "CKR_FUNCTION_NOT_SUPPORTED",
    0x60: "CKR_KEY_HANDLE_INVALID", 0x62: "CKR_KEY_SIZE_RANGE", 0x63: "CKR_KEY_TYPE_INCONSISTENT",
    0x64: "CKR_KEY_NOT_NEEDED", 0x65: "CKR_KEY_CHANGED", 0x66: "CKR_KEY_NEEDED", 0x67: "CKR_KEY_INDIGESTIBLE",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED", 0x69: "CKR_KEY_NOT_WRAPPABLE", 0x6A: "CKR_KEY_UNEXTRACTABLE",
    0x70: "CKR_MECHANISM_INVALID", 0x71: "CKR_MECHANISM_PARAM_INVALID", 0x82: "CKR_OBJECT_HANDLE_INVALID",
    0x90: "CKR_OPERATION_ACTIVE", 0x91: "CKR_OPERATION_NOT_INITIALIZED", 0xA0: "CKR_PIN_INCORRECT",
    0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE", 0xA3: "CKR_PIN_EXPIRED", 0xA4: "CKR_PIN_LOCKED",
    0xB0: "CKR_SESSION_CLOSED", 0xB1: "CKR_SESSION_COUNT", 0xB3: "CKR_SESSION_HANDLE_INVALID",
    0xB4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED", 0xB5: "CKR_SESSION_READ_ONLY", 0xB6: "CKR_SESSION_EXISTS",
    0xB7: "CKR_SESSION_READ_ONLY_EXISTS", 0xB8: "CKR_SESSION_READ_WRITE_SO_EXISTS", 0xC0: "CKR_SIGNATURE_INVALID",
    0xC1: "CKR_SIGNATURE_LEN_RANGE", 0xD0: "CKR_TEMPLATE_INCOMPLETE", 0xD1: "CKR_TEMPLATE_INCONSISTENT",
    0xE0: "CKR_TOKEN_NOT_PRESENT", 0xE1: "CKR_TOKEN_NOT_RECOGNIZED", 0xE2: "CKR_TOKEN_WRITE_PROTECTED",
    0xF0: "CKR_UNWRAPPING_KEY_HANDLE_INVALID", 0xF1: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    0xF2: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT", 0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN", 0x102: "CKR_USER_PIN_NOT_INITIALIZED", 0x103: "CKR_USER_TYPE_INVALID",
    0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x105: "CKR_USER_TOO_MANY_TYPES", 0x110: "CKR_WRAPPED_KEY_INVALID",
    0x112: "CKR_WRAPPED_KEY_LEN_RANGE", 0x113: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    0x114: "CKR_WRAPPING_KEY_SIZE_RANGE", 0x115: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
    0x120: "CKR_RANDOM_SEED_NOT_SUPPORTED", 0x121: "CKR_RANDOM_NO_RNG", 0x130: "CKR_DOMAIN_PARAMS_INVALID",
    0x140: "CKR_CURVE_NOT_SUPPORTED", 0x150: "CKR_BUFFER_TOO_SMALL", 0x160: "CKR_SAVED_STATE_INVALID",
    0x170: "CKR_INFORMATION_SENSITIVE", 0x180: "CKR_STATE_UNSAVEABLE", 0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED", 0x1A0: "CKR_MUTEX_BAD", 0x1A1: "CKR_MUTEX_NOT_LOCKED",
    0x1B0: "CKR_NEW_PIN_MODE", 0x1B1: "CKR_NEXT_OTP", 0x1C0: "CKR_EXCEEDED_MAX_ITERATIONS",
    0x1C1: "CKR_FIPS_SELF_TEST_FAILED", 0x1C2: "CKR_LIBRARY_LOAD_FAILED", 0x1C3: "CKR_PIN_TOO_WEAK",
    0x1C4: "CKR_PUBLIC_KEY_INVALID", 0x200: "CKR_FUNCTION_REJECTED", 0x201: "CKR_TOKEN_RESOURCE_EXCEEDED",
    0x202: "CKR_OPERATION_CANCEL_FAILED", 0x203: "CKR_KEY_EXHAUSTED",
}  # fmt: skip
CKR_VENDOR_DEFINED = 0x80000000
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
#: python-pkcs11 class names that do not spell their CKR name (British spelling, word order).
_CLASS_ALIASES = {
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
}
#: Codes python-pkcs11 raises as a bare PKCS11Error, recognised by its fixed message.
_MESSAGE_CODES = (
    ("not initialized", 0x190), ("already initialized", 0x191), ("Buffer was too small", 0x150),
    ("Parallel not supported", 0xB4), ("User type invalid", 0x103),
)  # fmt: skip


_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # SlotIDInvalid -> Slot_ID_Invalid


def _class_ckr_names() -> dict[type[BaseException], str]:
    """python-pkcs11's exception classes by CKR name, derived from their names (GeneralError ->
    CKR_GENERAL_ERROR) and checked against the spec's table, so no class is listed by hand.
    Its own non-CKR errors (NoSuchKey, MultipleObjectsReturned, ...) have no entry."""
    known = set(CKR_NAMES.values())
    names: dict[type[BaseException], str] = {}
    for attr in dir(p11):
        cls = getattr(p11, attr)
        if not (isinstance(cls, type) and issubclass(cls, PKCS11Error)) or cls is PKCS11Error:
            continue
        name = _CLASS_ALIASES.get(cls.__name__) or "CKR_" + _WORD_BREAK.sub("_", cls.__name__).upper()
        if name in known:
            names[cls] = name
    return names


_CLASS_NAMES = _class_ckr_names()

#: A failed tag check, as vendors report it (SoftHSMv2 says GENERAL_ERROR, nShield FUNCTION_FAILED).
BAD_CIPHERTEXT = frozenset(
    {"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE", "CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED"}
)
USAGE_REFUSED = frozenset({"CKR_KEY_FUNCTION_NOT_PERMITTED", "CKR_KEY_TYPE_INCONSISTENT"})
STALE_HANDLE = frozenset({"CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID"})
#: The token, the library or our sessions are gone: only a reconnect helps.
DEVICE_LOST = frozenset(
    {
        "CKR_DEVICE_ERROR", "CKR_DEVICE_MEMORY", "CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT",
        "CKR_TOKEN_NOT_RECOGNIZED", "CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED",
        "CKR_CRYPTOKI_NOT_INITIALIZED", "CKR_USER_NOT_LOGGED_IN", "CKR_SLOT_ID_INVALID", "CKR_GENERAL_ERROR",
        "CKR_FUNCTION_FAILED",
    }
)  # fmt: skip
PIN_REFUSED = frozenset({"CKR_PIN_INCORRECT", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE", "CKR_PIN_EXPIRED", "CKR_PIN_LOCKED"})


def ckr_name(exc: BaseException) -> str:
    """The CKR_* name of a python-pkcs11 exception, whether it is a class or a raw code in the message."""
    for cls in type(exc).__mro__:
        if cls in _CLASS_NAMES:
            return _CLASS_NAMES[cls]
    return code_name(_code_in(str(exc)))


def code_name(code: int | None) -> str:
    """The spec's name for a raw CK_RV (vendor codes as CKR_VENDOR_DEFINED+0x..)."""
    if code is None:
        return "CKR_UNKNOWN"
    if code >= CKR_VENDOR_DEFINED:
        return f"CKR_VENDOR_DEFINED+0x{code - CKR_VENDOR_DEFINED:X}"
    return CKR_NAMES.get(code, f"CKR_0x{code:X}")


def _code_in(message: str) -> int | None:
    for text, code in _MESSAGE_CODES:
        if text in message:
            return code
    match = re.search(r"0x([0-9a-fA-F]+)", message)
    return int(match.group(1), 16) if match else None


def lost_or_failed(exc: PKCS11Error, doing: str) -> HsmError:
    """Classify a failure outside a decrypt: device trouble (reconnect) or a plain failure."""
    ckr = ckr_name(exc)
    if ckr in DEVICE_LOST:
        return TokenLost(f"{doing}: {ckr}", ckr)
    if ckr in PIN_REFUSED:
        return LoginRefused(f"{doing}: the HSM refused the PIN ({ckr})", ckr)
    if ckr in STALE_HANDLE:
        return StaleHandle(f"{doing}: {ckr}", ckr)
    return HsmError(f"{doing}: {ckr}", ckr)


def raise_mapped(exc: PKCS11Error, key_id: str, operation: str) -> NoReturn:
    """Turn a failed encrypt/decrypt into the XKS error it means (or an internal signal)."""
    ckr = ckr_name(exc)
    if operation == "decrypt" and ckr in BAD_CIPHERTEXT:
        raise InvalidCiphertextException("authentication failed: ciphertext, IV, tag, AAD or metadata do not match") from None
    if ckr in USAGE_REFUSED:
        raise InvalidKeyUsageException(f"the HSM refused to {operation} with key {key_id} ({ckr})") from None
    raise lost_or_failed(exc, f"{operation} with key {key_id}") from None
