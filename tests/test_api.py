"""The XKS API through real HTTP with botocore-signed requests, over the local vault."""

from __future__ import annotations

from tests.conftest import Client, metadata, unb64


async def test_roundtrip(client: Client) -> None:
    status, enc = await client.encrypt("foo", b"hello world", aad=b"ctx")
    assert status == 200, enc
    status, dec = await client.decrypt("foo", enc, aad=b"ctx")
    assert status == 200, dec
    assert unb64(dec["plaintext"]) == b"hello world"
