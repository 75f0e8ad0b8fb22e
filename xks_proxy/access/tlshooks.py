"""Two OpenSSL settings Python's `ssl` module cannot make, reached through ctypes.

- The TLS 1.3 cipher suites (`SSL_CTX_set_ciphersuites`): `SSLContext.set_ciphers` only
  governs TLS 1.2, and OpenSSL's TLS 1.3 default also offers TLS_AES_128_GCM_SHA256, which is
  not on the XKS specification's list.
- A certificate verification callback (`SSL_CTX_set_verify`): it lets the client name check
  refuse inside the handshake, so the client gets a TLS alert instead of a bare close.

Both act on the `SSL_CTX` of an `ssl.SSLContext`, in the very libssl that Python's `_ssl`
module uses (found by its soname, never loaded anew, and checked against ssl.OPENSSL_VERSION_NUMBER).
Everything here fails safe: when a hook cannot be installed the caller keeps what `ssl` can do
alone (OpenSSL's default TLS 1.3 suites, all AEAD; the client name check after the handshake).
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from typing import Callable

#: X509_V_ERR_HOSTNAME_MISMATCH: OpenSSL 3.0 answers it with the `bad_certificate` alert
#: (ssl/statem/statem_lib.c, x509table). No verification error maps to `access_denied`.
X509_V_ERR_HOSTNAME_MISMATCH = 62
#: X509_V_ERR_APPLICATION_VERIFICATION (`handshake_failure`): the callback itself failed.
X509_V_ERR_APPLICATION_VERIFICATION = 50

#: int verify_callback(int preverify_ok, X509_STORE_CTX *ctx)
VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class HookError(Exception):
    """The hook cannot be installed here (no such libssl, another Python, a call refused)."""


class _OpenSsl:
    """The functions used, bound once on the libssl (and its libcrypto) already in this process."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
            raise HookError(f"not CPython on Linux ({sys.implementation.name} on {sys.platform})")
        soname = "libssl.so.3" if ssl.OPENSSL_VERSION_INFO[0] >= 3 else "libssl.so.1.1"
        try:
            lib = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | ctypes.RTLD_LOCAL)  # only the one _ssl loaded
        except OSError as exc:
            raise HookError(f"{soname} is not loaded by Python's ssl module: {exc}") from None
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            raise HookError(f"{soname} is not the OpenSSL Python's ssl module uses ({ssl.OPENSSL_VERSION})")
        self._bind(lib)

    def _bind(self, lib: ctypes.CDLL) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int
        self.get_options = _fn(lib.SSL_CTX_get_options, ctypes.c_uint64, p)
        self.set_ciphersuites = _fn(lib.SSL_CTX_set_ciphersuites, i, p, ctypes.c_char_p)
        self.get_verify_mode = _fn(lib.SSL_CTX_get_verify_mode, i, p)
        self.set_verify = _fn(lib.SSL_CTX_set_verify, None, p, i, VerifyCallback)
        self.error_depth = _fn(lib.X509_STORE_CTX_get_error_depth, i, p)
        self.current_cert = _fn(lib.X509_STORE_CTX_get_current_cert, p, p)
        self.set_error = _fn(lib.X509_STORE_CTX_set_error, None, p, i)
        self.i2d_x509 = _fn(lib.i2d_X509, i, p, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)))

    def ssl_ctx(self, context: ssl.SSLContext) -> int:
        """The SSL_CTX pointer: the first field after the object header of CPython's PySSLContext.

        Checked before any use: OpenSSL must report the same options as the Python object.
        """
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not pointer or self.get_options(pointer) != int(context.options):
            raise HookError("cannot find the SSL_CTX of an SSLContext in this Python")
        return pointer

    def leaf_der(self, store: int) -> bytes:
        """DER of the certificate being verified (i2d_X509 into a buffer of ours)."""
        cert = self.current_cert(store)
        size = self.i2d_x509(cert, None) if cert else -1
        if size <= 0:
            raise HookError("no certificate to check")
        buffer = (ctypes.c_ubyte * size)()
        cursor = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_ubyte))
        if self.i2d_x509(cert, ctypes.byref(cursor)) != size:
            raise HookError("i2d_X509 failed")
        return bytes(buffer)


def _fn(function, restype, *argtypes):  # type: ignore[no-untyped-def]
    function.restype = restype
    function.argtypes = argtypes
    return function


_openssl: _OpenSsl | None = None


def openssl() -> _OpenSsl:
    """The binding, made on first use; raises HookError when this process cannot have it."""
    global _openssl
    if _openssl is None:
        _openssl = _OpenSsl()
    return _openssl


def set_tls13_suites(context: ssl.SSLContext, suites: str) -> None:
    """Offer exactly these TLS 1.3 suites (colon-separated OpenSSL names); raises HookError."""
    lib = openssl()
    if lib.set_ciphersuites(lib.ssl_ctx(context), suites.encode()) != 1:
        raise HookError(f"OpenSSL refused the TLS 1.3 suites {suites}")
    offered = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"}
    if offered != set(suites.split(":")):
        raise HookError(f"TLS 1.3 suites are {sorted(offered)} after setting {suites}")


def check_leaf_in_handshake(context: ssl.SSLContext, allowed: Callable[[bytes], bool]) -> VerifyCallback:
    """Let `allowed(leaf DER)` refuse a client certificate that verified, inside the handshake.

    Returns the ctypes callback, which must stay referenced as long as the context lives.
    A refusal is X509_V_ERR_HOSTNAME_MISMATCH, so OpenSSL sends `bad_certificate`. Anything
    going wrong inside the callback refuses too (fail closed): an exception cannot cross into C.
    """
    lib = openssl()
    ctx = lib.ssl_ctx(context)

    def verify(ok: int, store: int) -> int:
        try:
            if not ok or lib.error_depth(store) != 0:
                return ok  # OpenSSL's own verdict (unknown CA, expired, ...), and CA certificates
            if allowed(lib.leaf_der(store)):
                return 1
            lib.set_error(store, X509_V_ERR_HOSTNAME_MISMATCH)
        except BaseException:  # noqa: BLE001 - fail closed; nothing may propagate into OpenSSL
            lib.set_error(store, X509_V_ERR_APPLICATION_VERIFICATION)
        return 0

    callback = VerifyCallback(verify)
    lib.set_verify(ctx, lib.get_verify_mode(ctx), callback)
    return callback
