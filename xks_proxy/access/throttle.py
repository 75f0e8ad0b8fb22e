"""Load shedding: a per-store request-rate quota and a cap on requests in flight.

Both answer "no" at once rather than queueing: KMS gives each call 250 ms, so a request that
waits in a queue under overload is a timeout anyway, and it makes the admitted ones late too.
Saying 429 immediately keeps the latency of admitted requests flat and lets KMS back off.

The quota is a token bucket per store, charged only after the signature verified (so nobody
without a store's credential can use up its quota). One process has plain local buckets. With
several workers the quota is the proxy's, not a worker's: however the kernel spreads KMS's
connections (one busy keep-alive connection sits on one worker), so every worker charges the
same bucket, a slot of a `BucketTable` the supervisor maps before it forks them.

The in-flight cap protects a process (its event loop, its key manager), so it stays per worker:
1/N of the configured cap each, rounded up. Everything here runs on a worker's event loop thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import tempfile
import time

from xks_proxy.config import Config, Quota

log = logging.getLogger("xks_proxy")

#: Slots of the shared table, one per store with a quota (40 bytes each). A slot whose bucket has
#: refilled is as good as a new one, so it is reused first; only with more stores than slots all
#: busy at once would a store's bucket be refilled early (the fullest one's).
SLOTS = 1024
#: A slot: key (8 bytes of BLAKE2b of the prefix; 0 = free), rate, burst, tokens, time of the last charge.
_SLOT = struct.Struct("<Qdddd")
#: How long to wait for a lock another worker holds before going on without it. Only a stopped
#: process (SIGSTOP, a debugger) holds one that long: the kernel drops a dead process's locks. The
#: request is then admitted unmetered (fail open): a quota sheds excess load, and the in-flight cap,
#: which needs no lock, still protects the worker; failing closed would turn one stopped worker into
#: an outage of every store with a quota.
LOCK_WAIT_SECONDS = 0.05
_WARN_EVERY_SECONDS = 60.0


def _key(prefix: str) -> int:
    """The same non-zero 64-bit key for a prefix in every process (unlike `hash`, which is salted)."""
    return int.from_bytes(hashlib.blake2b(prefix.encode(), digest_size=8).digest(), "little") or 1


class TokenBucket:
    """One process's bucket: `burst` at once, refilled at `rate` per second."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, quota: Quota) -> None:
        self.rate = quota.rate
        self.burst = float(quota.burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class BucketTable:
    """The buckets every worker of a proxy shares: a shared anonymous mapping and a lock file.

    Made by the supervisor before it forks; the children inherit both. A slot is locked with a
    POSIX record lock on its byte of the (unlinked) lock file, held for a few arithmetic
    operations: the kernel drops it when its holder dies, so a SIGKILLed worker cannot wedge the
    others. POSIX locks belong to a process, not a thread: only the event loop thread takes them.
    """

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, slots * _SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
        self._lock_file = tempfile.TemporaryFile()
        self._fd = self._lock_file.fileno()
        self._warned = -_WARN_EVERY_SECONDS

    def fileno(self) -> int:
        """The lock file, for a process that was not forked from the table's maker (a test's lock holder)."""
        return self._fd

    def lock(self, byte: int) -> bool:
        """Lock byte i (slot i; byte `slots` guards claims); False after LOCK_WAIT_SECONDS (then go on without)."""
        deadline = 0.0
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
                return True
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another worker
                now = time.monotonic()
                if not deadline:
                    deadline = now + LOCK_WAIT_SECONDS
                elif now > deadline:
                    self._stuck(now)
                    return False
                os.sched_yield()

    def unlock(self, byte: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, byte)

    def _stuck(self, now: float) -> None:
        if now - self._warned >= _WARN_EVERY_SECONDS:
            self._warned = now
            log.warning("a throttle lock was held over %g s (a stopped worker?): admitting without the quota meanwhile",
                        LOCK_WAIT_SECONDS)  # fmt: skip

    def claim(self, key: int, rate: float, burst: float) -> int:
        """The slot of this key, claimed (full) if it has none; found the same from every worker."""
        locked = self.lock(self.slots)
        try:
            now = time.monotonic()
            found, spare = self._probe(key, now)
            if found is not None:
                return found
            locked_slot = self.lock(spare)
            try:
                _SLOT.pack_into(self.memory, spare * _SLOT.size, key, rate, burst, burst, now)
            finally:
                if locked_slot:
                    self.unlock(spare)
            return spare
        finally:
            if locked:
                self.unlock(self.slots)

    def _probe(self, key: int, now: float) -> tuple[int | None, int]:
        """(the key's slot or None, the slot to claim for it). Linear probing; slots are overwritten,
        never emptied, so a key is always found before the first free slot of its run."""
        reusable, fullest, most = None, 0, -1.0
        for step in range(self.slots):
            index = (key + step) % self.slots
            held, rate, burst, tokens, stamp = _SLOT.unpack_from(self.memory, index * _SLOT.size)
            if held == key:
                return index, index
            if held == 0:
                return None, index if reusable is None else reusable
            fill = (tokens + max(0.0, now - stamp) * rate) / burst if burst > 0 else math.inf
            if fill >= 1.0 and reusable is None:
                reusable = index  # refilled: reusing it changes nothing for its old store
            if fill > most:
                fullest, most = index, fill
        return None, fullest if reusable is None else reusable


class SharedBucket:
    """A worker's handle on its store's slot; the quota is this worker's configuration's."""

    __slots__ = ("table", "key", "rate", "burst", "index", "offset")

    def __init__(self, table: BucketTable, prefix: str, quota: Quota) -> None:
        self.table, self.key = table, _key(prefix)
        self.rate, self.burst = quota.rate, float(quota.burst)
        self._claim()

    def _claim(self) -> None:
        self.index = self.table.claim(self.key, self.rate, self.burst)
        self.offset = self.index * _SLOT.size

    def take(self) -> bool:
        table, offset = self.table, self.offset
        if not table.lock(self.index):
            return True  # fail open: see LOCK_WAIT_SECONDS
        try:
            key, _, _, tokens, stamp = _SLOT.unpack_from(table.memory, offset)
            if key == self.key:
                now = time.monotonic()  # read under the lock: stamps never go back
                tokens = min(self.burst, tokens + max(0.0, now - stamp) * self.rate)
                admitted = tokens >= 1.0
                _SLOT.pack_into(table.memory, offset, key, self.rate, self.burst, tokens - admitted, now)
                return admitted
        finally:
            table.unlock(self.index)
        self._claim()  # the slot went to another store (this one's bucket was the fullest): a full one again
        return self.take()


class Throttle:
    """Admission control for the XKS server. `configure` swaps settings in on reload."""

    def __init__(self, config: Config, workers: int = 1) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self._workers = max(1, workers)
        self._table: BucketTable | None = None
        self._buckets: dict[str, TokenBucket | SharedBucket] = {}
        self._config = config
        self.configure(config)

    def share(self, table: BucketTable) -> None:
        """Charge the proxy's shared buckets from now on (a forked worker, before it serves)."""
        self._table, self._buckets = table, {}
        self.configure(self._config)

    def configure(self, config: Config) -> None:
        """Apply new limits. A store keeps its bucket (a reload is not a refill); a changed quota
        applies to it from the next request, capped at the new burst."""
        self._config = config
        self.max_in_flight = math.ceil(config.throttle.max_in_flight / self._workers)
        buckets: dict[str, TokenBucket | SharedBucket] = {}
        for store in config.stores:
            if store.quota.rate <= 0:
                continue
            bucket = self._buckets.get(store.prefix)
            if bucket is None:
                bucket = TokenBucket(store.quota) if self._table is None else SharedBucket(self._table, store.prefix, store.quota)
            bucket.rate, bucket.burst = store.quota.rate, float(store.quota.burst)
            buckets[store.prefix] = bucket
        self._buckets = buckets

    def enter(self) -> bool:
        """Admit one more request in flight, or refuse; a True must be paired with `leave()`."""
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def take(self, prefix: str) -> bool:
        """Charge one request to a store's quota; False when it is used up."""
        bucket = self._buckets.get(prefix)
        return bucket is None or bucket.take()
