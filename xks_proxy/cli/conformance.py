"""`xks-proxy conformance`: the tester in xks_proxy/conformance/, offered as a command of the proxy.

Registered only if the tester imports: the proxy's own commands must never depend on it.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    try:
        from xks_proxy import conformance
    except ImportError:
        return
    parser = sub.add_parser("conformance", help="check any XKS proxy the way AWS KMS will use it")
    conformance.add_arguments(parser)
    parser.set_defaults(func=conformance.run)
