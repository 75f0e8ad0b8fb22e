"""The baseline: a minimal aiohttp app answering every request with a fixed JSON body.

Same port, same worker count, same requests as the proxy, so the ratio between the two says
how much of the cost is ours and how much is Python + aiohttp + HTTP itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from aiohttp import web

BODY = b'{"ciphertext":"AAAAAAAAAAAAAAAAAAAAAA==","initializationVector":"AAAAAAAAAAAAAAAA","authenticationTag":"AAAAAAAAAAAAAAAAAAAAAA=="}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def serve(sock: socket.socket) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, sock=sock, access_log=None, print=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sock.set_inheritable(True)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            serve(sock)
            sys.exit(0)
        children.append(pid)
    serve(sock)


if __name__ == "__main__":
    main()
