"""The `[pkcs11]` section: which module and token, how to log in, pool and timeouts, IV mode.

Parsed by the PKCS#11 backend itself (`Backend.parse_section`), only when it is the chosen
backend; `Config.backend_settings` holds the result. The PIN is read here from `pin_file`
(owner-only) or `$pin_env`, never from config.toml, and is never printed.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keymanager.base import KEY_ID_RE
from xks_proxy.settings.fields import ConfigError, choice, file, float_range, get, int_range, owner_only, table as subtable

IV_MODES = ("proxy", "hsm-zero-buffer", "hsm-appended")
#: Where encrypt, decrypt, key lookups and the health probe call the module: see Pkcs11Config.call_mode.
CALL_MODES = ("auto", "threads", "event-loop")
#: Modules that "auto" calls on the event loop: software tokens inside the process, whose calls
#: are local CPU work (SoftHSMv2: ~100 µs), never a network round trip.
IN_PROCESS_MODULES = ("libsofthsm2.so",)
#: The XKS API's limit on ciphertextMetadata (as xks_proxy.protocol checks it on requests).
MAX_METADATA_BYTES = 20
#: ciphertextMetadata of PKCS#11 ciphertexts unless configured: format 2 = "HSM key, AAD construction 1"
#: (the vault's is format 1). It versions the construction, as the protocol notes advise.
PKCS11_DEFAULT_METADATA = b"\x02"
_FIELDS = frozenset(
    {
        "module", "token_label", "slot", "pin_file", "pin_env", "session_pool_size", "session_wait_seconds",
        "operation_timeout_seconds", "refresh_seconds", "iv_mode", "ciphertext_metadata_b64", "health_key",
        "health_cache_seconds", "call_mode",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """The parsed `[pkcs11]` section. The PIN is excluded from repr."""

    module: Path
    pin: str = field(repr=False)
    token_label: str | None = None
    slot: int | None = None
    session_pool_size: int = 8
    session_wait_seconds: float = 0.05
    operation_timeout_seconds: float = 0.2
    refresh_seconds: float = 1.0
    iv_mode: str = "proxy"
    ciphertext_metadata: bytes = PKCS11_DEFAULT_METADATA
    health_key: str = "xks-proxy-health"
    health_cache_seconds: float = 60.0
    #: "threads": every call on the calling session's worker thread; the event loop only waits, and
    #: operation_timeout_seconds holds however the HSM behaves (the choice for any HSM reached over
    #: a network or a PCIe driver). "event-loop": called on the event loop itself (logins, scans
    #: and reconnects too: one thread enters the module), with no thread hop: for a software
    #: token in the process, where the hop costs more than the call; a hung
    #: module then stalls the whole worker and the timeout cannot fire. "auto": "event-loop" for
    #: the modules in IN_PROCESS_MODULES (SoftHSMv2), "threads" for every other.
    call_mode: str = "auto"

    @property
    def calls_on_event_loop(self) -> bool:
        if self.call_mode == "auto":
            return os.path.basename(os.path.realpath(self.module)) in IN_PROCESS_MODULES
        return self.call_mode == "event-loop"


def parse_pkcs11(home: Path, raw: dict[str, Any]) -> Pkcs11Config:
    """The [pkcs11] section of the document `raw`, required when keymanager.backend is "pkcs11"."""
    if "pkcs11" not in raw:
        raise ConfigError('pkcs11: a [pkcs11] section is required when keymanager.backend = "pkcs11"')
    table = subtable(raw, "pkcs11")
    for key in table:
        if key not in _FIELDS:
            hint = "; the PIN goes in a file named by pin_file, or in $pin_env" if "pin" in key.lower() else ""
            raise ConfigError(f"pkcs11.{key}: unknown field{hint}")
    module = file(home, table, "pkcs11.module", "module", None)
    if module is None:
        raise ConfigError("pkcs11.module: is required (the path of the HSM vendor's PKCS#11 library)")
    token_label = table.get("token_label")
    if token_label is not None and (not isinstance(token_label, str) or not token_label):
        raise ConfigError("pkcs11.token_label: must be a non-empty string")
    slot = int_range(table, "pkcs11.slot", "slot", 0, 0, 2**64 - 1) if "slot" in table else None
    if token_label is not None and slot is not None:
        raise ConfigError("pkcs11.slot: give token_label or slot, not both")
    iv_mode = choice(table, "pkcs11.iv_mode", "iv_mode", IV_MODES, "proxy")
    metadata = _metadata(table)
    health_key = get(table, "pkcs11.health_key", "health_key", str, "xks-proxy-health")
    if not KEY_ID_RE.match(health_key):
        raise ConfigError("pkcs11.health_key: must be 1-128 characters of [A-Za-z0-9._-]")
    return Pkcs11Config(
        module=module,
        pin=_pin(home, table),
        token_label=token_label,
        slot=slot,
        session_pool_size=int_range(table, "pkcs11.session_pool_size", "session_pool_size", 8, 1, 1024),
        session_wait_seconds=float_range(table, "pkcs11.session_wait_seconds", "session_wait_seconds", 0.05, 0.0, 60.0),
        operation_timeout_seconds=float_range(
            table, "pkcs11.operation_timeout_seconds", "operation_timeout_seconds", 0.2, 0.01, 60.0
        ),
        refresh_seconds=float_range(table, "pkcs11.refresh_seconds", "refresh_seconds", 1.0, 0.1, 60.0),
        iv_mode=iv_mode,
        ciphertext_metadata=metadata,
        health_key=health_key,
        health_cache_seconds=float_range(table, "pkcs11.health_cache_seconds", "health_cache_seconds", 60.0, 0.0, 60.0),
        call_mode=choice(table, "pkcs11.call_mode", "call_mode", CALL_MODES, "auto"),
    )


def _metadata(table: dict[str, Any]) -> bytes:
    """ciphertextMetadata of new ciphertexts: standard base64 of at most 20 bytes."""
    default_text = base64.b64encode(PKCS11_DEFAULT_METADATA).decode()
    text = get(table, "pkcs11.ciphertext_metadata_b64", "ciphertext_metadata_b64", str, default_text)
    try:
        metadata = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("pkcs11.ciphertext_metadata_b64: must be standard base64") from None
    if len(metadata) > MAX_METADATA_BYTES:
        raise ConfigError(f"pkcs11.ciphertext_metadata_b64: at most {MAX_METADATA_BYTES} bytes (it is {len(metadata)})")
    return metadata


def _pin(home: Path, table: dict[str, Any]) -> str:
    """The user PIN, from an owner-only file or an environment variable. Never from config.toml."""
    has_file, has_env = "pin_file" in table, "pin_env" in table
    if has_file == has_env:
        raise ConfigError("pkcs11.pin_file: give exactly one of pin_file or pin_env")
    if has_env:
        name = get(table, "pkcs11.pin_env", "pin_env", str, None)
        pin = os.environ.get(name, "")
        if not pin:
            raise ConfigError(f"pkcs11.pin_env: the environment variable {name} is not set")
        return pin
    path = file(home, table, "pkcs11.pin_file", "pin_file", None)
    if path is None:
        raise ConfigError("pkcs11.pin_file: must name a file")
    pin = owner_only(path, "pkcs11.pin_file").read_text().rstrip("\r\n")
    if not pin:
        raise ConfigError(f"pkcs11.pin_file: {path} is empty")
    return pin
