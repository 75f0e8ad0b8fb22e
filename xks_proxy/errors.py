"""The closed set of errors the XKS API can return, and their HTTP statuses.

Every failure a request can meet is one of these classes; the server maps them to a response
in exactly one place (`XksError.status` and `XksError.body`). Key managers raise them too, so
the server never needs to know which backend failed or why.

An `errorMessage` is shown to operators (and to KMS, which forwards nothing of it to callers).
It must never carry plaintext, key material, secrets or request data: messages are written by
us, as constants or with values we have validated (lengths, field names, key ids).
"""

from __future__ import annotations

_MAX_MESSAGE = 511


class XksError(Exception):
    """Base of the closed set. Subclasses fix `name` and `status`."""

    name: str = "InternalException"
    status: int = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = _printable(message)

    def body(self) -> dict[str, str]:
        body = {"errorName": self.name}
        if self.message:
            body["errorMessage"] = self.message
        return body


def _printable(message: str) -> str:
    """Clamp a message to the spec's < 512 printable ASCII characters."""
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in message)
    return clean[:_MAX_MESSAGE]


class ValidationException(XksError):
    name, status = "ValidationException", 400


class InvalidStateException(XksError):
    name, status = "InvalidStateException", 400


class InvalidCiphertextException(XksError):
    name, status = "InvalidCiphertextException", 400


class InvalidKeyUsageException(XksError):
    name, status = "InvalidKeyUsageException", 400


class AuthenticationFailedException(XksError):
    name, status = "AuthenticationFailedException", 401


class AccessDeniedException(XksError):
    name, status = "AccessDeniedException", 403


class KeyNotFoundException(XksError):
    name, status = "KeyNotFoundException", 404


class InvalidUriPathException(XksError):
    name, status = "InvalidUriPathException", 404


class MethodNotAllowed(XksError):
    """A GET (or any non-POST) on an API URI. Not in the spec's table; 405 as the spec asks."""

    name, status = "UnsupportedOperationException", 405


class ThrottlingException(XksError):
    name, status = "ThrottlingException", 429


class InternalException(XksError):
    name, status = "InternalException", 500


class UnsupportedOperationException(XksError):
    name, status = "UnsupportedOperationException", 501


class DependencyTimeoutException(XksError):
    name, status = "DependencyTimeoutException", 503


class RequestTimeout(XksError):
    """The body did not arrive within server.body_timeout_seconds. Not in the spec (KMS sends a
    request at once): a stalled client's outcome, answered 408 and the connection closed."""

    name, status = "RequestTimeout", 408


class ClientDisconnected(XksError):
    """The client went away before its request arrived. Not in the spec and never sent (nobody
    is left to read it); the audit outcome, with nginx's 499, so it is no 5xx of ours."""

    name, status = "ClientDisconnected", 499


ALL_ERRORS: tuple[type[XksError], ...] = (
    ValidationException,
    InvalidStateException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    AuthenticationFailedException,
    AccessDeniedException,
    KeyNotFoundException,
    InvalidUriPathException,
    ThrottlingException,
    InternalException,
    UnsupportedOperationException,
    DependencyTimeoutException,
)
