"""The seal's pieces against the libraries they build on: SLIP-39 shares collected one at a time,
Argon2id passphrases, the keyring that opens what either master key of a rotation sealed."""

from __future__ import annotations

import pytest
import shamir_mnemonic

from keymanager.crypto import Kek, Keyring, MasterKey, ShareError
from keymanager.seal.kinds import Unsealer, make, open_keyring, passphrase_kek
from keymanager.seal.record import SealError, SealRecord, wrap_all


def _shamir(threshold: int = 3, shares: int = 5) -> tuple[SealRecord, list[str], MasterKey]:
    seal = make("shamir", shares=shares, threshold=threshold)
    master = MasterKey.generate()
    return SealRecord("shamir", seal.params, master.key_id, wrap_all(seal.kek, [master])), seal.shares, master


def test_shares_are_slip39_and_any_threshold_of_them_open_the_master_key() -> None:
    record, shares, master = _shamir()
    assert len(shares) == 5 and all(len(s.split()) == 33 for s in shares)
    for chosen in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        unsealer = Unsealer(record)
        assert unsealer.add_share(shares[chosen[0]]) is None and unsealer.add_share(shares[chosen[1]]) is None
        kek = unsealer.add_share("  " + shares[chosen[2]].upper() + "\n")  # spacing and case as people type
        assert kek is not None and open_keyring(record, kek).current.key_id == master.key_id
    # the library's own combine agrees that our shares are a SLIP-39 set of this secret's KEK
    assert len(shamir_mnemonic.combine_mnemonics(shares[:3])) == 32


def test_refusals_keep_or_discard_shares_as_they_should() -> None:
    record, shares, _ = _shamir()
    other, other_shares, _ = _shamir()
    unsealer = Unsealer(record)
    assert unsealer.add_share(shares[0]) is None
    words = shares[1].split()
    words[10] = "academic" if words[10] != "academic" else "acid"
    for bad, says in ((" ".join(words), "checksum"), (other_shares[0], "another vault"), (shares[0], "given already"), ("hello world", "word list")):
        with pytest.raises(ShareError, match=says) as refused:
            unsealer.add_share(bad)
        pairs = zip(bad.split(), bad.split()[1:])
        assert not any(f"{a} {b}" in str(refused.value) for a, b in pairs)  # never quotes the share (SLIP-39's errors do)
        assert unsealer.given == 1  # a refused share costs nothing already given
    unsealer.reset()
    assert unsealer.given == 0
    assert unsealer.add_share(shares[2]) is None and unsealer.add_share(shares[3]) is None
    assert unsealer.add_share(shares[4]) is not None


def test_k_shares_of_a_resplit_secret_from_another_set_are_refused_and_all_discarded() -> None:
    record, shares, _ = _shamir()
    stranger = SealRecord("shamir", dict(record.params), record.current, record.keys)
    # same identifier by construction, other KEK: as if someone split a different secret under our id
    forged = shamir_mnemonic.generate_mnemonics(1, [(3, 5)], b"\x07" * 32)[0]
    stranger.params["identifier"] = shamir_mnemonic.Share.from_mnemonic(forged[0]).identifier
    unsealer = Unsealer(stranger)
    unsealer.add_share(forged[0])
    unsealer.add_share(forged[1])
    with pytest.raises(ShareError, match="discarded"):
        unsealer.add_share(forged[2])
    assert unsealer.given == 0


def test_passphrase_seal_is_argon2id_and_refuses_a_wrong_or_short_passphrase() -> None:
    seal = make("passphrase", passphrase=b"correct horse battery staple")
    assert seal.params["kdf"] == "argon2id" and seal.params["memory_kib"] == 65536 and len(bytes.fromhex(seal.params["salt"])) == 16
    master = MasterKey.generate()
    record = SealRecord("passphrase", seal.params, master.key_id, wrap_all(seal.kek, [master]))
    assert open_keyring(record, passphrase_kek(record.params, b"correct horse battery staple")).current.key_id == master.key_id
    with pytest.raises(SealError, match="does not open"):
        open_keyring(record, passphrase_kek(record.params, b"correct horse battery stapler"))
    with pytest.raises(SealError, match="at least"):
        make("passphrase", passphrase=b"short")


def test_keyring_seals_under_current_opens_under_either_and_reseals_once() -> None:
    kek = Kek.from_text(MasterKey.generate_text())
    old, new = MasterKey.generate(), MasterKey.generate()
    under_old = old.seal(b"secret", "ctx")
    ring = Keyring(kek, new, (old,))
    assert ring.unseal(under_old, "ctx") == b"secret"
    moved = ring.reseal(under_old, "ctx")
    assert moved is not None and new.unseal(moved, "ctx") == b"secret" and ring.reseal(moved, "ctx") is None
    with pytest.raises(ValueError):
        ring.unseal(under_old, "another context")


def test_keyring_refreshes_from_the_record_when_another_process_rotated() -> None:
    kek = Kek.from_text(MasterKey.generate_text())
    old, new = MasterKey.generate(), MasterKey.generate()
    record = {"current": old.key_id, "keys": {old.key_id: kek.wrap(old)}}
    ring = Keyring(kek, old, (), refresh=lambda: (record["current"], record["keys"]))
    record.update(current=new.key_id, keys={new.key_id: kek.wrap(new)})  # the rotation, elsewhere
    assert ring.unseal(new.seal(b"after", "ctx"), "ctx") == b"after"
    assert ring.current.key_id == new.key_id and ring.key_ids == (new.key_id,)
