"""gateway.limits.RateLimiter: token buckets by key, in bounded memory."""

from gateway.limits import RateLimiter


def test_burst_then_refill() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.allow("ip", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.allow("ip", 10.0)  # 10 s refills half a token
    assert limiter.allow("ip", 20.5)  # 20 s: one token
    assert not limiter.allow("ip", 20.6)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(per_minute=1)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(per_minute=0)
    assert all(limiter.allow("x", 0.0) for _ in range(1000))
    assert len(limiter) == 0


def test_memory_is_bounded_under_a_flood_of_keys() -> None:
    limiter = RateLimiter(per_minute=5, max_keys=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(limiter) == 100


def test_exhausted_peeks_without_taking() -> None:
    limiter = RateLimiter(per_minute=2)
    assert not limiter.exhausted("ip", 0.0)  # never seen
    limiter.allow("ip", 0.0)
    assert not limiter.exhausted("ip", 0.0)
    limiter.allow("ip", 0.0)
    assert limiter.exhausted("ip", 0.0) and limiter.exhausted("ip", 0.0)
    assert not limiter.exhausted("ip", 30.0)  # a token back after 30 s


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    from gateway.limits import ClientAddress

    none = ClientAddress([])
    assert none("10.0.0.7", "1.2.3.4") == "10.0.0.7"  # nobody trusted: the header is ignored
    behind = ClientAddress(["10.0.0.0/8", "::1"])
    assert behind("10.0.0.7", "1.2.3.4") == "1.2.3.4"
    # A client's own X-Forwarded-For entries are to the left of what the proxy appended.
    assert behind("10.0.0.7", "6.6.6.6, 1.2.3.4") == "1.2.3.4"
    assert behind("10.0.0.7", "1.2.3.4, 10.0.0.9") == "1.2.3.4"
    assert behind("192.168.1.5", "1.2.3.4") == "192.168.1.5"  # not a proxy of ours
    assert behind("10.0.0.7", None) == "10.0.0.7"
    assert behind("::1", "fe80::1") == "fe80::1"
