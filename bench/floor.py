"""The floor: only what the spec makes every Encrypt do, on aiohttp's low-level server.

SigV4 verification (our `sigv4.verify`), the JSON body, base64, AES-256-GCM with a fresh random
IV, the JSON answer, and one audit line per request appended to a list that a timer writes out
every 50 ms. Nothing else: no routing beyond the path, no requestMetadata validation, no policy,
quota, in-flight cap, connection deadlines, access log or error mapping. Measured like the proxy
(part "floor" of bench/run.py), it says how much of the gap to the minimal aiohttp app is the
protocol's own work and how much is the proxy's features. Never a server to run: it checks
nothing it does not need for the measurement.

    python bench/floor.py --port P   (credential in XKS_FLOOR_ACCESS_KEY_ID / XKS_FLOOR_SECRET)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.homes import REGION  # noqa: E402
from xks_proxy import sigv4  # noqa: E402

REGIONS = frozenset({REGION})


class Floor:
    def __init__(self, access_key_id: str, secret: str, audit: Path) -> None:
        self.access_key_id, self.secret = access_key_id, secret
        self.gcm = AESGCM(os.urandom(32))
        self.lines: list[bytes] = []
        self.audit = audit.open("ab")

    def secret_for(self, access_key_id: str) -> str | None:
        return self.secret if access_key_id == self.access_key_id else None

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        sigv4.verify(method=request.method, path=request.raw_path, query=(), headers=request.headers, body=body,
                     lookup_secret=self.secret_for, regions=REGIONS)  # fmt: skip
        doc = orjson.loads(body)
        iv = os.urandom(12)
        sealed = self.gcm.encrypt(iv, base64.b64decode(doc["plaintext"]), base64.b64decode(doc["additionalAuthenticatedData"]))
        answer = {"ciphertext": base64.b64encode(sealed[:-16]).decode(), "initializationVector": base64.b64encode(iv).decode(),
                  "authenticationTag": base64.b64encode(sealed[-16:]).decode()}  # fmt: skip
        meta = doc["requestMetadata"]
        self.lines.append(orjson.dumps({"time": time.time(), "kmsRequestId": meta["kmsRequestId"], "operation": "encrypt",
                                        "status": 200}))  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines:
            self.audit.write(b"\n".join(lines) + b"\n")
            self.audit.flush()
        asyncio.get_running_loop().call_later(0.05, self.flush)


async def serve(port: int) -> None:
    floor = Floor(os.environ["XKS_FLOOR_ACCESS_KEY_ID"], os.environ["XKS_FLOOR_SECRET"], Path(os.environ.get("XKS_FLOOR_AUDIT", os.devnull)))
    await asyncio.get_running_loop().create_server(web.Server(floor.handle), "127.0.0.1", port)
    floor.flush()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
