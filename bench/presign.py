"""Pre-signed requests, as raw HTTP/1.1 bytes (latin-1 strings), for wrk and the open-loop generator.

SigV4 signatures stay valid for 5 minutes, so each measurement signs its requests just before it
runs; signing ahead keeps the generator's cost down to sending bytes. The proxy's requests are
signed with the proxy's own `sigv4.sign` (service kms-xks-proxy); the local KMS's with botocore's
SigV4Auth (service kms), as an AWS SDK signs them.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

from bench.homes import REGION, Credential
from xks_proxy import sigv4

#: The issue's request: 256 bytes of plaintext, 64 bytes of AAD.
PLAINTEXT_BYTES = 256
AAD = b"aws:ebs:id=vol-0123456789abcdef0;" + b"x" * 31
assert len(AAD) == 64


def metadata(op: str) -> dict[str, str]:
    return {
        "kmsRequestId": "bench-0000-0000-0000-000000000000",
        "kmsOperation": op,
        "awsPrincipalArn": "arn:aws:iam::111122223333:role/bench",
        "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555",
    }


def raw(method: str, path: str, headers: dict[str, str], body: bytes) -> str:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()] + [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines) + body.decode("latin-1")


def xks(port: int, cred: Credential, key_id: str, op: str, body: dict[str, Any]) -> str:
    """One signed XKS request (op: encrypt, decrypt, metadata, health)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    path = f"/{cred.prefix}/kms/xks/v1/health" if op == "health" else f"/{cred.prefix}/kms/xks/v1/keys/{key_id}/{op}"
    headers = sigv4.sign(method="POST", url_path=path, host=f"127.0.0.1:{port}", body=data, access_key_id=cred.access_key_id,
                         secret=cred.secret, region=REGION, extra_headers={"Content-Type": "application/json"})  # fmt: skip
    return raw("POST", path, headers, data)


def encrypt_body(plaintext: bytes) -> dict[str, Any]:
    return {"requestMetadata": metadata("Encrypt"), "plaintext": base64.b64encode(plaintext).decode(),
            "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": base64.b64encode(AAD).decode()}  # fmt: skip


def decrypt_body(ciphertext: dict[str, Any]) -> dict[str, Any]:
    return {"requestMetadata": metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
            "additionalAuthenticatedData": base64.b64encode(AAD).decode(), **ciphertext}  # fmt: skip


def body_for(op: str, rng: random.Random, size: int, ciphertext: dict[str, Any] | None) -> dict[str, Any]:
    if op == "encrypt":
        return encrypt_body(rng.randbytes(size))
    if op == "decrypt":
        assert ciphertext is not None
        return decrypt_body(ciphertext)
    return {"requestMetadata": metadata("KmsHealthCheck" if op == "health" else "CreateKey")}


def rotation(port: int, targets: list[tuple[Credential, str]], op: str, size: int = PLAINTEXT_BYTES,
             ciphertexts: dict[str, dict[str, Any]] | None = None, count: int = 60) -> list[str]:  # fmt: skip
    """Requests rotating over (store, key) targets: at least `count`, and every target at least once.
    `ciphertexts` (for decrypt) maps "prefix/key" to one ciphertext of that key."""
    rng = random.Random(7)
    out = []
    for i in range(max(count, len(targets))):
        cred, key_id = targets[i % len(targets)]
        ct = (ciphertexts or {}).get(f"{cred.prefix}/{key_id}")
        out.append(xks(port, cred, key_id, op, body_for(op, rng, size, ct)))
    return out


def kms_encrypt(port: int, access_key_id: str, secret: str, key_arn: str, count: int = 60) -> list[str]:
    """KMS Encrypt calls (JSON 1.1, SigV4 service kms), signed by botocore as an SDK signs them."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    rng = random.Random(7)
    signer = SigV4Auth(Credentials(access_key_id, secret), "kms", REGION)
    out = []
    for _ in range(count):
        body = json.dumps({"KeyId": key_arn, "Plaintext": base64.b64encode(rng.randbytes(PLAINTEXT_BYTES)).decode(),
                           "EncryptionContext": {"purpose": "bench", "volume": "vol-0123456789abcdef0"}}).encode()  # fmt: skip
        request = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}/", data=body,
                             headers={"X-Amz-Target": "TrentService.Encrypt", "Content-Type": "application/x-amz-json-1.1",
                                      "Host": f"127.0.0.1:{port}"})  # fmt: skip
        signer.add_auth(request)
        out.append(raw("POST", "/", dict(request.headers.items()), body))
    return out
