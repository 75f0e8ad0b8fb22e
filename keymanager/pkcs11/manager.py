"""The PKCS#11 key manager: XKS keys are AES keys inside an HSM, named by their CKA_LABEL.

Threads and sessions. PKCS#11 calls block, so for an HSM (call_mode "threads", what "auto"
picks for every module but SoftHSMv2) they never run on the event loop: each request takes one
logged-in session from a bounded pool (none free within `session_wait_seconds` →
ThrottlingException) and runs on that session's own worker thread (one thread per pooled
session, fed by a queue: a session is checked out to one request at a time, so no call ever
queues behind another). The request waits at most `operation_timeout_seconds` for the HSM
(→ DependencyTimeoutException); a late call keeps its session until it returns. One more
thread, with its own session, refreshes the key catalog and runs reconnects.

The hop to the thread and back is the costliest part of a request after the HSM itself (with
SoftHSMv2 a C_Encrypt takes ~100 µs of CPU): so it is one queue put, one plain future and one
timer, not an executor future wrapped in a shield and a wait_for task. For a software token
inside the process (SoftHSMv2) even that costs more than the call, so `pkcs11.call_mode`
"event-loop" (what "auto" picks for SoftHSMv2 only) makes every call on the event loop, with no
thread and no timeout: requests, and logins, scans and reconnects too, so the module is only
ever entered from one thread of the process (a wait between two threads inside it would stall
the worker with no timeout to end it). Measured in docs/pkcs11.md, "Performance".

Keys. A catalog (label → TokenKey) is rescanned every `refresh_seconds` (or 50 times the last
scan's duration, if longer: a large token is scanned less often rather than taking a fifth of a
core), so changed keys show within that time, and looked up directly on a miss, so a new key is
served on its first request. Each pooled session caches the python-pkcs11 objects it has found,
so a request costs no C_FindObjects; a handle that went stale is looked up once more.

Failures. Device-class errors (CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID, token removed, ...)
take the manager down: idle sessions are dropped, calls in flight are let finish, the library is
finalised and initialised again, and the pool reopened, retrying with backoff until the token is
back. Meanwhile requests fail at once with InternalException (KMS retries those) and health says
UNAVAILABLE. A refused PIN is never retried (it would lock the HSM account).

One cohesive thing, over 400 lines on purpose: the session pool, the recovery and the health
state are one state machine on the event loop (a lost device empties the pool, recovery refills
it, health reads both); split over modules, each part would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from keymanager.base import EkmHealth, Encrypted, HealthState, KeyManager, KeyMetadata, KeyUsage
from keymanager.pkcs11.config import Pkcs11Config
from keymanager.pkcs11.errors import HsmError, LoginRefused, PKCS11Error, StaleHandle, TokenLost, lost_or_failed, raise_mapped
from keymanager.pkcs11.token import (
    Library,
    TokenKey,
    check_token,
    describe,
    duplicate_message,
    find,
    gcm_decrypt,
    gcm_encrypt,
    scan,
)
from xks_proxy.errors import (
    DependencyTimeoutException,
    InternalException,
    InvalidKeyUsageException,
    KeyNotFoundException,
    ThrottlingException,
    XksError,
)

log = logging.getLogger("xks_proxy.pkcs11")

T = TypeVar("T")
_HEALTH_PROBE = b"xks-proxy health probe"
_FAILURE_WINDOW_SECONDS = 60.0
#: Catalog scans take at most 1/SCAN_SHARE_INVERSE of the time (2%): the pause after one is at least this many times it.
SCAN_SHARE_INVERSE = 50
#: An event-loop scan longer than this is said once (SoftHSMv2 here: 3.6 ms at 10 keys, 34.9 ms at 100).
SLOW_INLINE_SCAN_SECONDS = 0.02


@dataclass(slots=True)
class _Slot:
    """One pooled, logged-in session, the worker thread that runs its calls, and the key objects
    (handles) it has found. The handles die with the slot: a reconnect makes new slots."""

    session: Any
    generation: int
    lane: "_Lane | None"  # None: call_mode "event-loop"
    keys: dict[str, tuple[TokenKey, Any]] = field(default_factory=dict)


class _Lane:
    """One worker thread and its queue. A slot's calls run one at a time (the slot is checked out
    to one request), so the thread is always free when a call is put on its queue. A daemon
    thread: a call that never returns (a hung HSM) does not hold the process's exit."""

    def __init__(self, index: int) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"xks-pkcs11-{index}", daemon=True)
        self._thread.start()

    def submit(self, done: Callable[..., None], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Run fn(*args) on the thread, then done(result, exception) there (which hands it to the loop)."""
        self._calls.put((done, fn, args))

    def stop(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            done, fn, args = call
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 -- handed to the request, as an executor would
                done(None, exc)
            else:
                done(result, None)
            del call, done, fn, args


class _Inline(Executor):
    """The control "thread" of call_mode "event-loop": the call runs at once, on the caller's thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting coroutine, as a thread's would be
            done.set_exception(exc)
        return done


class Pkcs11KeyManager(KeyManager):
    vendor = "PKCS#11 HSM"

    def __init__(self, config: Pkcs11Config) -> None:
        self._cfg = config
        self._library: Library | None = None
        self._lanes: list[_Lane] = []  # started with the first pool, one per pooled session
        self._on_loop = config.calls_on_event_loop
        self._control: Executor = _Inline() if self._on_loop else ThreadPoolExecutor(1, thread_name_prefix="xks-pkcs11-control")
        self._idle: list[_Slot] = []
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._busy = 0
        self._generation = -1
        self._up = False
        self._fatal: str | None = None
        self._control_session: Any = None
        self._catalog: dict[str, TokenKey] = {}
        self._recovery: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._scanning = False
        self._slow_scan_said = False
        self._closed = False  # close() saw every session closed, with no call left in the library
        self._failures: deque[float] = deque(maxlen=256)
        self._health: tuple[float, HealthState] | None = None  # (valid until, state) when slow
        self._ekm_id = f"pkcs11:{config.token_label or (f'slot {config.slot}' if config.slot is not None else 'first token')}"
        self._model = "PKCS#11 token"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._library = await loop.run_in_executor(self._control, Library.get, self._cfg.module)
            await self._connect(None)
        except LoginRefused as exc:
            raise InternalException(f"PKCS#11 login refused: {exc}") from None
        except TokenLost as exc:
            log.error("the HSM is not available at start (%s); answering InternalException and retrying", exc)
            self._schedule_recovery()
        except HsmError as exc:
            raise InternalException(f"PKCS#11: {exc}") from None
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        for task in (self._refresher, self._recovery):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._up = False
        for _ in range(200):  # let calls in flight return their sessions (bounded: a hung HSM must not hang shutdown)
            if not self._busy:
                break
            await asyncio.sleep(0.01)
        sessions = [slot.session for slot in self._idle] + [self._control_session]
        self._idle.clear()
        closing = asyncio.get_running_loop().run_in_executor(self._control, _close_all, sessions)
        try:
            await asyncio.wait_for(closing, 2.0)
            self._closed = True
        except TimeoutError:
            log.warning("the HSM did not close its sessions within 2 s; leaving them to the library")
        for lane in self._lanes:
            lane.stop()
        self._control.shutdown(wait=False, cancel_futures=True)

    def release(self) -> None:
        """C_Finalize the module as the process exits, unless a call is still inside it (a hung HSM:
        finalising under it is undefined; the exit then leaves the module to the OS)."""
        if self._library is not None and self._closed and not self._busy:
            self._library.finalize()
        elif self._library is not None:
            log.warning("exiting with HSM calls still in progress (%d requests)", self._busy)

    async def _connect(self, seen_generation: int | None) -> None:
        """Open the pool (after re-initialising the library if `seen_generation` is given)."""
        loop = asyncio.get_running_loop()
        sessions, control, catalog, generation = await loop.run_in_executor(self._control, self._open, seen_generation)
        self._generation = generation
        self._control_session = control
        self._catalog = catalog
        while not self._on_loop and len(self._lanes) < len(sessions):
            self._lanes.append(_Lane(len(self._lanes)))
        lanes: list[_Lane | None] = list(self._lanes) if not self._on_loop else [None] * len(sessions)
        self._idle = [_Slot(session, generation, lane) for session, lane in zip(sessions, lanes)]
        self._up = True
        self._health = None
        self._failures.clear()  # the outage is over; health reports the present
        self._hand_out()

    def _open(self, seen_generation: int | None) -> tuple[list[Any], Any, dict[str, TokenKey], int]:
        library = self._library
        assert library is not None
        if seen_generation is not None:
            library.reconnect(seen_generation)
        cfg = self._cfg
        token = library.token(cfg.token_label, cfg.slot)
        sessions = [library.session(token, cfg.pin) for _ in range(cfg.session_pool_size)]
        control = library.session(token, cfg.pin)
        try:
            catalog = scan(control)
        except PKCS11Error as exc:
            raise lost_or_failed(exc, "listing the token's keys") from None
        self.vendor = token.manufacturer_id or self.vendor
        self._ekm_id = f"pkcs11:{token.label}"
        self._model = token.model or self._model
        return sessions, control, catalog, library.generation

    # --- the pool -----------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(slot, *args)` with a pooled session: on the session's worker thread under both
        timeouts, or, with call_mode "event-loop", right here (see Pkcs11Config.call_mode)."""
        if not self._up:
            self._schedule_recovery()
            raise InternalException(self._fatal or "the HSM is unavailable; the proxy is reconnecting")
        slot = await self._acquire()
        try:
            if self._on_loop:
                return self._call_here(slot, fn, args)
            return await self._call_on_thread(slot, fn, args)
        except TimeoutError:
            self._failed()
            raise DependencyTimeoutException(
                f"the HSM did not answer within {self._cfg.operation_timeout_seconds:g} s"
            ) from None
        except TokenLost as exc:
            self._failed()
            self._lost(exc, slot.generation)
            raise InternalException(f"the HSM failed ({exc.ckr or 'token lost'}); reconnecting") from None
        except HsmError as exc:
            self._failed()
            log.warning("HSM call failed: %s", exc)
            raise InternalException(f"the HSM failed: {exc.ckr or exc}") from None

    def _call_here(self, slot: _Slot, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """On the event loop: no thread hop, no timer (nothing can interrupt the call anyway)."""
        self._busy += 1
        try:
            return fn(slot, *args)
        finally:
            self._returned(slot, None, None, None)

    async def _call_on_thread(self, slot: _Slot, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        timer = loop.call_later(self._cfg.operation_timeout_seconds, _time_out, answer)

        def done(result: Any, exc: BaseException | None) -> None:  # on the slot's thread
            try:
                loop.call_soon_threadsafe(self._returned, slot, answer, result, exc)
            except RuntimeError:  # the loop is closed: the process is exiting, nobody is waiting
                pass

        assert slot.lane is not None
        self._busy += 1
        slot.lane.submit(done, fn, (slot, *args))
        try:
            return await answer
        finally:
            timer.cancel()

    async def _acquire(self) -> _Slot:
        if self._idle:
            return self._idle.pop()
        wait = self._cfg.session_wait_seconds
        if wait > 0:
            waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                return await asyncio.wait_for(waiter, wait)
            except TimeoutError:
                pass
        raise ThrottlingException(f"all {self._cfg.session_pool_size} HSM sessions are busy")

    def _returned(self, slot: _Slot, answer: asyncio.Future[Any] | None, result: Any, exc: BaseException | None) -> None:
        """Every call ends here, on the event loop: the answer is given (unless the request timed out
        or went away: a late result is dropped), and the session goes back, unless it belongs to a
        dead generation."""
        self._busy -= 1
        if answer is not None and not answer.done():
            if exc is None:
                answer.set_result(result)
            else:
                answer.set_exception(exc)
        if self._up and slot.generation == self._generation:
            self._idle.append(slot)
            self._hand_out()

    def _hand_out(self) -> None:
        while self._idle and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._idle.pop())

    def _failed(self) -> None:
        self._failures.append(time.monotonic())

    # --- recovery ------------------------------------------------------------------------------------

    def _lost(self, exc: HsmError, generation: int) -> None:
        if self._up and generation == self._generation:
            log.error("lost the HSM (%s): closing sessions, re-initialising the library, reconnecting", exc)
            self._up = False
            self._health = None
            self._idle.clear()
            while self._waiters:  # requests queued for a session fail now, retryably
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(InternalException("the HSM is unavailable; the proxy is reconnecting"))
        self._schedule_recovery()

    def _schedule_recovery(self) -> None:
        if self._fatal is None and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        self._up = False
        self._idle.clear()
        started = time.monotonic()
        while self._busy:  # never finalise under a thread that is inside the library
            if time.monotonic() - started > 5:
                log.warning("waiting for %d HSM calls in flight before reconnecting", self._busy)
                started = time.monotonic()
            await asyncio.sleep(0.01)
        assert self._library is not None
        seen, delay, attempt = self._generation, 0.05, 0
        while True:
            attempt += 1
            try:
                await self._connect(seen)
                log.info("reconnected to the HSM after %d attempt(s); serving again", attempt)
                return
            except LoginRefused as exc:
                self._fatal = f"the HSM refused the PIN ({exc.ckr}); fix it and restart (not retried, to avoid locking the account)"
                log.error("%s", self._fatal)
                return
            except HsmError as exc:
                (log.warning if attempt == 1 else log.debug)("the HSM is still unavailable (%s); retrying", exc)
            except Exception:  # a bug must not end recovery for good
                log.exception("reconnecting to the HSM failed unexpectedly; retrying")
            seen = self._library.generation
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _refresh_loop(self) -> None:
        """Rescan the catalog on the control session; notice a lost token.

        Every refresh_seconds, or SCAN_SHARE_INVERSE times the last scan's duration if that is
        longer: a scan costs about 0.2 ms per key on SoftHSMv2 (docs/pkcs11.md), so a large
        token is rescanned less often instead of taking a fifth of a core. In event-loop mode a
        scan also stalls the worker while it runs: past SLOW_INLINE_SCAN_SECONDS that is said once.
        """
        loop = asyncio.get_running_loop()
        pause = self._cfg.refresh_seconds
        while True:
            await asyncio.sleep(pause)
            if not self._up or self._scanning:
                continue
            generation, session = self._generation, self._control_session
            self._scanning = True
            started = time.monotonic()
            future = loop.run_in_executor(self._control, _scan_checked, session)
            future.add_done_callback(lambda _: setattr(self, "_scanning", False))
            try:
                catalog = await asyncio.wait_for(asyncio.shield(future), max(1.0, 5 * self._cfg.operation_timeout_seconds))
                pause = self._next_refresh(time.monotonic() - started, len(catalog))
            except TimeoutError:
                log.warning("the key catalog refresh is slow; keeping the previous catalog")
                continue
            except TokenLost as exc:
                self._lost(exc, generation)
                continue
            except HsmError as exc:
                log.warning("key catalog refresh failed: %s", exc)
                continue
            except Exception:
                log.exception("key catalog refresh failed unexpectedly")
                continue
            if self._up and generation == self._generation:
                self._catalog = catalog

    def _next_refresh(self, seconds: float, keys: int) -> float:
        """The pause before the next scan, after one that took `seconds` (warning once if it stalled the loop)."""
        if self._on_loop and seconds > SLOW_INLINE_SCAN_SECONDS and not self._slow_scan_said:
            self._slow_scan_said = True
            log.warning(
                "the key catalog scan (%d keys) took %.0f ms on the event loop, where requests wait meanwhile; "
                "with this many keys set pkcs11.call_mode = \"threads\" (docs/pkcs11.md)", keys, seconds * 1000,
            )  # fmt: skip
        return max(self._cfg.refresh_seconds, SCAN_SHARE_INVERSE * seconds)

    # --- keys (worker threads) -----------------------------------------------------------------------

    def _resolve(self, slot: _Slot, key_id: str, fresh: bool = False) -> tuple[TokenKey, Any]:
        """The key object for a label on this slot's session: cached unless the catalog moved."""
        entry = self._catalog.get(key_id)
        if entry is not None and entry.copies > 1:
            raise InternalException(duplicate_message(key_id, entry.copies))
        cached = slot.keys.get(key_id)
        if not fresh and cached is not None and cached[0] == entry:
            return cached
        try:
            found = find(slot.session, key_id)
        except PKCS11Error as exc:
            raise lost_or_failed(exc, f"looking up key {key_id}") from None
        if not found:
            check_token(slot.session)  # a missing key, or a missing token?
            slot.keys.pop(key_id, None)
            self._catalog.pop(key_id, None)
            raise KeyNotFoundException(f"no key {key_id} in this key store")
        if len(found) > 1:
            raise InternalException(duplicate_message(key_id, len(found)))
        try:
            entry = describe(found[0])
        except PKCS11Error as exc:
            raise lost_or_failed(exc, f"reading key {key_id}") from None
        self._catalog[key_id] = entry
        slot.keys[key_id] = (entry, found[0])
        return entry, found[0]

    def _with_key(self, slot: _Slot, key_id: str, operation: str, op: Callable[[TokenKey, Any], T]) -> T:
        """Run op(entry, key object), mapping HSM errors; a stale handle is looked up once more."""
        for attempt in (1, 2):
            entry, key = self._resolve(slot, key_id, fresh=attempt == 2)
            try:
                return op(entry, key)
            except PKCS11Error as exc:
                try:
                    raise_mapped(exc, key_id, operation)
                except StaleHandle:
                    slot.keys.pop(key_id, None)
                    if attempt == 2:
                        check_token(slot.session)
                        raise
        raise AssertionError("unreachable")

    @staticmethod
    def _usable(entry: TokenKey, key: Any, key_id: str, usage: KeyUsage) -> None:
        if not entry.xks_ready:
            raise InvalidKeyUsageException(f"key {key_id} is {entry.key_spec}; XKS keys are AES_256")
        if usage not in entry.usage or not hasattr(key, usage.value.lower()):
            raise InvalidKeyUsageException(f"key {key_id} does not allow {usage.value}")

    def _encrypt_sync(self, slot: _Slot, key_id: str, plaintext: bytes, aad: bytes | None) -> Encrypted:
        metadata = self._cfg.ciphertext_metadata

        def op(entry: TokenKey, key: Any) -> Encrypted:
            self._usable(entry, key, key_id, KeyUsage.ENCRYPT)
            iv, ciphertext, tag = gcm_encrypt(slot.session, key, plaintext, aad, metadata, self._cfg.iv_mode)
            return Encrypted(ciphertext=ciphertext, iv=iv, tag=tag, metadata=metadata)

        return self._with_key(slot, key_id, "encrypt", op)

    def _decrypt_sync(
        self, slot: _Slot, key_id: str, ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes | None, metadata: bytes | None
    ) -> bytes:
        def op(entry: TokenKey, key: Any) -> bytes:
            self._usable(entry, key, key_id, KeyUsage.DECRYPT)
            return gcm_decrypt(key, iv, ciphertext, tag, aad, metadata)

        return self._with_key(slot, key_id, "decrypt", op)

    def _lookup_sync(self, slot: _Slot, key_id: str) -> TokenKey:
        return self._resolve(slot, key_id)[0]

    def _probe_sync(self, slot: _Slot) -> None:
        key_id = self._cfg.health_key
        sealed = self._encrypt_sync(slot, key_id, _HEALTH_PROBE, b"health")
        plain = self._decrypt_sync(slot, key_id, sealed.ciphertext, sealed.iv, sealed.tag, b"health", sealed.metadata)
        if plain != _HEALTH_PROBE:
            raise InternalException("the health probe decrypted to other bytes")

    # --- the KeyManager interface ---------------------------------------------------------------------

    def _addressable(self, key_id: str) -> None:
        if key_id == self._cfg.health_key:  # internal: no KMS key may use the health-check key
            raise KeyNotFoundException(f"no key {key_id} in this key store")

    async def get_metadata(self, store: str, key_id: str) -> KeyMetadata:
        self._addressable(key_id)
        entry = self._catalog.get(key_id) if self._up else None
        if entry is None:
            entry = await self._run(self._lookup_sync, key_id)  # refresh on miss
        if entry.copies > 1:
            raise InternalException(duplicate_message(key_id, entry.copies))
        return KeyMetadata(key_spec=entry.key_spec, usage=entry.usage, enabled=True)

    async def encrypt(self, store: str, key_id: str, plaintext: bytes, aad: bytes | None) -> Encrypted:
        self._addressable(key_id)
        return await self._run(self._encrypt_sync, key_id, plaintext, aad)

    async def decrypt(
        self,
        store: str,
        key_id: str,
        ciphertext: bytes,
        iv: bytes,
        tag: bytes,
        aad: bytes | None,
        metadata: bytes | None,
    ) -> bytes:
        self._addressable(key_id)
        return await self._run(self._decrypt_sync, key_id, ciphertext, iv, tag, aad, metadata)

    async def health(self) -> list[EkmHealth]:
        return [EkmHealth(id=self._ekm_id, model=self._model, state=await self._health_state())]

    async def _health_state(self) -> HealthState:
        """A real encrypt+decrypt on the health key. Slow answers are cached (≤ health_cache_seconds)."""
        now = time.monotonic()
        if not self._up:
            return HealthState.UNAVAILABLE
        if self._health is not None and self._health[0] > now:
            return self._health[1]
        try:
            await self._run(self._probe_sync)
        except (DependencyTimeoutException, ThrottlingException):
            return self._remember(HealthState.DEGRADED)
        except XksError as exc:
            log.error("health probe on key %s failed: %s %s", self._cfg.health_key, exc.name, exc.message)
            return HealthState.UNAVAILABLE
        if time.monotonic() - now > self._cfg.operation_timeout_seconds / 2:
            return self._remember(HealthState.DEGRADED)
        recent = [t for t in self._failures if t > now - _FAILURE_WINDOW_SECONDS]
        return HealthState.DEGRADED if recent else HealthState.ACTIVE

    def _remember(self, state: HealthState) -> HealthState:
        self._health = (time.monotonic() + self._cfg.health_cache_seconds, state)
        return state


def _time_out(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


def _scan_checked(session: Any) -> dict[str, TokenKey]:
    check_token(session)
    try:
        return scan(session)
    except PKCS11Error as exc:
        raise lost_or_failed(exc, "listing the token's keys") from None


def _close_all(sessions: list[Any]) -> None:
    for session in sessions:
        if session is None:
            continue
        try:
            session.close()
        except PKCS11Error:
            pass
