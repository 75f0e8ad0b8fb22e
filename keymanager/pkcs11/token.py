"""Synchronous access to a PKCS#11 token through python-pkcs11, shared by the key manager (on its
worker threads) and by `xks-proxy keys` (the CLI).

- `Library`: one loaded module per process, initialised for multi-threaded use, holding the one
  login every session of the process shares.
- `TokenKey`, `scan`, `find`: what a CKA_LABEL names on the token.
- `gcm_encrypt`, `gcm_decrypt`, `raise_mapped`: one AES-GCM operation in the HSM, with the three
  IV modes and the vendor error codes mapped to XKS errors.
(`keymanager.pkcs11.admin` builds the CLI's key administration on these.)

Nothing here ever sees key material: keys are handles, the HSM does the AES-GCM. The PIN is
passed to C_Login and nowhere else (never into a message).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, NoReturn

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import _pkcs11 as _native
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from keymanager.base import KeyUsage
from keymanager.crypto import IV_BYTES, TAG_BYTES, bind_aad, checked_iv
from xks_proxy.errors import InternalException, InvalidCiphertextException, InvalidKeyUsageException

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


# --- the library -------------------------------------------------------------------------------------

CKF_OS_LOCKING_OK = 0x2


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


_RV_FUNCTION = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST: its version, then C_Initialize and C_Finalize."""

    _fields_ = [("version", _Version), ("C_Initialize", _RV_FUNCTION), ("C_Finalize", _RV_FUNCTION)]


class _InitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class Library:
    """A PKCS#11 module, loaded once per process, initialised with CKF_OS_LOCKING_OK.

    Why not `pkcs11.lib()`: python-pkcs11 calls C_Initialize(NULL), which tells the module that
    the application will never call it from two threads at once; SoftHSMv2 then drops its locks
    and corrupts its heap under our worker threads. So we call C_Initialize ourselves (through
    the module's function list, with OS locking) and use python-pkcs11 for everything else, on
    the same loaded module.

    The login is per process and per token in PKCS#11: one "anchor" session per slot holds it
    for every other session (which open without a PIN, so closing them never logs anyone out).
    `generation` grows on every initialisation: sessions from an older one are dead.
    """

    _loaded: ClassVar[dict[str, "Library"]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def get(cls, module: Path | str) -> "Library":
        path = os.path.realpath(module)  # one module, one Library, however a path names it
        with cls._registry_lock:
            if path not in cls._loaded:
                cls._loaded[path] = cls(path)
            return cls._loaded[path]

    @classmethod
    def finalize_all(cls) -> None:
        """C_Finalize every loaded module (a test switching tokens; never while serving)."""
        with cls._registry_lock:
            libraries = list(cls._loaded.values())
        for library in libraries:
            library.finalize()

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            dll = ctypes.CDLL(path)
            get_function_list = dll.C_GetFunctionList
        except OSError as exc:
            raise HsmError(f"cannot load the PKCS#11 module {path}: {exc}") from None
        except AttributeError:
            raise HsmError(f"{path} is not a PKCS#11 module (it has no C_GetFunctionList)") from None
        functions = ctypes.POINTER(_FunctionListHead)()
        get_function_list.restype = ctypes.c_ulong
        rv = get_function_list(ctypes.byref(functions))
        if rv != 0 or not functions:
            raise HsmError(f"{path}: C_GetFunctionList failed ({code_name(rv)})")
        self._dll = dll  # keeps the module loaded for the life of the process
        self._functions = functions.contents
        # python-pkcs11's view of the same module, made without its own C_Initialize(NULL)
        # (python-pkcs11 >= 0.10 initialises in __init__, which __new__ skips).
        self._native = _native.lib.__new__(_native.lib, path)
        if getattr(self._native, "initialized", True):
            raise HsmError("python-pkcs11 >= 0.10 is required (older versions initialise the module without locking)")
        self.initialized = False
        self.generation = 0
        self._logins: dict[int, Any] = {}

    def initialize(self) -> None:
        with self._lock:
            if self.initialized:
                return
            args = _InitializeArgs(flags=CKF_OS_LOCKING_OK)
            rv = self._functions.C_Initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
            if rv not in (0, CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise TokenLost(f"C_Initialize of {self.path} failed: {code_name(rv)}", code_name(rv))
            self.initialized = True
            self.generation += 1

    def finalize(self) -> None:
        """C_Finalize: every session of the process is closed by the module (and the login gone)."""
        with self._lock:
            self._logins.clear()
            if self.initialized:
                self.initialized = False
                self._functions.C_Finalize(None)

    def reconnect(self, seen_generation: int) -> None:
        """Re-initialise after a failure seen in `seen_generation`, unless someone already has."""
        with self._lock:
            if self.initialized and self.generation != seen_generation:
                return
            self.finalize()
            self.initialize()

    def token(self, label: str | None, slot: int | None) -> Any:
        """The token named by label, or by slot id, or else the first initialised one."""
        with self._lock:
            self.initialize()
            try:
                tokens = [t for t in self._tokens(slot) if label is None or t.label == label]
            except PKCS11Error as exc:
                raise lost_or_failed(exc, "listing the PKCS#11 slots") from None
        wanted = f"labelled {label!r}" if label is not None else f"in slot {slot}" if slot is not None else "initialised"
        if not tokens:
            raise TokenLost(f"no token {wanted} in {self.path}")
        if label is not None and len(tokens) > 1:
            raise HsmError(f"{len(tokens)} tokens are labelled {label!r}; set pkcs11.slot to choose one")
        return tokens[0]

    def _tokens(self, slot: int | None) -> list[Any]:
        """Initialised tokens, in slot order (an HSM often shows an empty slot for a new token too)."""
        tokens = []
        for candidate in self._native.get_slots(token_present=True):
            if slot is not None and candidate.slot_id != slot:
                continue
            try:
                token = candidate.get_token()
            except (p11.TokenNotPresent, p11.TokenNotRecognised):
                continue
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                tokens.append(token)
        return tokens

    def session(self, token: Any, pin: str, rw: bool = False) -> Any:
        """A new session on `token`, logged in through the process's anchor session."""
        with self._lock:
            slot_id = token.slot.slot_id
            try:
                if slot_id not in self._logins:
                    try:
                        self._logins[slot_id] = token.open(user_pin=pin)
                    except p11.UserAlreadyLoggedIn:  # logged in by another user of the module in this process
                        self._logins[slot_id] = None
                return token.open(rw=rw)
            except PKCS11Error as exc:
                raise lost_or_failed(exc, f"opening a session on token {token.label!r}") from None


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP until the block ends (they are delivered then).

    For a short-lived process (the CLI) around calls that write the token: SoftHSM rewrites its
    token file on C_Login and C_GenerateKey, and a process killed in the middle leaves it empty.
    (A serving process defers its stop in its event loop instead; see xks_proxy/process/worker.py.)
    """
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- keys on the token -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What one CKA_LABEL names: a secret key object (or several, which is an error to report)."""

    label: str
    handle: int
    key_type: int | None
    length: int | None  # CKA_VALUE_LEN, bytes
    encrypt: bool
    decrypt: bool
    copies: int = 1

    @property
    def key_spec(self) -> str:
        """keySpec as KMS reads it: AES_256 is the only one it accepts; others say what they are."""
        if self.key_type == KeyType.AES:
            return f"AES_{self.length * 8}" if self.length else "AES"
        try:
            return KeyType(self.key_type).name
        except ValueError:
            return f"KEY_TYPE_0x{self.key_type or 0:X}"

    @property
    def usage(self) -> tuple[KeyUsage, ...]:
        return tuple(u for u, allowed in ((KeyUsage.ENCRYPT, self.encrypt), (KeyUsage.DECRYPT, self.decrypt)) if allowed)

    @property
    def xks_ready(self) -> bool:
        return self.key_type == KeyType.AES and self.length == 32


def duplicate_message(label: str, copies: int) -> str:
    return f"{copies} objects in the HSM are labelled {label}; a key id must name exactly one key (remove or relabel the others)"


_DESCRIBE = [Attribute.LABEL, Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ENCRYPT, Attribute.DECRYPT]


def describe(obj: Any) -> TokenKey:
    attrs = obj.get_attributes(_DESCRIBE)
    return TokenKey(
        label=attrs.get(Attribute.LABEL) or "",
        handle=obj.handle,
        key_type=attrs.get(Attribute.KEY_TYPE),
        length=attrs.get(Attribute.VALUE_LEN),
        encrypt=bool(attrs.get(Attribute.ENCRYPT)),
        decrypt=bool(attrs.get(Attribute.DECRYPT)),
    )


def scan(session: Any) -> dict[str, TokenKey]:
    """Every labelled secret key on the token, by label; a label used twice has copies > 1."""
    keys: dict[str, TokenKey] = {}
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}):
        key = describe(obj)
        if not key.label:
            continue
        if key.label in keys:
            key = replace(keys[key.label], copies=keys[key.label].copies + 1)
        keys[key.label] = key
    return keys


def find(session: Any, label: str) -> list[Any]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True, Attribute.LABEL: label}))


def check_token(session: Any) -> None:
    """C_GetTokenInfo: raises TokenLost when the token itself is gone (not just one key)."""
    try:
        session.token.slot.get_token()
    except PKCS11Error as exc:
        raise TokenLost(f"the token stopped answering: {ckr_name(exc)}", ckr_name(exc)) from None


# --- AES-GCM in the HSM -----------------------------------------------------------------------------


def gcm_encrypt(session: Any, key: Any, plaintext: bytes, aad: bytes | None, metadata: bytes, iv_mode: str) -> tuple[bytes, bytes, bytes]:
    """(iv, ciphertext, tag). Who makes the IV depends on the HSM (pkcs11.iv_mode):

    proxy            we draw it from the HSM's C_GenerateRandom and pass it in;
    hsm-zero-buffer  we pass a zeroed 12-byte IV buffer and the HSM writes its IV into it;
    hsm-appended     the HSM makes the IV and returns ciphertext || tag || IV.
    In every mode an all-zero or missing IV is refused (InternalException), never returned.
    """
    if iv_mode == "proxy":
        nonce: bytes | bytearray = checked_iv(session.generate_random(IV_BYTES * 8), "the HSM's C_GenerateRandom")
    else:
        nonce = bytearray(IV_BYTES)  # a fresh buffer: the HSM may write into it
    params = GCMParams(nonce, bind_aad(aad, metadata), TAG_BYTES * 8)
    out = key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
    size = len(plaintext)
    expected = size + TAG_BYTES + (IV_BYTES if iv_mode == "hsm-appended" else 0)
    if len(out) != expected:
        raise InternalException(
            f"the HSM returned {len(out)} bytes for a {size}-byte plaintext where iv_mode {iv_mode} expects {expected}; "
            "check pkcs11.iv_mode"
        )
    if iv_mode == "hsm-appended":
        iv = checked_iv(out[size + TAG_BYTES :], "the HSM (iv_mode hsm-appended)")
    else:
        iv = checked_iv(bytes(nonce), "the HSM (iv_mode hsm-zero-buffer)" if iv_mode == "hsm-zero-buffer" else "the proxy")
    return iv, out[:size], out[size : size + TAG_BYTES]


def gcm_decrypt(key: Any, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes | None, metadata: bytes | None) -> bytes:
    if len(iv) != IV_BYTES:
        raise InvalidCiphertextException(f"initializationVector is {len(iv)} bytes; ciphertexts of this key store use 12")
    params = GCMParams(iv, bind_aad(aad, metadata), TAG_BYTES * 8)
    return bytes(key.decrypt(ciphertext + tag, mechanism=Mechanism.AES_GCM, mechanism_param=params))
