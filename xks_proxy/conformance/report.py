"""How a run is told: a table for people (coloured on a terminal), JSON for pipelines.

The table shows, for every check, what KMS expects, what came back, and what KMS would do; long
cells wrap within the terminal width. When a check failed on an error answer, GOT carries the
proxy's errorMessage, and the footer gives each likely cause once (`diagnosis`). Neither form
ever contains the secret access key: the report holds only what the checks recorded, and no
check records it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from typing import TextIO

from xks_proxy.conformance.results import CheckResult, Report, Status

_COLOURS = {Status.PASS: "\033[32m", Status.FAIL: "\033[1;31m", Status.WARN: "\033[33m", Status.SKIP: "\033[2m"}
_RESET, _BOLD = "\033[0m", "\033[1m"
_HEADERS = ("", "CHECK", "EXPECTED", "GOT", "KMS WOULD")


def want_colour(stream: TextIO = sys.stdout) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and "NO_COLOR" not in os.environ


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2)


def render_table(report: Report, colour: bool = False, width: int | None = None) -> str:
    width = width or max(100, shutil.get_terminal_size((160, 24)).columns)
    rows = [(r.status, r.id, r.expected, _got(r), r.kms.text) for r in report.ordered()]
    id_width = max([len(_HEADERS[1])] + [len(row[1]) for row in rows])
    rest = max(60, width - id_width - 4 - 4 * 2)
    widths = (4, id_width, rest * 3 // 10, rest * 4 // 10, rest - rest * 3 // 10 - rest * 4 // 10)
    lines = [_header(report), ""]
    lines += _row(_HEADERS, widths, None, colour, bold=True)
    category = None
    for status, check_id, expected, actual, kms in rows:
        if check_id.split("/")[0] != category:
            category = check_id.split("/")[0]
            lines.append(_paint(category.upper(), _BOLD, colour))
        lines += _row((status.value, check_id, expected, actual, kms), widths, status, colour)
    lines += ["", *_footer(report, colour)]
    return "\n".join(lines)


def _got(result: CheckResult) -> str:
    """What came back, with the proxy's own errorMessage when it answered an error."""
    error = result.proxy_error
    return f"{result.actual}: {error.message}" if error and error.message else result.actual


def _hints(report: Report) -> list[str]:
    """Each likely cause once, naming the checks it explains (the first three)."""
    checks: dict[str, list[str]] = {}
    for result in report.ordered():
        if result.proxy_error and result.proxy_error.hint:
            checks.setdefault(result.proxy_error.hint, []).append(result.id)
    lines = []
    for hint, ids in checks.items():
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        lines.append(f"hint ({', '.join(ids[:3])}{more}): {hint}")
    return lines


def _header(report: Report) -> str:
    return f"xks-proxy conformance: {report.endpoint}{report.uri_path}  key {report.key_id}"


def _row(cells: tuple[str, ...], widths: tuple[int, ...], status: Status | None, colour: bool, bold: bool = False) -> list[str]:
    wrapped = [textwrap.wrap(cell, w, break_long_words=True, break_on_hyphens=False) or [""] for cell, w in zip(cells, widths)]
    height = max(len(column) for column in wrapped)
    out = []
    for line in range(height):
        parts = [(column[line] if line < len(column) else "").ljust(w) for column, w in zip(wrapped, widths)]
        if line == 0 and status is not None:
            parts[0] = _paint(parts[0], _COLOURS[status], colour)
        text = "  ".join(parts).rstrip()
        out.append(_paint(text, _BOLD, colour) if bold else text)
    return out


def _footer(report: Report, colour: bool) -> list[str]:
    counts = report.counts()
    lines = [f"note: {note}" for note in report.notes] + _hints(report)
    if report.latency and "p99_ms" in report.latency:
        lat = report.latency
        lines.append(f"latency: {lat['calls']} calls, avg {lat['avg_ms']} ms, p50 {lat['p50_ms']}, p90 {lat['p90_ms']}, "
                     f"p99 {lat['p99_ms']}, max {lat['max_ms']} ms (budget {lat['budget_ms']:.0f} ms)")
    verdict = "FAIL" if report.failed else "PASS"
    summary = (f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['warn']} warnings, "
               f"{counts['skip']} skipped")
    lines.append(_paint(summary, _COLOURS[Status.FAIL if report.failed else Status.PASS], colour))
    if report.failed:
        lines.append("KMS would not work correctly with this proxy: see the FAIL lines above.")
    return lines


def _paint(text: str, code: str, colour: bool) -> str:
    return f"{code}{text}{_RESET}" if colour else text
