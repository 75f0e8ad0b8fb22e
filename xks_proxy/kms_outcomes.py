"""What AWS KMS does with each kind of proxy answer: the one table, in KMS's own words.

Two programs need the same answer to "what would KMS do if the proxy said X?": the conformance
tester (`xks-proxy conformance`, which predicts it in its report) and the local KMS
(`xks-proxy local-kms`, which raises it to its callers). Both read it from here, so a prediction
of the tester and a behaviour of the local KMS can never disagree.

An observation ("kind") is one of the constants below, or a well-formed proxy errorName.

The vocabulary is the KMS API's (botocore's KMS model; `tests/localkms/test_xks_client.py` checks
every name below against it, per operation):
- ConnectionErrorCode of CreateCustomKeyStore / ConnectCustomKeyStore / UpdateCustomKeyStore and
  the periodic health check (`connection_code`);
- the Xks* exceptions CreateCustomKeyStore and UpdateCustomKeyStore raise when their health call
  fails (`create_store_exception`);
- the exceptions CreateKey raises when its GetKeyMetadata call fails (`create_key_exception`):
  XksKeyNotFoundException for an unknown key, XksKeyInvalidConfigurationException for a key that
  is not AES_256, lacks ENCRYPT or DECRYPT, or is not ENABLED;
- the exceptions Encrypt/Decrypt (and GenerateDataKey, ReEncrypt, ...) raise
  (`crypto_exception`). The KMS developer guide ("Troubleshooting external key stores") says
  cryptographic operations return KMSInvalidStateException for every failure of the external
  configuration or connection state: an unknown or disabled external key, a credential the
  proxy refuses, an unreachable proxy, a bad certificate, a malformed answer. Three exceptions
  are more precise: DependencyTimeoutException when the proxy did not answer in time (also after
  KMS's retry), KMSInternalException when the proxy kept failing internally or throttling, and
  InvalidCiphertextException when the proxy says a Decrypt's ciphertext does not authenticate.
  CustomKeyStoreInvalidStateException is not among Encrypt/Decrypt's exceptions: KMS raises it
  for a store that is not CONNECTED, which the local KMS decides before calling the proxy.

KMS retries (once) network timeouts, failed connections and the three errorNames the XKS
specification calls retryable; everything else is final at once (`retried`).
"""

from __future__ import annotations

OK = "OK"
TLS = "TLS"
UNREACHABLE = "UNREACHABLE"
TIMEOUT = "TIMEOUT"
INVALID_RESPONSE = "INVALID_RESPONSE"
ALL_UNAVAILABLE = "ALL_UNAVAILABLE"
KEY_CONFIG = "KEY_CONFIG"
HTTP_REFUSED = "HTTP_REFUSED"

#: errorNames KMS retries once, then gives up; a store that keeps answering them looks unreachable.
RETRIED_ERRORS = ("InternalException", "DependencyTimeoutException", "ThrottlingException")
#: Every kind KMS retries. A TLS failure is not among them: a certificate does not fix itself.
RETRIED = frozenset({TIMEOUT, UNREACHABLE, *RETRIED_ERRORS})

HEALTH_OPERATIONS = ("CreateCustomKeyStore", "ConnectCustomKeyStore", "UpdateCustomKeyStore", "KmsHealthCheck")

CONNECTION_CODE = {
    TLS: "XKS_PROXY_INVALID_TLS_CONFIGURATION",
    UNREACHABLE: "XKS_PROXY_NOT_REACHABLE",
    ALL_UNAVAILABLE: "XKS_PROXY_NOT_REACHABLE",
    TIMEOUT: "XKS_PROXY_TIMED_OUT",
    INVALID_RESPONSE: "XKS_PROXY_INVALID_RESPONSE",
    "AuthenticationFailedException": "INVALID_CREDENTIALS",
    "AccessDeniedException": "XKS_PROXY_ACCESS_DENIED",
    "InvalidUriPathException": "XKS_PROXY_INVALID_CONFIGURATION",
    **{name: "XKS_PROXY_NOT_REACHABLE" for name in RETRIED_ERRORS},
}
#: Anything else (an errorName health never answers, a 200 KMS cannot read) is an invalid response.
CONNECTION_CODE_DEFAULT = "XKS_PROXY_INVALID_RESPONSE"

CREATE_STORE_EXCEPTION = {
    TLS: "XksProxyUriUnreachableException",
    UNREACHABLE: "XksProxyUriUnreachableException",
    ALL_UNAVAILABLE: "XksProxyUriUnreachableException",
    TIMEOUT: "XksProxyUriUnreachableException",
    INVALID_RESPONSE: "XksProxyInvalidResponseException",
    "AuthenticationFailedException": "XksProxyIncorrectAuthenticationCredentialException",
    "AccessDeniedException": "XksProxyInvalidConfigurationException",
    "InvalidUriPathException": "XksProxyInvalidConfigurationException",
    **{name: "XksProxyUriUnreachableException" for name in RETRIED_ERRORS},
}
CREATE_STORE_EXCEPTION_DEFAULT = "XksProxyInvalidResponseException"

CREATE_KEY_EXCEPTION = {
    "KeyNotFoundException": "XksKeyNotFoundException",
    KEY_CONFIG: "XksKeyInvalidConfigurationException",
    "InvalidStateException": "XksKeyInvalidConfigurationException",
    "InvalidKeyUsageException": "XksKeyInvalidConfigurationException",
    TIMEOUT: "DependencyTimeoutException",
    "DependencyTimeoutException": "DependencyTimeoutException",
}
CREATE_KEY_EXCEPTION_DEFAULT = "KMSInternalException"

CRYPTO_EXCEPTION = {
    TIMEOUT: "DependencyTimeoutException",
    "DependencyTimeoutException": "DependencyTimeoutException",
    "InternalException": "KMSInternalException",
    "ThrottlingException": "KMSInternalException",
    # Named for precision; they are also the default.
    TLS: "KMSInvalidStateException",
    UNREACHABLE: "KMSInvalidStateException",
    INVALID_RESPONSE: "KMSInvalidStateException",
    "InvalidStateException": "KMSInvalidStateException",
    "KeyNotFoundException": "KMSInvalidStateException",
    "AuthenticationFailedException": "KMSInvalidStateException",
    "AccessDeniedException": "KMSInvalidStateException",
    "InvalidUriPathException": "KMSInvalidStateException",
    "InvalidKeyUsageException": "KMSInvalidStateException",
}
#: Only Decrypt passes the proxy's verdict on a ciphertext on to its caller.
DECRYPT_EXCEPTION = {"InvalidCiphertextException": "InvalidCiphertextException"}
CRYPTO_EXCEPTION_DEFAULT = "KMSInvalidStateException"


def retried(kind: str) -> bool:
    """Whether KMS tries once more after this observation."""
    return kind in RETRIED


def connection_code(kind: str) -> str:
    """ConnectionErrorCode for a failed connection step ("CONNECTED" for OK)."""
    if kind == OK:
        return "CONNECTED"
    return CONNECTION_CODE.get(kind, CONNECTION_CODE_DEFAULT)


def create_store_exception(kind: str) -> str:
    """What CreateCustomKeyStore (and UpdateCustomKeyStore) raise when their health call sees `kind`."""
    return CREATE_STORE_EXCEPTION.get(kind, CREATE_STORE_EXCEPTION_DEFAULT)


def create_key_exception(kind: str) -> str:
    """What CreateKey raises when its GetKeyMetadata call sees `kind`."""
    return CREATE_KEY_EXCEPTION.get(kind, CREATE_KEY_EXCEPTION_DEFAULT)


def crypto_exception(kind: str, operation: str) -> str:
    """What a caller of Encrypt/Decrypt (`operation`) gets when the proxy call sees `kind`."""
    if operation == "Decrypt" and kind in DECRYPT_EXCEPTION:
        return DECRYPT_EXCEPTION[kind]
    return CRYPTO_EXCEPTION.get(kind, CRYPTO_EXCEPTION_DEFAULT)


def exception_names() -> dict[str, set[str]]:
    """Every KMS exception name the table can produce, per KMS operation (for the botocore check)."""
    store = {*CREATE_STORE_EXCEPTION.values(), CREATE_STORE_EXCEPTION_DEFAULT}
    crypto = {*CRYPTO_EXCEPTION.values(), CRYPTO_EXCEPTION_DEFAULT}
    return {
        "CreateCustomKeyStore": store,
        "UpdateCustomKeyStore": store,
        "CreateKey": {*CREATE_KEY_EXCEPTION.values(), CREATE_KEY_EXCEPTION_DEFAULT},
        "Encrypt": crypto,
        "Decrypt": crypto | set(DECRYPT_EXCEPTION.values()),
    }


def connection_codes() -> set[str]:
    """Every ConnectionErrorCode the table can produce."""
    return {*CONNECTION_CODE.values(), CONNECTION_CODE_DEFAULT}
