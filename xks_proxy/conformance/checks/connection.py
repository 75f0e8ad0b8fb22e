"""The connection steps: GetHealthStatus as CreateCustomKeyStore, ConnectCustomKeyStore and the
periodic KmsHealthCheck send it, and GetKeyMetadata as CreateKey sends it.

KMS validates the health answer strictly and refuses to connect when every key manager in the
fleet is UNAVAILABLE; CreateKey refuses a key that is not an enabled AES_256 key allowed to both
encrypt and decrypt. A proxy must also accept kmsOperation values and fields it has never seen,
because KMS adds them without notice.
"""

from __future__ import annotations

from xks_proxy.conformance import outcomes
from xks_proxy.conformance.checks import Run
from xks_proxy.conformance.client import Reply
from xks_proxy.conformance.results import Outcome
from xks_proxy.conformance.validate import classify, fleet_states, health_verdict, metadata_verdict

HEALTH_OPERATIONS = ("CreateCustomKeyStore", "ConnectCustomKeyStore", "KmsHealthCheck")
HEALTH_EXPECTED = ("HTTP 200 within 250 ms; xksProxyFleetSize > 0, vendor and model strings, 1-10 ekmFleetDetails "
                   "with known healthStatus, not all UNAVAILABLE")


async def check_health(run: Run) -> None:
    states: list[str] = []
    for operation in HEALTH_OPERATIONS:
        states = await _health(run, operation) or states
    _fleet(run, states)
    await _tolerance(run)


async def _health(run: Run, operation: str) -> list[str]:
    reply = await run.api.health(operation)
    kind, actual = classify(reply, run.settings.budget_ms)
    states: list[str] = []
    if kind == outcomes.OK:
        states = fleet_states(reply.json())
        kind, found = health_verdict(reply.json())
        actual = f"{actual}; {found}" if kind == outcomes.OK else found
    run.check(f"connection/health-{_slug(operation)}", f"GetHealthStatus for {operation}", ok=kind == outcomes.OK,
              expected=HEALTH_EXPECTED, actual=actual, kms=outcomes.connect(kind, operation), reply=reply)
    return states if kind == outcomes.OK else []


def _fleet(run: Run, states: list[str]) -> None:
    if not states:
        run.skip("connection/ekm-fleet", "external key manager fleet health", "no valid health answer to read")
        return
    degraded = [s for s in states if s != "ACTIVE"]
    run.check("connection/ekm-fleet", "external key manager fleet health", ok=not degraded, advisory=True,
              expected="every ekmFleetDetails entry ACTIVE", actual=", ".join(states),
              kms=outcomes.connect(outcomes.OK) if not degraded else Outcome(
                  "CONNECTED", f"KMS connects, but {len(degraded)} of {len(states)} key manager instances are not ACTIVE"))


async def _tolerance(run: Run) -> None:
    """KMS may send new kmsOperation values and new fields at any time; both must be ignored."""
    api = run.api
    unknown_op = {"requestMetadata": api.request_metadata("XksConformanceFutureOperation", for_key=False)}
    reply = await api.post(api.api_path("health"), unknown_op, label="GetHealthStatus(unknown kmsOperation)")
    _accepted(run, "connection/unknown-operation", "an unknown kmsOperation is accepted", reply,
              "a kmsOperation value this proxy has never seen")
    extra = {"requestMetadata": {**api.request_metadata("KmsHealthCheck", for_key=False), "xksConformanceNewField": "x"},
             "xksConformanceNewField": {"nested": [1, 2]}}
    reply = await api.post(api.api_path("health"), extra, label="GetHealthStatus(unknown fields)")
    _accepted(run, "connection/unknown-fields", "unknown request fields are ignored", reply, "a field this proxy has never seen")


def _accepted(run: Run, check_id: str, title: str, reply: Reply, what: str) -> None:
    kind, actual = classify(reply, run.settings.budget_ms)
    code = outcomes.connection_code(kind)
    run.check(check_id, title, ok=kind == outcomes.OK, expected="HTTP 200, as for any health request", actual=actual,
              kms=outcomes.connect(outcomes.OK, "KmsHealthCheck") if kind == outcomes.OK else
              Outcome(code, f"when KMS sends {what}, the request fails: ConnectionErrorCode {code}"), reply=reply)


async def check_key(run: Run) -> None:
    reply = await run.api.metadata(run.settings.key_id)
    kind, actual = classify(reply, run.settings.budget_ms)
    if kind == outcomes.OK:
        kind, actual = metadata_verdict(reply.json())
    run.check("key/metadata", f"GetKeyMetadata for CreateKey ({run.settings.key_id})", ok=kind == outcomes.OK,
              expected="HTTP 200: keySpec AES_256, keyUsage with ENCRYPT and DECRYPT (at most 10 values), keyStatus ENABLED",
              actual=actual, kms=outcomes.create_key(kind), reply=reply)


def _slug(operation: str) -> str:
    return {"CreateCustomKeyStore": "create", "ConnectCustomKeyStore": "connect", "KmsHealthCheck": "periodic"}[operation]
