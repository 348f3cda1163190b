"""The benchmarks' reading of /metrics: parsing, deltas and histogram quantiles."""

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from xiaozhi import prom


def exposition(observations: list[float], frames: int) -> str:
    registry = CollectorRegistry()
    hist = Histogram("lag_seconds", "lag", ["stage"], buckets=(0.001, 0.01, 0.1), registry=registry)
    counter = Counter("frames_total", "frames", registry=registry)
    for value in observations:
        hist.labels("vad").observe(value)
    counter.inc(frames)
    return generate_latest(registry).decode()


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 100 observations, all between 1 ms and 10 ms: the median is half-way through that bucket.
    samples = prom.parse(exposition([0.005] * 100, 0))
    cumulative = prom.buckets(samples, "lag_seconds", stage="vad")
    assert cumulative[0] == (0.001, 0.0) and cumulative[1] == (0.01, 100.0)
    assert math.isclose(prom.histogram_quantile(0.5, cumulative), 0.0055)
    assert math.isclose(prom.histogram_quantile(0.99, cumulative), 0.001 + 0.009 * 0.99)


def test_quantile_across_buckets_and_beyond_the_last() -> None:
    samples = prom.parse(exposition([0.0005] * 90 + [0.05] * 9 + [5.0], 0))
    cumulative = prom.buckets(samples, "lag_seconds")
    assert prom.histogram_quantile(0.5, cumulative) < 0.001
    assert 0.01 < prom.histogram_quantile(0.95, cumulative) < 0.1
    # The top 1 % is above every finite bucket: the answer is the last bound, a lower bound.
    assert prom.histogram_quantile(0.999, cumulative) == 0.1
    assert prom.histogram_quantile(0.5, []) is None
    assert prom.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_delta_of_two_scrapes_counts_only_the_window() -> None:
    before = prom.parse(exposition([0.005] * 10, 100))
    after = prom.parse(exposition([0.005] * 10 + [0.05] * 30, 160))
    window = prom.delta(after, before)
    assert prom.value(window, "frames_total") == 60
    cumulative = prom.buckets(window, "lag_seconds")
    assert cumulative[-1][1] == 30  # only the 30 new observations
    assert 0.01 < prom.histogram_quantile(0.5, cumulative) < 0.1
