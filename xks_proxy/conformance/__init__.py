"""`xks-proxy conformance`: test any XKS proxy the way AWS KMS will use it.

Checks transport (HTTPS, TLS versions and suites, certificate), the connection steps
(GetHealthStatus, GetKeyMetadata), cryptographic behaviour, error behaviour, optional usage and
state probes, and latency against KMS's 250 ms budget. Each check reports what KMS expects,
what came back, and what KMS would do, in KMS's own words (ConnectionErrorCode values and the
exceptions KMS raises). The exit status is non-zero when any check fails.

The CLI wires `add_arguments` and `run` as the `conformance` subcommand; `python -m
xks_proxy.conformance` runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from xks_proxy.conformance.settings import CATEGORIES, SECRET_ENV, SettingsError, from_args

__all__ = ["add_arguments", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check an XKS proxy against everything AWS KMS relies on, and say what KMS would do."
    target = parser.add_argument_group("what to check")
    target.add_argument("--endpoint", help="https://host[:port] (KMS's XksProxyUriEndpoint)")
    target.add_argument("--uri-path", help="the XksProxyUriPath, e.g. /example/kms/xks/v1")
    target.add_argument("--access-key-id", help="the proxy credential's access key id")
    target.add_argument("--secret-access-key", help=f"the proxy credential's secret (or set ${SECRET_ENV}; never printed)")
    target.add_argument("--config", help="KMS proxy configuration file (JSON) giving the path and credential")
    target.add_argument("--key-id", required=True, help="an external key id to test (enabled, ENCRYPT and DECRYPT)")
    target.add_argument("--region", default="us-east-1", help="the AWS region KMS calls from (default: us-east-1)")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--ca-bundle", help="trust this CA bundle instead of the system store (KMS trusts public CAs only)")
    tls.add_argument("--client-cert", help="client certificate (PEM) for proxies that require mTLS")
    tls.add_argument("--client-key", help="private key (PEM) of --client-cert")
    tls.add_argument("--allow-http", action="store_true", help="test a plain HTTP endpoint (local testing; KMS refuses it)")
    probe = parser.add_argument_group("optional probes (keys you set up for them)")
    probe.add_argument("--encrypt-only-key", help="a key whose usage is ENCRYPT only")
    probe.add_argument("--decrypt-only-key", help="a key whose usage is DECRYPT only")
    probe.add_argument("--no-usage-key", help="a key with no usage at all")
    probe.add_argument("--disabled-key", help="a disabled key")
    knobs = parser.add_argument_group("run")
    knobs.add_argument("--burst", type=int, default=100, help="Encrypt calls in the latency burst (default: 100; 0 skips)")
    knobs.add_argument("--concurrency", type=int, default=10, help="concurrent calls in the burst (default: 10)")
    knobs.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for any one answer (default: 5)")
    knobs.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                       help="sign as if this machine's clock were SECONDS ahead (negative: behind), to see what a "
                            "proxy tells a caller whose clock is off (default: 0)")
    knobs.add_argument("--only", help=f"comma-separated categories to report: {', '.join(CATEGORIES)}")
    knobs.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the checks and print the report. 0: everything KMS relies on holds; 1: a check failed; 2: usage."""
    # Imported here: the checks pull in an HTTP client that every other CLI command can do without.
    from xks_proxy.conformance.report import render_json, render_table, want_colour
    from xks_proxy.conformance.runner import run_checks

    try:
        settings = from_args(args)
    except SettingsError as exc:
        print(f"xks-proxy conformance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = asyncio.run(run_checks(settings))
    if args.json:
        print(render_json(report))
    else:
        print(render_table(report, colour=want_colour()))
    return EXIT_FAILED if report.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xks_proxy.conformance")
    add_arguments(parser)
    return run(parser.parse_args(argv))
