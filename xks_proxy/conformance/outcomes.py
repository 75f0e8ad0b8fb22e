"""What KMS does with each kind of proxy answer, in KMS's own words.

The vocabulary is the KMS API's: ConnectionErrorCode values for CreateCustomKeyStore /
ConnectCustomKeyStore and the periodic health check, the Xks* exceptions of CreateCustomKeyStore
and CreateKey, and the exceptions Encrypt/Decrypt raise to callers. The mapping follows the KMS
API reference (the ConnectionErrorCode and exception documentation) and the XKS proxy API
specification. Keeping it in one table means every check predicts outcomes the same way.

An observation ("kind") is one of the constants below, or a well-formed proxy errorName.
"""

from __future__ import annotations

from xks_proxy.conformance.results import Outcome

OK = "OK"
TLS = "TLS"
UNREACHABLE = "UNREACHABLE"
TIMEOUT = "TIMEOUT"
INVALID_RESPONSE = "INVALID_RESPONSE"
ALL_UNAVAILABLE = "ALL_UNAVAILABLE"
KEY_CONFIG = "KEY_CONFIG"
HTTP_REFUSED = "HTTP_REFUSED"

# KMS retries these once, then gives up; a store that keeps answering them looks unreachable.
_RETRIED = ("InternalException", "DependencyTimeoutException", "ThrottlingException")

_CONNECTION_CODE = {
    TLS: "XKS_PROXY_INVALID_TLS_CONFIGURATION",
    UNREACHABLE: "XKS_PROXY_NOT_REACHABLE",
    ALL_UNAVAILABLE: "XKS_PROXY_NOT_REACHABLE",
    TIMEOUT: "XKS_PROXY_TIMED_OUT",
    INVALID_RESPONSE: "XKS_PROXY_INVALID_RESPONSE",
    "AuthenticationFailedException": "INVALID_CREDENTIALS",
    "AccessDeniedException": "XKS_PROXY_ACCESS_DENIED",
    "InvalidUriPathException": "XKS_PROXY_INVALID_CONFIGURATION",
    **{name: "XKS_PROXY_NOT_REACHABLE" for name in _RETRIED},
}

_CREATE_STORE_EXCEPTION = {
    TLS: "XksProxyUriUnreachableException",
    UNREACHABLE: "XksProxyUriUnreachableException",
    ALL_UNAVAILABLE: "XksProxyUriUnreachableException",
    TIMEOUT: "XksProxyUriUnreachableException",
    INVALID_RESPONSE: "XksProxyInvalidResponseException",
    "AuthenticationFailedException": "XksProxyIncorrectAuthenticationCredentialException",
    "AccessDeniedException": "XksProxyInvalidConfigurationException",
    "InvalidUriPathException": "XksProxyInvalidConfigurationException",
    **{name: "XksProxyUriUnreachableException" for name in _RETRIED},
}

_CREATE_KEY_EXCEPTION = {
    "KeyNotFoundException": "XksKeyNotFoundException",
    KEY_CONFIG: "XksKeyInvalidConfigurationException",
    "InvalidStateException": "XksKeyInvalidConfigurationException",
    "InvalidKeyUsageException": "XksKeyInvalidConfigurationException",
    TIMEOUT: "DependencyTimeoutException",
    "DependencyTimeoutException": "DependencyTimeoutException",
}

_CRYPTO_EXCEPTION = {
    TIMEOUT: "DependencyTimeoutException",
    "DependencyTimeoutException": "DependencyTimeoutException",
    "InternalException": "KMSInternalException",
    "ThrottlingException": "KMSInternalException",
}


def connection_code(kind: str) -> str:
    """ConnectionErrorCode for a failed connection step; anything unexpected is an invalid response."""
    if kind == OK:
        return "CONNECTED"
    return _CONNECTION_CODE.get(kind, "XKS_PROXY_INVALID_RESPONSE")


def connect(kind: str, operation: str = "ConnectCustomKeyStore") -> Outcome:
    """Outcome of a GetHealthStatus (or any request) KMS makes while creating/connecting a store."""
    code = connection_code(kind)
    if kind == OK:
        texts = {
            "CreateCustomKeyStore": "CreateCustomKeyStore succeeds",
            "KmsHealthCheck": "KMS periodic health check passes; the store stays CONNECTED",
        }
        return Outcome(code, texts.get(operation, f"{operation}: ConnectionState CONNECTED"))
    exception = _CREATE_STORE_EXCEPTION.get(kind, "XksProxyInvalidResponseException")
    if operation == "CreateCustomKeyStore":
        return Outcome(code, f"CreateCustomKeyStore fails with {exception} (ConnectionErrorCode {code} on connect)")
    if operation == "KmsHealthCheck":
        return Outcome(code, f"KMS periodic health check fails ({code}); KMS reports the store unhealthy")
    return Outcome(code, f"ConnectCustomKeyStore: ConnectionState FAILED, ConnectionErrorCode {code}")


def create_key(kind: str) -> Outcome:
    """Outcome of the GetKeyMetadata call KMS makes in CreateKey."""
    if kind == OK:
        return Outcome("OK", "CreateKey succeeds for this XksKeyId")
    exception = _CREATE_KEY_EXCEPTION.get(kind, "KMSInternalException")
    return Outcome(exception, f"CreateKey fails with {exception}")


def crypto(kind: str, operation: str) -> Outcome:
    """What Encrypt/Decrypt callers of a KMS key in this store would get."""
    if kind == OK:
        return Outcome("OK", f"KMS {operation} succeeds")
    if kind == "InvalidCiphertextException" and operation == "Decrypt":
        return Outcome("InvalidCiphertextException", "KMS Decrypt fails with InvalidCiphertextException")
    if kind in (TLS, UNREACHABLE):
        return Outcome(connection_code(kind), f"KMS {operation} fails: the store is not reachable ({connection_code(kind)})")
    exception = _CRYPTO_EXCEPTION.get(kind, "KMSInvalidStateException")
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
