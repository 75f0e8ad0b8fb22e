"""The checks, one module per thing KMS relies on, sharing one `Run`.

A `Run` carries the settings, the report and the client, and records verdicts. Check ids are
`category/name`; a verdict whose category was not selected with --only is computed (transport
must still run to open a channel) but not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from xks_proxy.conformance import outcomes
from xks_proxy.conformance.client import Reply, XksClient
from xks_proxy.conformance.diagnosis import diagnose
from xks_proxy.conformance.results import CheckResult, Outcome, Report, Status
from xks_proxy.conformance.settings import Settings
from xks_proxy.conformance.validate import ERROR_STATUS, classify


@dataclass
class Run:
    settings: Settings
    report: Report
    client: XksClient | None = None
    ivs: list[bytes] = field(default_factory=list)

    @property
    def api(self) -> XksClient:
        assert self.client is not None, "API checks need an open client"
        return self.client

    def check(self, check_id: str, title: str, *, ok: bool | None, expected: str, actual: str,
              kms: Outcome, advisory: bool = False, reply: Reply | None = None) -> CheckResult:
        """Record a verdict. ok=None is a skip; `advisory` checks warn instead of failing.

        `reply` is the answer judged: when the check did not pass and the proxy answered an
        error, the result carries the proxy's errorName, errorMessage and a hint at the cause.
        """
        status = Status.SKIP if ok is None else Status.PASS if ok else Status.WARN if advisory else Status.FAIL
        proxy_error = diagnose(reply) if status in (Status.FAIL, Status.WARN) else None
        result = CheckResult(check_id, check_id.split("/", 1)[0], title, status, expected, actual, kms, proxy_error)
        if self.settings.wants(result.category):
            self.report.add(result)
        return result

    def skip(self, check_id: str, title: str, reason: str, expected: str = "") -> CheckResult:
        return self.check(check_id, title, ok=None, expected=expected, actual=reason, kms=Outcome("NOT_RUN", "not checked"))

    def expect_error(self, check_id: str, title: str, reply: Reply, error_name: str,
                     predict: Callable[[str], Outcome], on_success: Outcome, advisory: bool = False) -> CheckResult:
        """A check that KMS relies on getting `error_name` back, and what it does otherwise."""
        kind, actual = classify(reply, self.settings.budget_ms)
        kms = on_success if kind == outcomes.OK else predict(kind)
        return self.check(check_id, title, ok=kind == error_name, expected=f"HTTP {ERROR_STATUS[error_name]} {error_name}",
                          actual=actual, kms=kms, advisory=advisory, reply=reply)

