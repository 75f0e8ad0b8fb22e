"""Serving as processes: `serve()`, and the supervisor of N pre-forked workers on one socket.

`serve()` checks what would stop a start (a certificate that cannot serve, an audit file that
cannot be written), binds the socket, and runs one worker in-process (worker.py) or supervises
several. A sealed home (docs/sealing.md) is always supervised: the supervisor holds the control
socket (control_socket.py, control.py) through which `unseal` opens the master keys and `seal`
drops them; while sealed a child (sealed.py) answers 503 on the port; at the unseal the workers
fork with the keyring, at a seal they stop. The file seal (key in clear) is served as before.

With `--workers N > 1` the supervisor forks N workers that each build their own key manager
after the fork (no SQLite connection or PKCS#11 session crosses a fork): worker 0 alone
first, the others once it serves, so a wrong HSM PIN is tried once. It restarts a worker that
dies (but stops when a worker cannot start at all, see EXIT_CANNOT_START), passes SIGTERM/SIGINT
on for a graceful stop and SIGHUP on for a reload, and learns of each signal from a wakeup pipe
it selects on (signalpipe.py says why). Every worker watches the vault, config.toml and the TLS
files itself, so changes reach all of them within a second. The workers charge one shared
token bucket per store (a `BucketTable` made here before they fork); each holds 1/N of the
in-flight cap. A sidecar process (sidecar.py) writes the one audit file and serves the metrics
of all workers. The admin listener, if enabled, runs in worker 0 only: its port is single.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from functools import partial
from typing import Callable, NoReturn

from keymanager.base import StorageUnavailable
from xks_proxy.access import audit
from xks_proxy.access.metrics import NoMetrics
from xks_proxy.access.mtls import TlsError, TlsManager
from xks_proxy.access.throttle import BucketTable
from xks_proxy.config import Config, ConfigError
from xks_proxy.errors import XksError
from xks_proxy.process.control import Gate, open_config, sealed_copy
from xks_proxy.process.control_socket import ControlChannel
from xks_proxy.process.signalpipe import SignalPipe, report_ready
from xks_proxy.process.sockets import ListenError, listen
from xks_proxy.process.worker import HANDLED_SIGNALS, Shared, serve_worker

log = logging.getLogger("xks_proxy")
#: A worker whose key manager cannot start (a refused HSM PIN, an unreadable vault): restarting
#: it would not help, and retrying a wrong PIN can lock the HSM account. The supervisor stops.
EXIT_CANNOT_START = 3
#: Slots of the supervisor's children that are not workers (workers are 0..N-1).
SIDECAR, SEALED = -1, -2


def serve(
    config: Config, host: str | None = None, port: int | None = None, plain_http: bool = False, workers: int = 1,
    sock: socket.socket | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM, reloading on SIGHUP. HTTPS unless `plain_http` (behind a TLS-terminating balancer).

    On `sock` if given (bound by `listen` before anything was printed), else on host:port.
    Raises ListenError when host:port cannot be bound.
    """
    host = host or config.server.host
    port = config.server.port if port is None else port
    if not plain_http:
        try:
            TlsManager(config, NoMetrics())  # refuse to start on a certificate that cannot serve
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    if config.audit.path is not None:
        audit.rotating_file(config.audit).close()  # refuse to start on an audit file that cannot be written
    sock = listen(host, port) if sock is None else sock
    scheme = "http" if plain_http else "https"
    stores = ", ".join(s.uri_path for s in config.stores)

    def announce() -> None:
        """Once per proxy, when it serves (after every listener is bound: a refused port stays one line)."""
        if config.seal == "file":
            log.warning("the master key is in clear in %s (file seal): for development only (docs/sealing.md)", config.home)
        log.info("serving %s://%s:%d for stores %s with %d worker(s)", scheme, host, sock.getsockname()[1], stores, workers)

    # Stop and reload signals wait (blocked) until a handler that defers them is in place: a
    # process killed inside a PKCS#11 call (a login rewrites SoftHSM's token file) can lose every key.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        if workers <= 1 and config.seal == "file":
            asyncio.run(serve_worker(config, sock, plain_http, None, announce))
            code = 0
        else:
            code = _supervise(config, sock, plain_http, workers, announce)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    if code == 0:  # a start that failed said why in its one line
        log.info("stopped")
    return code


def _supervise(config: Config, sock: socket.socket, plain_http: bool, workers: int, announce: Callable[[], object]) -> int:
    """Run `_Supervisor` until every child is gone. Entered with the stop signals blocked."""
    supervisor = _Supervisor(config, sock, plain_http, workers)
    try:
        return supervisor.run(announce)
    finally:
        supervisor.close()


class _Supervisor:
    """Sidecar first; while sealed, the sealed responder; then worker 0 alone (the one HSM login
    that verifies the PIN), the others only once it is up; then restart workers that die.

    Every wait is `_wait` (a select over the signal pipe, the control socket and, while a child
    starts, its ready pipe), and every decision (stop, reload, reap, restart, unseal, seal) is
    taken in this one thread between waits: no handler runs half-way through a fork, and no
    signal waits behind a blocking call.
    """

    def __init__(self, config: Config, sock: socket.socket, plain_http: bool, workers: int) -> None:
        self.config, self.sock, self.plain_http, self.workers = config, sock, plain_http, workers
        self.audit_rx, audit_tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) if config.audit.path else (None, None)
        self.metrics_sock = listen(config.metrics.host, config.metrics.port) if config.metrics.enabled else None
        self.metrics_dir: str | None = None
        if self.metrics_sock is not None:
            self.metrics_dir = tempfile.mkdtemp(prefix="xks-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # read by prometheus_client in the children
        self.shared = Shared(workers=workers, audit_socket=audit_tx, buckets=BucketTable() if workers > 1 else None)
        self.children: dict[int, int] = {}  # pid -> slot (SIDECAR, SEALED or a worker's)
        self.retired: set[int] = set()  # children told to stop by a seal or an unseal: never restarted
        self.stopping = self.failed = self.announced = False
        self.signals: SignalPipe | None = None
        self.gate: Gate | None = None
        self.control: ControlChannel | None = None
        if config.seal != "file":
            self.gate = Gate(config.home, config.vault.dsn, config.seal, config.raw.get("seal") or {}, config.keyring)
            self.control = ControlChannel(config.home, self.gate.answer)

    def run(self, announce: Callable[[], object]) -> int:
        self.signals = SignalPipe(HANDLED_SIGNALS | {signal.SIGCHLD})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # from here on a signal is a byte on the pipe
        if self.audit_rx is not None or self.metrics_sock is not None:
            # The sidecar is up before the workers start: their start (HSM logins above all) then
            # does not overlap with it, and the metrics endpoint answers as soon as workers serve.
            self._wait_ready(self._spawn_with_ready(SIDECAR), timeout=5.0)
        while not self.stopping:
            if self._sealed():
                self._sealed_phase()
            else:
                self._serving_phase(announce)
        while self.children:
            self._reap()
            if self.children:
                self._wait([], None)
        return EXIT_CANNOT_START if self.failed else 0

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.signals is not None:
            self.signals.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # --- phases ----------------------------------------------------------------------------------

    def _sealed(self) -> bool:
        return self.gate is not None and self.gate.sealed

    def _sealed_phase(self) -> None:
        """Answer sealed until the gate opens a keyring (or a stop), then load the configuration with it."""
        assert self.gate is not None
        self.config = sealed_copy(self.config)  # the master keys and credential secrets go with the seal
        if SEALED not in {slot for pid, slot in self.children.items() if pid not in self.retired}:
            if not self._wait_ready(self._spawn_with_ready(SEALED), timeout=15.0):
                if not self.stopping:
                    log.error("the sealed responder cannot start; stopping")
                    self._stop()
                    self.failed = True
                return
            scheme, (host, port) = "http" if self.plain_http else "https", self.sock.getsockname()[:2]
            until = f"until `xks-proxy unseal --home {self.config.home}`"
            log.warning("sealed (%s seal): answering 503 on %s://%s:%d %s", self.gate.kind, scheme, host, port, until)
        while not self.stopping and self._sealed():
            self._reap()
            if not self.stopping and self._sealed():
                self._wait([], None)
        if not self.stopping:
            try:
                assert self.gate.keyring is not None
                self.config = open_config(self.config.home, self.gate.keyring)
            except (ConfigError, StorageUnavailable) as exc:
                log.error("unsealed, but the configuration does not load: %s; sealed again", exc)
                self.gate.seal()

    def _serving_phase(self, announce: Callable[[], object]) -> None:
        """Worker 0 alone first: its start is the one PIN attempt (a refused PIN is never tried by
        another process); the others log in only once it serves. Returns on a stop or a seal."""
        first_up = self._wait_ready(self._spawn_with_ready(0))
        if first_up and self._sealed():  # sealed again while worker 0 started: it goes, the responder stays
            self._retire(lambda slot: slot >= 0)
            return
        self._retire(lambda slot: slot == SEALED)  # the sealed responder goes once a worker serves
        if not first_up:
            if not self.stopping:  # worker 0 said why in one line; nothing is retried, nothing else starts
                self.stopping = self.failed = True  # the sidecar is stopped once worker 0 is reaped
            return
        if self.gate is not None:
            self.gate.serving = True
        announce()
        if self.metrics_sock is not None and not self.announced:
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics_sock.getsockname()[1])
        self.announced = True
        for slot in range(1, self.workers):
            if not self.stopping:
                self._spawn(slot)
        while not self.stopping and not self._sealed():
            self._reap()
            if not self.stopping and not self._sealed():
                self._wait([], None)
        if not self.stopping:  # sealed: the workers finish what they serve and exit; the responder starts now
            self._retire(lambda slot: slot >= 0)

    def _retire(self, which: Callable[[int], bool]) -> None:
        """SIGTERM to these children of the phase that ends: they finish what they serve, and stay gone."""
        self._kill(signal.SIGTERM, which, retire=True)

    # --- waiting ---------------------------------------------------------------------------------

    def _wait(self, fds: list[int], timeout: float | None) -> bool:
        """Wait until one of `fds` is readable (True), a signal came, or `timeout`; act on the signals
        and on control requests (which may unseal or seal the gate: the phases look after each wait)."""
        assert self.signals is not None
        control = self.control.fds() if self.control is not None else []
        if self.control is not None and (next_deadline := self.control.timeout()) is not None:
            timeout = next_deadline if timeout is None else min(timeout, next_deadline)
        readable = select.select([self.signals.fd, *fds, *control], [], [], timeout)[0]
        for signum in self.signals.read():
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif signum == signal.SIGHUP:
                self._signal_workers(signal.SIGHUP)
            # SIGCHLD only wakes the loop: `_reap` collects every child that exited
        if self.control is not None:
            self.control.service(readable)
        return any(fd in readable for fd in fds)

    def _wait_ready(self, ready: int, timeout: float | None = None) -> bool:
        """Whether the child writing to this pipe came up: a byte once it serves, EOF if it died first.
        A stop meanwhile is passed on; the child then answers EOF (a start is never cut short)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._wait([ready], left):
                    return os.read(ready, 1) == b"+"
        finally:
            os.close(ready)

    def _pause(self, seconds: float) -> None:
        """Sleep, but act on signals meanwhile and end early on a stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._wait([], left)

    # --- children --------------------------------------------------------------------------------

    def _spawn_with_ready(self, slot: int) -> int:
        ready_r, ready_w = os.pipe()
        try:
            self._spawn(slot, ready_w)
        finally:
            os.close(ready_w)
        return ready_r

    def _spawn(self, slot: int, ready: int | None = None) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)  # the child starts with them blocked
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot, ready)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.children[pid] = slot

    def _child(self, slot: int, ready: int | None) -> NoReturn:
        """A worker keeps the stop signals blocked until `serve_worker` defers them."""
        code = 1
        try:
            assert self.signals is not None
            self.signals.close_in_child()
            if self.control is not None:  # the control socket is the supervisor's alone
                self.control.close()
            self.gate = None
            up = partial(report_ready, ready) if ready is not None else lambda: None
            if slot == SEALED:
                from xks_proxy.process import sealed

                asyncio.run(sealed.serve_sealed(self.config, self.sock, self.plain_http, up))
            elif slot == SIDECAR:  # holds no key: the default actions are fine until its loop handles them
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
                from xks_proxy.process import sidecar

                sidecar.run(sealed_copy(self.config), self.audit_rx, self.metrics_sock, tls=not self.plain_http, ready=ready)
            else:
                shared = replace(self.shared, first=slot == 0)
                asyncio.run(serve_worker(self.config, self.sock, self.plain_http, shared, up))
            code = 0
        except XksError as exc:
            log.error("worker cannot start: %s", exc.message)
            code = EXIT_CANNOT_START
        except ConfigError as exc:
            log.error("worker cannot start: configuration error: %s", exc)
            code = EXIT_CANNOT_START
        except ListenError as exc:
            log.error("worker cannot start: %s", exc)
            code = EXIT_CANNOT_START
        except BaseException:
            log.exception("%s failed", _name(slot))
        finally:
            logging.shutdown()  # the batched log lines of this child's last moments, then no atexit of the parent's
            os._exit(code)

    def _reap(self) -> None:
        """Collect every child that exited; restart a worker or the sidecar unless stopping."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        slot = self.children.pop(pid, None)
        if self.metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)
        if slot is None:
            return
        wanted = pid not in self.retired and self._wanted(slot)
        self.retired.discard(pid)
        if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START and not self.stopping and wanted:
            log.error("a restarted %s cannot start; stopping all workers (not retrying)", _name(slot))
            self._stop()
            self.failed = True
        if self.stopping:
            if not self._workers_left():
                self._stop_sidecar()
            return
        if not wanted:  # stopped by a seal or an unseal, or of the phase that just ended
            return
        log.error("%s %d exited (status %d); starting a new one", _name(slot), pid, status)
        self._pause(0.5)  # no hot crash loop
        if not self.stopping and self._wanted(slot):
            self._spawn(slot)

    def _wanted(self, slot: int) -> bool:
        """Whether a child of this slot belongs to the current phase (restarted if it dies)."""
        return slot == SIDECAR or self._sealed() == (slot == SEALED)

    def _workers_left(self) -> bool:
        """Workers or the sealed responder: what must be gone before the sidecar stops."""
        return any(slot != SIDECAR for slot in self.children.values())

    def _stop(self) -> None:
        self.stopping = True
        self._signal_workers(signal.SIGTERM)
        if not self._workers_left():
            self._stop_sidecar()

    def _signal_workers(self, signum: int) -> None:
        self._kill(signum, lambda slot: slot != SIDECAR)

    def _stop_sidecar(self) -> None:
        """Once the workers are gone, the sidecar writes what is left of the audit records and stops."""
        self._kill(signal.SIGTERM, lambda slot: slot == SIDECAR)

    def _kill(self, signum: int, which: Callable[[int], bool], retire: bool = False) -> None:
        for pid, slot in list(self.children.items()):
            if which(slot) and not (retire and pid in self.retired):
                if retire:
                    self.retired.add(pid)
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass


def _name(slot: int) -> str:
    return {SIDECAR: "sidecar", SEALED: "sealed responder"}.get(slot, "worker")
