"""What a PKCS#11 key catalog scan costs on SoftHSMv2, by the number of keys on the token.

The pkcs11 backend rescans the token's keys (`keymanager.pkcs11.token.scan`: C_FindObjects, then
each key's attributes) every `refresh_seconds`, or 50 times the last scan's duration if longer;
in `call_mode = "event-loop"` (what "auto" picks for SoftHSMv2) the worker serves nothing while a
scan runs. This part makes a fresh token, adds AES-256 keys in steps, and times the scan at each
step (median of 5, in a process pinned to the server's core): the numbers docs/pkcs11.md quotes.
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
from typing import TYPE_CHECKING, Any

from bench import procs
from bench.context import SERVER_CORE
from bench.homes import ROOT

if TYPE_CHECKING:
    from bench.context import Context

STEPS = (10, 100, 300, 1000)
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
           "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")  # fmt: skip


def measure(module: str) -> dict[str, Any]:
    """In this process: a fresh token under a temporary SOFTHSM2_CONF, keys added step by step."""
    with tempfile.TemporaryDirectory(prefix="xks-catalog-") as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.mkdir()
        conf = Path(tmp) / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "catalog", "--so-pin", "so-pin-1234",
                        "--pin", "pin-1234"], check=True, capture_output=True)  # fmt: skip
        import pkcs11
        from pkcs11 import Attribute, KeyType

        from keymanager.pkcs11.token import scan

        token = pkcs11.lib(module).get_token(token_label="catalog")
        out: dict[str, Any] = {}
        with token.open(user_pin="pin-1234", rw=True) as session:
            made = 0
            for keys in STEPS:
                while made < keys:
                    session.generate_key(KeyType.AES, 256, label=f"k{made:05d}", store=True,
                                         template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})  # fmt: skip
                    made += 1
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    found = scan(session)
                    times.append(time.perf_counter() - started)
                assert len(found) == keys
                out[str(keys)] = {"scan_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1)}
        return out


def part(ctx: "Context") -> dict[str, Any]:
    module = next((m for m in MODULES if Path(m).exists()), None)
    if module is None:
        return {"error": "SoftHSMv2 is not installed (apt-get install softhsm2)"}
    cmd = procs.pinned([sys.executable, "-m", "bench.catalog", module], SERVER_CORE)
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(run.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
