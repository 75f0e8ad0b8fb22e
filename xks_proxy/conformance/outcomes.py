"""What KMS does with each kind of proxy answer, as the conformance report words it.

The mapping itself is `xks_proxy.kms_outcomes`, the one table the local KMS (`xks-proxy
local-kms`) raises from too; this module only turns its answers into report outcomes (a
machine-readable code and a sentence), so every check predicts outcomes the same way, and the
same way the local KMS behaves.

An observation ("kind") is one of the constants below, or a well-formed proxy errorName.
"""

from __future__ import annotations

from xks_proxy import kms_outcomes as table
from xks_proxy.kms_outcomes import (  # the kinds, re-exported for the checks
    ALL_UNAVAILABLE,
    HTTP_REFUSED,
    INVALID_RESPONSE,
    KEY_CONFIG,
    OK,
    TIMEOUT,
    TLS,
    UNREACHABLE,
    connection_code,
)
from xks_proxy.conformance.results import Outcome

__all__ = [
    "ALL_UNAVAILABLE", "HTTP_REFUSED", "INVALID_RESPONSE", "KEY_CONFIG", "OK", "TIMEOUT", "TLS", "UNREACHABLE",
    "connection_code", "connect", "create_key", "crypto", "tampering_accepted", "forged_accepted", "http_refused",
]


def connect(kind: str, operation: str = "ConnectCustomKeyStore") -> Outcome:
    """Outcome of a GetHealthStatus (or any request) KMS makes while creating/connecting a store."""
    code = connection_code(kind)
    if kind == OK:
        texts = {
            "CreateCustomKeyStore": "CreateCustomKeyStore succeeds",
            "KmsHealthCheck": "KMS periodic health check passes; the store stays CONNECTED",
        }
        return Outcome(code, texts.get(operation, f"{operation}: ConnectionState CONNECTED"))
    exception = table.create_store_exception(kind)
    if operation == "CreateCustomKeyStore":
        return Outcome(code, f"CreateCustomKeyStore fails with {exception} (ConnectionErrorCode {code} on connect)")
    if operation == "KmsHealthCheck":
        return Outcome(code, f"KMS periodic health check fails ({code}); KMS reports the store unhealthy")
    return Outcome(code, f"ConnectCustomKeyStore: ConnectionState FAILED, ConnectionErrorCode {code}")


def create_key(kind: str) -> Outcome:
    """Outcome of the GetKeyMetadata call KMS makes in CreateKey."""
    if kind == OK:
        return Outcome("OK", "CreateKey succeeds for this XksKeyId")
    exception = table.create_key_exception(kind)
    return Outcome(exception, f"CreateKey fails with {exception}")


def crypto(kind: str, operation: str) -> Outcome:
    """What Encrypt/Decrypt callers of a KMS key in this store would get.

    An unreachable proxy or a bad certificate is reported by its ConnectionErrorCode, the more
    useful code for an operator; the caller's exception is the table's.
    """
    if kind == OK:
        return Outcome("OK", f"KMS {operation} succeeds")
    exception = table.crypto_exception(kind, operation)
    if kind in (TLS, UNREACHABLE):
        code = connection_code(kind)
        return Outcome(code, f"KMS {operation} fails with {exception}: the store is not reachable ({code})")
    return Outcome(exception, f"KMS {operation} fails with {exception}")


def tampering_accepted(what: str) -> Outcome:
    return Outcome(
        "ACCEPTS_TAMPERED_CIPHERTEXT",
        f"KMS Decrypt would succeed on a {what}: no InvalidCiphertextException, ciphertext integrity is not protected",
    )


def forged_accepted(what: str) -> Outcome:
    return Outcome(
        "ACCEPTS_UNAUTHENTICATED_REQUESTS",
        f"the proxy answers a request signed with {what}: anyone, not only KMS with the store's credential, can use it",
    )


def http_refused() -> Outcome:
    return Outcome(
        "ValidationException",
        "CreateCustomKeyStore refuses an XksProxyUriEndpoint that does not start with https:// (ValidationException)",
    )
