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
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import _pkcs11 as _native
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from keymanager.base import KeyUsage
from keymanager.crypto import IV_BYTES, TAG_BYTES, bind_aad, checked_iv
from keymanager.pkcs11.errors import (
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    HsmError,
    TokenLost,
    ckr_name,
    code_name,
    lost_or_failed,
    PKCS11Error,
)
from xks_proxy.errors import InternalException, InvalidCiphertextException


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
