"""Rate limits: token buckets by key (a source IP, a device id), in bounded memory.

Pure: time comes in as an argument, so the tests drive it.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """At most ``per_minute`` events per key, with bursts of up to ``per_minute`` (0: no limit).

    Buckets of keys not seen for a while are forgotten first when more than ``max_keys`` are
    tracked, so a flood of distinct keys cannot grow memory without bound.
    """

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key``; False when it has none left."""
        if self.capacity <= 0:
            return True
        tokens, last = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def exhausted(self, key: str, now: float) -> bool:
        """True when ``key`` has no token left (nothing is taken)."""
        if self.capacity <= 0 or key not in self._buckets:
            return False
        tokens, last = self._buckets[key]
        return min(self.capacity, tokens + (now - last) * self.rate) < 1.0

    def __len__(self) -> int:
        return len(self._buckets)
