"""Read a service's ``/metrics`` for the benchmarks: counters, and quantiles of histograms.

Quantiles come from bucket counts the way PromQL's ``histogram_quantile`` computes them
(linear inside the bucket), so they are as fine as the buckets and no finer.
"""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5) -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for (sample, sample_labels), v in samples.items():
        if sample == name and all((k, val) in sample_labels for k, val in labels.items()):
            total += v
    return total


def delta(after: Samples, before: Samples) -> Samples:
    """``after - before`` for every sample (counters and histogram buckets over a window)."""
    return {key: v - before.get(key, 0.0) for key, v in after.items()}


def buckets(samples: Samples, histogram: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative ``(upper bound, count)`` pairs of one histogram, summed over other labels."""
    by_le: dict[float, float] = {}
    for (sample, sample_labels), v in samples.items():
        if sample != f"{histogram}_bucket":
            continue
        as_dict = dict(sample_labels)
        if any(as_dict.get(k) != val for k, val in labels.items()):
            continue
        le = float(as_dict["le"])
        by_le[le] = by_le.get(le, 0.0) + v
    return sorted(by_le.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0..1) of a histogram given its cumulative buckets; None when empty.

    Above the highest finite bucket the answer is that bucket's bound (a lower bound), as in
    Prometheus.
    """
    if not cumulative:
        return None
    total = cumulative[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper, count
    return lower_bound


def merge(windows: list[Samples]) -> Samples:
    """The sum of several processes' samples (replicas of one stage)."""
    total: Samples = {}
    for window in windows:
        for key, v in window.items():
            total[key] = total.get(key, 0.0) + v
    return total
