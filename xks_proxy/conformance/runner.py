"""The order of a conformance run, as KMS meets a proxy: configuration, transport, connection,
CreateKey, cryptography, errors, probes, latency.

Transport always runs, even when not selected with --only, because it decides whether and how
the API can be reached. When KMS could not connect at all, the remaining categories are reported
as skipped with the reason, rather than as a wall of identical failures.
"""

from __future__ import annotations

from xks_proxy.conformance.checks import Run, config, connection, crypto, errors, latency, probes, transport
from xks_proxy.conformance.client import XksClient
from xks_proxy.conformance.results import Report
from xks_proxy.conformance.settings import Settings

API_CATEGORIES = (
    ("connection", connection.check_health),
    ("key", connection.check_key),
    ("crypto", crypto.check),
    ("errors", errors.check),
    ("probes", probes.check),
    ("latency", latency.check),
)


async def run_checks(settings: Settings) -> Report:
    report = Report(endpoint=f"{settings.scheme}://{settings.host_header}", uri_path=settings.uri_path, key_id=settings.key_id)
    run = Run(settings, report)
    if settings.wants("config"):
        config.check(run)
    channel = await transport.check(run)
    if not channel.usable:
        for category, _ in API_CATEGORIES:
            if settings.wants(category):
                run.skip(f"{category}/not-run", f"{category} checks", f"not run: {channel.reason}")
        return report
    async with XksClient(settings, channel.ssl_context) as client:
        run.client = client
        for category, step in API_CATEGORIES:
            if settings.wants(category):
                await step(run)
        if settings.wants("crypto"):
            crypto.check_iv_uniqueness(run)
        if settings.wants("errors"):
            errors.check_error_bodies(run)
    return report
