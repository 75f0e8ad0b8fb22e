"""KMS exceptions as KMS puts them on the wire, so every SDK raises the class it knows.

JSON 1.1 errors are `{"__type": "<Name>", "message": "..."}`; botocore reads the name from
`__type` and the client raises `client.exceptions.<Name>`. The HTTP status matters too: SDKs
retry 500 and 503 (KMSInternalException, KeyUnavailableException, DependencyTimeoutException)
and never a 400, which is what KMS answers for everything else.
"""

from __future__ import annotations

#: The exceptions KMS answers with a status other than 400.
_STATUS = {
    "KMSInternalException": 500,
    "KeyUnavailableException": 500,
    "DependencyTimeoutException": 503,
    "ServiceUnavailableException": 503,
    "InternalFailure": 500,
}


class KmsApiError(Exception):
    """A refused KMS request: the exception name a caller's SDK raises, and a message for people.

    Messages never hold plaintext, key material or secrets: they quote ids, names and limits.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS.get(self.name, 400)

    def body(self) -> dict[str, str]:
        return {"__type": self.name, "message": self.message}


def validation(message: str) -> KmsApiError:
    return KmsApiError("ValidationException", message)


def not_found(message: str) -> KmsApiError:
    return KmsApiError("NotFoundException", message)


def invalid_state(message: str) -> KmsApiError:
    return KmsApiError("KMSInvalidStateException", message)


def unsupported(message: str) -> KmsApiError:
    return KmsApiError("UnsupportedOperationException", message)


def invalid_ciphertext(message: str = "") -> KmsApiError:
    return KmsApiError("InvalidCiphertextException", message)
