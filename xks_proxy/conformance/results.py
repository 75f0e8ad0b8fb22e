"""One check's verdict, and the run's collection of them.

A check says what KMS expects, what came back, and what KMS would do about it. `kms_code` is the
machine-readable part of that prediction (a ConnectionErrorCode, a KMS exception name, or "OK"),
so pipelines and tests can assert on it without parsing prose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from xks_proxy.conformance.diagnosis import ProxyError
from xks_proxy.conformance.settings import CATEGORIES


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    WARN = "WARN"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Outcome:
    """What KMS would do: `code` in KMS's vocabulary, `text` in a sentence."""

    code: str
    text: str


@dataclass(frozen=True)
class CheckResult:
    id: str
    category: str
    title: str
    status: Status
    expected: str
    actual: str
    kms: Outcome
    #: The error the proxy answered, when that is why the check did not pass (None otherwise).
    proxy_error: ProxyError | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "category": self.category,
            "title": self.title,
            "status": self.status.value,
            "expected": self.expected,
            "actual": self.actual,
            "kms_code": self.kms.code,
            "kms_outcome": self.kms.text,
            "proxy_error": self.proxy_error.as_dict() if self.proxy_error else None,
            "hint": self.proxy_error.hint if self.proxy_error else None,
        }


@dataclass
class Report:
    endpoint: str
    uri_path: str
    key_id: str
    results: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None

    def add(self, result: CheckResult) -> CheckResult:
        self.results.append(result)
        return result

    def ordered(self) -> list[CheckResult]:
        """Grouped by category in a fixed order, keeping run order inside each group."""
        rank = {name: index for index, name in enumerate(CATEGORIES)}
        return sorted(self.results, key=lambda r: rank.get(r.category, len(rank)))

    def counts(self) -> dict[str, int]:
        counts = {status.value.lower(): 0 for status in Status}
        for result in self.results:
            counts[result.status.value.lower()] += 1
        return counts

    @property
    def failed(self) -> bool:
        return any(result.status is Status.FAIL for result in self.results)

    def find(self, check_id: str) -> CheckResult | None:
        return next((r for r in self.results if r.id == check_id), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "uri_path": self.uri_path,
            "key_id": self.key_id,
            "passed": not self.failed,
            "summary": self.counts(),
            "notes": self.notes,
            "latency": self.latency,
            "checks": [result.as_dict() for result in self.ordered()],
        }
