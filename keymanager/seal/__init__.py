"""Seals: the master key never rests in clear (issue 13).

A home's master key is wrapped under a seal's key-encryption key (`kinds`), the wrapped keys and
the seal's parameters are its record (`record`), and opening a home yields a `Keyring`
(`keymanager.crypto`): the master keys, used wherever a master key is. A home without a record
is a home from before seals (or `init --seal file`): `master.key` (or $XKS_PROXY_MASTER_KEY) is
its master key, in clear.

`home.read_record(home, dsn)` finds the record: seal.json in the home, or the fleet's database.
`home.auto_open(...)` opens what opens without a person (file, pkcs11, a configured passphrase);
shamir, or a passphrase nobody configured, stays sealed (None) until `xks-proxy unseal`.
"""
