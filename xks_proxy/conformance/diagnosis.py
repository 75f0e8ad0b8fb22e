"""Why a check failed, when the proxy answered with an error: its own words, and the likely cause.

KMS shows an operator only a ConnectionErrorCode; the proxy's errorMessage usually says more
("credential scope names region ...", "request time is more than 5 minutes from server time").
`diagnose` reads what is observable in one reply (HTTP status, errorName, errorMessage) and
names the setting to look at first: the region, the clock, the access key id, the secret, or
the URI path. A hint is a likely cause, not a certainty: another proxy may word its messages
differently, so an authentication failure it does not recognise gets all four suspects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (client imports outcomes, which imports results, which imports this)
    from xks_proxy.conformance.client import Reply

_MESSAGE_LIMIT = 300

HINT_REGION = "check the region: --region must be one the store serves (the region KMS calls from; `xks-proxy stores list`)"
HINT_CLOCK = ("check the clocks: this machine's and the proxy's differ by more than the 5 minutes SigV4 allows "
              "(synchronise both with NTP)")
HINT_ACCESS_KEY = "check the access key id: it must be a credential of this store (`xks-proxy credentials list --store PREFIX`)"
HINT_SECRET = ("check the secret access key (it must be the one of this access key id, as `xks-proxy stores export` gives "
               "it), and that nothing between you and the proxy rewrites the path, which the signature covers")
HINT_SIGNATURE = ("the signature was refused: check the region (--region), the clock (skew over 5 minutes), the access key "
                  "id and secret, and the URI path (which the signature covers)")
HINT_PATH = ("check the URI path: --uri-path must be /PREFIX/kms/xks/v1 with a prefix the proxy serves "
             "(`xks-proxy stores list`), as KMS's XksProxyUriPath")
HINT_KEY = "check the key id: the store has no such key (`xks-proxy keys list --store PREFIX`), or the store may not use it"

#: Words of an authentication errorMessage, and the cause they point at (first match wins).
_AUTH_CLUES = (
    (("region",), HINT_REGION),
    (("request time", "x-amz-date", "clock", "skew", "expired", "server time"), HINT_CLOCK),
    (("access key id", "access key"), HINT_ACCESS_KEY),
    (("signature does not match", "signature mismatch", "signature"), HINT_SECRET),
)


@dataclass(frozen=True)
class ProxyError:
    """The error a proxy answered: its errorName and errorMessage (as sent, made printable), and a hint."""

    status: int
    name: str
    message: str
    hint: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "errorName": self.name, "errorMessage": self.message}


def diagnose(reply: Reply | None) -> ProxyError | None:
    """The proxy's error in `reply`, with a hint; None when no HTTP error came back."""
    if reply is None or reply.status is None or reply.status == 200:
        return None
    body = reply.json()
    fields = body if isinstance(body, dict) else {}
    name, message = _printable(fields.get("errorName")), _printable(fields.get("errorMessage"))
    return ProxyError(reply.status, name, message, hint(reply.status, name, message))


def hint(status: int, name: str, message: str) -> str | None:
    """The likely cause of an error answer, from its status, errorName and errorMessage."""
    if name == "InvalidUriPathException" or (status == 404 and name != "KeyNotFoundException"):
        return HINT_PATH
    if name == "KeyNotFoundException":
        return HINT_KEY
    if name == "AuthenticationFailedException" or status == 401:
        text = message.lower()
        return next((h for clues, h in _AUTH_CLUES if any(clue in text for clue in clues)), HINT_SIGNATURE)
    return None


def _printable(value: Any) -> str:
    """A field of the proxy's answer as one safe line: no control characters (a terminal's escapes), bounded."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."
