"""What a PKCS#11 key catalog scan costs on SoftHSMv2, by the number of keys on the token.

The pkcs11 backend rescans the token's keys (`keymanager.pkcs11.token.scan`: C_FindObjects, then
each key's attributes) every `refresh_seconds`, or 50 times the last scan's duration if longer;
in `call_mode = "event-loop"` (what "auto" picks for SoftHSMv2) the worker serves nothing while a
scan runs. This part makes a fresh token, adds AES-256 keys in steps, and times the scan and its
C_FindObjects alone at each step (median of 5, in a process pinned to the server's core): the
numbers docs/pkcs11.md quotes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bench import procs
from bench.context import SERVER_CORE
from bench.homes import ROOT, SOFTHSM_LABEL, SOFTHSM_PIN, softhsm_module, softhsm_token

if TYPE_CHECKING:
    from bench.context import Context

STEPS = (10, 100, 300, 1000)


def _median_ms(call: Callable[[], object]) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def measure(module: str) -> dict[str, Any]:
    """In this process: a fresh token, keys added step by step, the scan (and its C_FindObjects) timed at each."""
    with tempfile.TemporaryDirectory(prefix="xks-catalog-") as tmp:
        os.environ.update(softhsm_token(Path(tmp), dict(os.environ)))
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        from keymanager.pkcs11.token import scan

        out: dict[str, Any] = {}
        with pkcs11.lib(module).get_token(token_label=SOFTHSM_LABEL).open(user_pin=SOFTHSM_PIN, rw=True) as session:
            for made in range(STEPS[-1]):
                session.generate_key(KeyType.AES, 256, label=f"k{made:05d}", store=True,
                                     template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})  # fmt: skip
                if made + 1 in STEPS:
                    assert len(scan(session)) == made + 1
                    find = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
                    out[str(made + 1)] = {"scan_ms": _median_ms(lambda: scan(session)),
                                          "find_ms": _median_ms(lambda: list(session.get_objects(find)))}  # fmt: skip
        return out


def part(ctx: "Context") -> dict[str, Any]:
    cmd = procs.pinned([sys.executable, "-m", "bench.catalog", softhsm_module()], SERVER_CORE)
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(run.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
