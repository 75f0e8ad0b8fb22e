"""Load shedding: a per-store request-rate quota and a global cap on requests in flight.

Both answer "no" at once rather than queueing: KMS gives each call 250 ms, so a request that
waits in a queue under overload is a timeout anyway, and it makes the admitted ones late too.
Saying 429 immediately keeps the latency of admitted requests flat and lets KMS back off.

The quota is a token bucket per store, charged only after the signature verified (so nobody
without a store's credential can use up its quota). The in-flight cap protects the process and
counts every API request from routing to the answer. Everything runs on the event loop thread:
plain integers and floats, no locks.

With several worker processes each worker holds 1/N of every limit (rate, burst and in-flight
cap, rounded up), so the proxy as a whole keeps to the configured numbers as long as the
kernel spreads connections evenly, which it does for a client with many connections, as KMS.
"""

from __future__ import annotations

import math
import time

from xks_proxy.config import Config, Quota


class TokenBucket:
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


class Throttle:
    """Admission control for the XKS server. `configure` swaps settings in on reload."""

    def __init__(self, config: Config, workers: int = 1) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self._workers = max(1, workers)
        self._buckets: dict[str, TokenBucket] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply new limits. A store whose quota did not change keeps its bucket (and its debt)."""
        self.max_in_flight = math.ceil(config.throttle.max_in_flight / self._workers)
        buckets: dict[str, TokenBucket] = {}
        for store in config.stores:
            if store.quota.rate <= 0:
                continue
            quota = Quota(store.quota.rate / self._workers, math.ceil(store.quota.burst / self._workers))
            old = self._buckets.get(store.prefix)
            same = old is not None and old.rate == quota.rate and old.burst == quota.burst
            buckets[store.prefix] = old if same and old is not None else TokenBucket(quota)
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
