"""A sealed proxy serves sealed, and is unsealed and sealed while it runs (issue 13).

Real processes throughout: homes made by `xks-proxy init --seal shamir|passphrase|file`, a real
`serve` with two workers, `unseal`/`seal` as an operator runs them (shares on stdin), requests
signed by botocore's SigV4. Waits are polls with generous bounds, never timed assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest

from tests.support.fleet import DSN_PASSWORD, write_dsn_file
from tests.support.postgres import Cluster, pg_cluster, pg_database  # noqa: F401  (fixtures)
from tests.support.proxy import eventually
from tests.support.sealed_proxy import (
    SealedHome, Served, client, corrupt, init, kill, ping, round_trip, sealed_everywhere, start, unseal_cli,
)  # fmt: skip

PASSPHRASE = "tangerine-otter-cobalt-1987"
WAIT = 15.0  # bound of every poll: the proxy aims at 2 s, a loaded CI machine may need more


def _one_line(done: object) -> str:
    lines = done.stderr.splitlines()  # type: ignore[attr-defined]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("xks-proxy: "), done  # type: ignore[attr-defined]
    return lines[0]


@pytest.fixture
def shamir_home(tmp_path: Path) -> SealedHome:
    """A shamir home (5 shares, threshold 3) with key foo, created by `keys create` given 3 shares on stdin."""
    home = init(tmp_path / "home", "--seal", "shamir")
    shares = "".join(home.share(n) + "\n" for n in (1, 3, 5))
    done = home.run("keys", "create", "foo", "--store", home.prefix, stdin=shares)
    assert done.returncode == 0, done.stderr
    return home


async def test_sealed_start_unseal_seal_and_restart(shamir_home: SealedHome, tmp_path: Path) -> None:
    home = shamir_home
    other = init(tmp_path / "other", "--seal", "shamir")  # another vault: its shares must not count
    served = start(home.path, tmp_path / "serve.log", workers=2)
    try:
        async with client(home, served) as c:
            # Sealed from the start: out of rotation, health all UNAVAILABLE, key operations retryable.
            assert await ping(c) == (503, "sealed\n")
            status, health = await c.call("health", requestMetadata={"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"})
            assert status == 200 and health["ekmFleetDetails"]
            assert {d["healthStatus"] for d in health["ekmFleetDetails"]} == {"UNAVAILABLE"}
            status, body = await c.encrypt("foo", b"x")
            assert (status, body["errorName"], body["errorMessage"]) == (503, "DependencyTimeoutException", "the key store is sealed; retry")
            status, text, _ = await c.post_raw("/nope/kms/xks/v1/keys/foo/encrypt", b"{}")
            assert (status, json.loads(text)["errorName"]) == (404, "InvalidUriPathException")
            assert served.proc.poll() is None
            assert stat.S_IMODE(os.stat(home.path / "control.sock").st_mode) == 0o600

            # K-1 shares: still sealed, progress kept through refusals.
            assert (await unseal_cli(home, None, "--status")).stdout == "sealed: 0 of 3 shares given; 3 more needed\n"
            assert (await unseal_cli(home, home.share(1) + "\n")).stdout == "sealed: 1 of 3 shares given; 2 more needed\n"
            assert (await unseal_cli(home, home.share(2) + "\n")).stdout == "sealed: 2 of 3 shares given; 1 more needed\n"
            assert "checksum" in _one_line(await unseal_cli(home, corrupt(home.share(3)) + "\n"))
            assert "another vault" in _one_line(await unseal_cli(home, other.share(1) + "\n"))
            assert "given already" in _one_line(await unseal_cli(home, home.share(2) + "\n"))
            assert (await unseal_cli(home, None, "--status")).stdout == "sealed: 2 of 3 shares given; 1 more needed\n"
            assert await sealed_everywhere(c)
            assert (await unseal_cli(home, None, "--reset")).stdout.endswith("sealed: 0 of 3 shares given; 3 more needed\n")
            assert (await unseal_cli(home, home.share(1) + "\n")).stdout.startswith("sealed: 1 of 3")

            # K valid shares: every worker serves.
            assert (await unseal_cli(home, home.share(4) + "\n")).stdout.startswith("sealed: 2 of 3")
            done = await unseal_cli(home, home.share(5) + "\n")
            assert (done.returncode, done.stdout) == (0, "unsealed: serving\n"), done.stderr
            await _every_worker_serves(c, served, workers=2)

            # `seal`: sealed again at once, and unsealed again with shares.
            done = await asyncio.to_thread(home.run, "seal")
            assert done.returncode == 0 and done.stdout.startswith("sealed (shamir seal)"), done.stderr
            await eventually(lambda: sealed_everywhere(c), deadline=WAIT, what="sealed after `xks-proxy seal`")
            for n in (2, 3, 4):
                done = await unseal_cli(home, home.share(n) + "\n")
            assert done.stdout == "unsealed: serving\n", done.stderr
            await _every_worker_serves(c, served, workers=2)

        assert served.stop() == 0
        assert not (home.path / "control.sock").exists()
        log_text = served.text
        # A restart comes up sealed.
        served = start(home.path, tmp_path / "serve2.log", workers=2)
        async with client(home, served) as c:
            assert await sealed_everywhere(c)
        assert served.stop() == 0
    finally:
        kill(served.proc)
    assert "Traceback" not in log_text
    audit = (home.path / "audit.log").read_text() if (home.path / "audit.log").exists() else ""
    home.assert_never_shown([home.share(n) for n in range(1, 6)] + [other.share(1)], log_text, served.text, audit)


async def _every_worker_serves(c: object, served: Served, workers: int) -> None:
    """/ping 200, and signed round trips on many fresh connections, once the sealed responder is gone."""

    async def up() -> bool:
        # workers + the sidecar, and no sealed responder left
        if len(served.children()) != workers + 1 or (await ping(c))[0] != 200:  # type: ignore[arg-type]
            return False
        return all([await round_trip(c) for _ in range(12)])  # type: ignore[arg-type]

    await eventually(up, deadline=WAIT, what="every worker serves after the unseal")


async def test_passphrase_seal_unseals_with_the_passphrase_on_stdin(tmp_path: Path) -> None:
    secret_file = tmp_path / "passphrase.txt"
    secret_file.write_text(PASSPHRASE + "\n")
    secret_file.chmod(0o600)
    home = init(tmp_path / "home", "--seal", "passphrase", "--passphrase-file", str(secret_file))
    assert home.run("keys", "create", "foo", "--store", home.prefix, stdin=PASSPHRASE + "\n").returncode == 0
    served = start(home.path, tmp_path / "serve.log", workers=1)  # one worker: still supervised, for the control socket
    try:
        async with client(home, served) as c:
            assert await sealed_everywhere(c)
            assert (await unseal_cli(home, None, "--status")).stdout == "sealed (passphrase seal)\n"
            assert "wrong passphrase" in _one_line(await unseal_cli(home, "not-the-passphrase-at-all\n"))
            assert await sealed_everywhere(c)
            done = await unseal_cli(home, PASSPHRASE + "\n")
            assert (done.returncode, done.stdout) == (0, "unsealed: serving\n"), done.stderr
            await _every_worker_serves(c, served, workers=1)
        assert served.stop() == 0
    finally:
        kill(served.proc)
    home.assert_never_shown([PASSPHRASE, "not-the-passphrase-at-all"], served.text, (home.path / "audit.log").read_text())


def test_a_file_sealed_home_warns_once_that_the_master_key_is_in_clear(tmp_path: Path) -> None:
    home = init(tmp_path / "home", "--seal", "file")
    served = start(home.path, tmp_path / "serve.log", workers=2, http=True)
    try:
        assert not (home.path / "control.sock").exists(), "the file seal has nothing to unseal: no control socket"
        assert served.stop() == 0
    finally:
        kill(served.proc)
    assert len(re.findall(r'"level":"WARNING".*master key is in clear', served.text)) == 1, served.text


def test_the_control_socket_serves_its_owner_only(shamir_home: SealedHome, tmp_path: Path) -> None:
    """0600 in the 0700 home; and SO_PEERCRED refuses another uid even where the file system would let it in."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another uid")
    served = start(shamir_home.path, tmp_path / "serve.log", workers=1, http=True)
    path = shamir_home.path / "control.sock"
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = _as_other_uid(path)
        assert reply.startswith("{") and "refused" in json.loads(reply)["error"], (reply, served.text)
        assert "refused a connection from uid 65534" in served.text
        done = shamir_home.run("unseal", "--status")
        assert done.stdout.startswith("sealed: 0 of 3"), "the owner is still served"
        # A stalled client holds up nobody and is answered at its deadline; an oversized request is refused.
        with socket.socket(socket.AF_UNIX) as stalled, socket.socket(socket.AF_UNIX) as big:
            stalled.connect(str(path))
            stalled.sendall(b'{"op": ')
            assert shamir_home.run("unseal", "--status").returncode == 0
            big.connect(str(path))
            big.sendall(b"x" * 5000)
            for sock, why in ((stalled, "no complete request line within 2 s"), (big, "over 4096 bytes")):
                sock.settimeout(WAIT)
                assert why in json.loads(sock.makefile("rb").readline())["error"]
        assert served.stop() == 0
    finally:
        kill(served.proc)


def _as_other_uid(path: Path) -> str:
    """The reply a process of euid 65534 gets from the control socket.

    It keeps file-system uid 0 (setfsuid, allowed while its saved uid is 0), so the 0700 home and
    the 0600 file let it connect: what it meets is the peer check alone, which sees euid 65534.
    """
    import ctypes

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setresgid(65534, 65534, 0)
            os.setresuid(65534, 65534, 0)
            ctypes.CDLL(None).setfsuid(0)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                try:
                    sock.sendall(b'{"op":"status"}\n')
                except BrokenPipeError:  # refused at accept, before the request: the reply is waiting
                    pass
                os.write(write, sock.makefile("rb").readline().strip())
        except BaseException as exc:
            os.write(write, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


def test_no_core_dumps_of_a_serving_process(shamir_home: SealedHome, tmp_path: Path) -> None:
    """RLIMIT_CORE 0 (hard and soft) and not dumpable, in the supervisor and in the workers it forks.

    Dumpability shows in /proc: a non-dumpable process's /proc/<pid> files belong to root:root
    instead of its own uid:gid; so the proxy runs here with group 65534 (as root can start it).
    """
    popen = {"group": 65534, "extra_groups": []} if os.getuid() == 0 else {}
    served = start(shamir_home.path, tmp_path / "serve.log", workers=1, http=True, **popen)
    try:
        unsealed = shamir_home.run("unseal", stdin=shamir_home.share(1) + "\n")
        assert unsealed.returncode == 0
        processes = [served.proc.pid, *served.children()]
        for pid in processes:
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert re.search(r"Max core file size\s+0\s+0\s", limits), limits
            if popen:
                assert os.stat(f"/proc/{pid}/status").st_gid == 0, f"process {pid} is dumpable"
        assert len(processes) >= 2
        assert served.stop() == 0
    finally:
        kill(served.proc)


async def test_a_fleet_proxy_serves_sealed_and_unseals_from_the_database_record(
    tmp_path: Path, pg_database: tuple[Cluster, str, str]
) -> None:
    """In a fleet the record is the database's row 'seal': the proxy starts sealed and the shares open it from there."""
    _, _, dsn = pg_database
    home = init(tmp_path / "home", "--seal", "shamir")
    three = "".join(home.share(n) + "\n" for n in (1, 2, 3))
    assert home.run("keys", "create", "foo", "--store", home.prefix, stdin=three).returncode == 0
    moved = home.run("fleet", "init", "--dsn-file", str(write_dsn_file(tmp_path / "pg.dsn", dsn)), stdin=three)
    assert moved.returncode == 0 and not (home.path / "seal.json").exists(), moved.stderr
    served = start(home.path, tmp_path / "serve.log", workers=2)
    try:
        async with client(home, served) as c:
            assert await sealed_everywhere(c)
            status, health = await c.call("health", requestMetadata={"kmsRequestId": "1", "kmsOperation": "KmsHealthCheck"})
            assert status == 200 and {d["healthStatus"] for d in health["ekmFleetDetails"]} == {"UNAVAILABLE"}
            for n in (3, 4, 5):
                done = await unseal_cli(home, home.share(n) + "\n")
            assert (done.returncode, done.stdout) == (0, "unsealed: serving\n"), done.stderr
            await _every_worker_serves(c, served, workers=2)
        assert served.stop() == 0
    finally:
        kill(served.proc)
    home.assert_never_shown([home.share(n) for n in range(1, 6)] + [DSN_PASSWORD], served.text)
