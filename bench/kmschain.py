"""The local KMS in front of the proxy: Encrypt through `xks-proxy local-kms` and the proxy (over
TLS, as KMS calls it), and the latency each call adds over the proxy alone, in the same run.

Latency per call is measured with one connection (no queueing: p50 is the cost of a call);
throughput with the usual 32. Three processes share the two cores here, so nothing is pinned.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from bench import presign, procs
from bench.context import Context, Server
from bench.homes import KEY, PREFIX, REGION, Home
from bench.throughput import signed

_STARTED = re.compile(r"aws_access_key_id = (?P<akid>\S+)\s*\n\s*aws_secret_access_key = (?P<secret>\S+)")


@contextmanager
def local_kms(ctx: Context, home: Home) -> Iterator[tuple[Server, str, str]]:
    """A fresh local KMS (plain HTTP) trusting the home's CA: the server, and its principal's credentials."""
    port = procs.free_port()
    log = ctx.workdir / "local-kms.log"
    cmd = [sys.executable, "-m", "xks_proxy.cli", "local-kms", "--state", str(ctx.workdir / "local-kms"), "--port", str(port),
           "--http", "--region", REGION, "--ca-bundle", str(home.path / "tls" / "ca.pem")]  # fmt: skip
    proc = procs.start(cmd, port, home.env, log)
    try:
        found = None
        deadline = time.monotonic() + 30
        while found is None and time.monotonic() < deadline:
            found = _STARTED.search(log.read_text(errors="replace"))
            time.sleep(0.1)
        if found is None:
            raise RuntimeError(f"no credentials printed by the local KMS; see {log}")
        yield Server(proc, port, supervised=False), found["akid"], found["secret"]
    finally:
        procs.stop(proc)


def wire(kms_port: int, akid: str, secret: str, proxy_port: int, home: Home) -> str:
    """A connected custom key store for the proxy and a KMS key over its key: the key's ARN."""
    import botocore.session

    client = botocore.session.get_session().create_client(
        "kms", endpoint_url=f"http://127.0.0.1:{kms_port}", region_name=REGION, aws_access_key_id=akid, aws_secret_access_key=secret)
    cred = home.stores[0]
    store = client.create_custom_key_store(
        CustomKeyStoreName="bench", CustomKeyStoreType="EXTERNAL_KEY_STORE", XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyUriEndpoint=f"https://localhost:{proxy_port}", XksProxyUriPath=f"/{PREFIX}/kms/xks/v1",
        XksProxyAuthenticationCredential={"AccessKeyId": cred.access_key_id, "RawSecretAccessKey": cred.secret},
    )["CustomKeyStoreId"]  # fmt: skip
    client.connect_custom_key_store(CustomKeyStoreId=store)
    deadline = time.monotonic() + 30
    while (state := client.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0])["ConnectionState"] != "CONNECTED":
        if state["ConnectionState"] == "FAILED" or time.monotonic() > deadline:
            raise RuntimeError(f"the local KMS did not connect: {state}")
        time.sleep(0.1)
    return client.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId=KEY)["KeyMetadata"]["Arn"]


def chain(ctx: Context) -> dict[str, Any]:
    home = ctx.home("headline")
    out: dict[str, Any] = {}
    with ctx.serving(home, cores=None, tls=True) as proxy, local_kms(ctx, home) as (kms, akid, secret):
        arn = wire(kms.port, akid, secret, proxy.port, home)
        for conns in (1, ctx.args.connections):
            out[f"proxy alone (TLS), {conns} conn"] = ctx.wrk(proxy, signed(proxy, home, "encrypt")(), ctx.args.scaling_duration, conns, None)
            reqs = presign.kms_encrypt(kms.port, akid, secret, arn)
            proxy_before, started = procs.cpu_seconds(proxy.all_pids()), time.monotonic()
            result = ctx.wrk(kms, reqs, ctx.args.scaling_duration, conns, None)
            result["local_kms_cpu_percent"] = result.pop("server_cpu_percent")
            result["server_cpu_percent"] = round(100 * (procs.cpu_seconds(proxy.all_pids()) - proxy_before) / (time.monotonic() - started), 1)
            out[f"local KMS + proxy, {conns} conn"] = result
        one = out["local KMS + proxy, 1 conn"]["p50_ms"] - out["proxy alone (TLS), 1 conn"]["p50_ms"]
        out["added_p50_ms_per_call"] = round(one, 3)
    return out
