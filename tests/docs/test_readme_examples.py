"""README's "Calling it by hand": its three bash blocks, run as written against a real `xks-proxy demo`.

The first block sets the values the demo prints; the test runs it as written, then sets the same
variables to what this demo printed (its port and home are the test's own), and runs the other
two blocks with bash and curl: the Encrypt must answer a ciphertext, the Decrypt print `hello`.
The first block's endpoint and CA must be the demo's defaults (port 8443, the default home).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import need
from tests.docs.blocks import doc_block
from tests.support import ROOT
from tests.support.localkms import Process, free_port, wait_until

README = ROOT / "README.md"
VALUES = {"ENDPOINT": "endpoint", "CA": "TLS CA", "ACCESS_KEY_ID": "access key id", "SECRET": "secret access key"}


def _demo(tmp: Path) -> Process:
    argv = [sys.executable, "-m", "xks_proxy.cli", "demo", "--home", str(tmp / "home"), "--port", str(free_port()), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "XKS_"))}
    log = tmp / "demo.log"
    with log.open("wb") as out:
        return Process(subprocess.Popen(argv, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT), log)


def _printed(demo: Process) -> dict[str, str]:
    """The demo's printed values by README variable, once it serves (its curl line printed, its port open)."""
    text = wait_until(lambda: "Try:" in demo.text() and demo.text() or not demo.alive(), 60, "the demo's printout", demo.shown)
    assert demo.alive(), demo.shown()
    values = {var: re.search(rf"^\s*{re.escape(label)}:\s*(\S+)", text, re.M)[1] for var, label in VALUES.items()}  # type: ignore[index]
    values["ENDPOINT"] += re.search(r"URI path:\s*(\S+)", text)[1]  # type: ignore[index]
    return values


def test_calling_it_by_hand_works_as_written_against_the_demo(tmp_path: Path) -> None:
    need("curl")
    need("python3")
    values_block = doc_block(README, "by-hand-values")
    assert sorted(re.findall(r"^(\w+)=", values_block, re.M)) == sorted(VALUES), "the block sets exactly the printed values"
    demo = _demo(tmp_path)
    try:
        printed = _printed(demo)
        port = printed["ENDPOINT"].split(":")[2].split("/")[0]
        defaults = subprocess.run(["bash", "-c", values_block + 'echo "$ENDPOINT"; echo "$CA"'], capture_output=True, text=True, env={"HOME": "/nowhere"})
        assert defaults.stdout.splitlines() == [
            printed["ENDPOINT"].replace(f":{port}/", ":8443/"),
            printed["CA"].replace(str(tmp_path / "home"), "/nowhere/.local/state/xks-proxy/demo"),
        ], "the README's endpoint and CA are the default demo's"
        ours = "".join(f"{var}={shlex.quote(value)}\n" for var, value in printed.items())
        script = values_block + ours + doc_block(README, "by-hand-encrypt") + doc_block(README, "by-hand-decrypt")
        ran = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        encrypted = json.loads((tmp_path / "encrypted.json").read_text())
        assert set(encrypted) == {"authenticationTag", "ciphertext", "ciphertextMetadata", "initializationVector"}, encrypted
        assert ran.stdout.splitlines()[-1] == "hello", ran.stdout
    finally:
        demo.stop()
