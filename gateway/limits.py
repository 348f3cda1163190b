"""Rate limits: token buckets by key (a source IP, a device id), in bounded memory.

Pure: time comes in as an argument, so the tests drive it.
"""

from __future__ import annotations

import ipaddress
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


class ClientAddress:
    """The address limits per address count: the peer, or, when the peer is a trusted reverse
    proxy, the rightmost X-Forwarded-For entry that is not itself a trusted proxy."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self.networks = [ipaddress.ip_network(p.strip(), strict=False) for p in trusted_proxies if p.strip()]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def __call__(self, peer: str, forwarded_for: str | None) -> str:
        if not self.networks or not forwarded_for or not self._trusted(peer):
            return peer
        for hop in reversed(forwarded_for.split(",")[-16:]):
            hop = hop.strip()
            if hop and not self._trusted(hop):
                return hop[:64]
        return peer
