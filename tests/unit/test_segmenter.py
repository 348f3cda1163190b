"""vad_svc.detector.Segmenter: speech/silence decisions per 32 ms window -> utterances."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vad_svc.detector import WINDOW_MS, Segmenter, SegmenterConfig

HIGH = 0.9
LOW = 0.1
MID = 0.4  # between neg_threshold (0.35) and threshold (0.5)


def windows(ms: float) -> int:
    """Windows needed to reach ``ms``."""
    return math.ceil(ms / WINDOW_MS)


def push_all(seg: Segmenter, probs: list[float]) -> list[tuple[int, str]]:
    return [(i, r) for i, p in enumerate(probs) if (r := seg.push(p)) is not None]


def test_window_is_32_ms() -> None:
    assert WINDOW_MS == 32.0


def test_silence_only_produces_nothing() -> None:
    seg = Segmenter()
    assert push_all(seg, [LOW] * 500) == []
    assert not seg.in_speech


def test_speech_then_min_silence_ends_the_utterance() -> None:
    seg = Segmenter()
    assert seg.push(HIGH) == "start"
    assert seg.in_speech and seg.speaking_now
    for _ in range(20):  # 672 ms of speech in total
        assert seg.push(HIGH) is None
    silence = windows(700)  # 22 windows = 704 ms
    for _ in range(silence - 1):
        assert seg.push(LOW) is None
    assert seg.silence_ms == pytest.approx((silence - 1) * WINDOW_MS)
    assert seg.push(LOW) == "end"
    assert not seg.in_speech
    assert seg.speech_ms == pytest.approx(21 * WINDOW_MS)


def test_exact_boundary_of_min_silence() -> None:
    cfg = SegmenterConfig(min_silence_ms=320, min_speech_ms=32)
    seg = Segmenter(cfg)
    seg.push(HIGH)
    seg.push(HIGH)
    assert push_all(seg, [LOW] * 9) == []
    assert seg.push(LOW) == "end"  # 10 windows = exactly 320 ms


def test_speech_resets_the_silence_count() -> None:
    seg = Segmenter()
    seg.push(HIGH)
    for _ in range(10):
        seg.push(HIGH)
    # a pause shorter than min_silence, then more speech: still one utterance
    assert push_all(seg, [LOW] * 15 + [HIGH] * 5 + [LOW] * 15) == []
    assert seg.in_speech
    assert seg.silence_ms == pytest.approx(15 * WINDOW_MS)
    assert push_all(seg, [LOW] * 7) == [(6, "end")]


def test_too_short_speech_is_discarded() -> None:
    seg = Segmenter()
    n = windows(250) - 1  # 7 windows = 224 ms < 250 ms
    results = push_all(seg, [HIGH] * n + [LOW] * windows(700))
    assert results == [(0, "start"), (n + windows(700) - 1, "discard")]
    assert not seg.in_speech


def test_just_long_enough_speech_is_kept() -> None:
    seg = Segmenter()
    n = windows(250)  # 8 windows = 256 ms
    results = push_all(seg, [HIGH] * n + [LOW] * windows(700))
    assert results == [(0, "start"), (n + windows(700) - 1, "end")]


def test_silence_windows_do_not_count_as_speech() -> None:
    seg = Segmenter()
    # 4 speech windows split by short gaps: 128 ms of speech over a much longer span
    probs = [HIGH, LOW, LOW, HIGH, LOW, LOW, HIGH, LOW, LOW, HIGH] + [LOW] * windows(700)
    assert push_all(seg, probs)[-1][1] == "discard"


def test_hysteresis_does_not_start_speech() -> None:
    seg = Segmenter()
    assert push_all(seg, [MID] * 100) == []
    assert not seg.in_speech


def test_hysteresis_keeps_speech_going() -> None:
    seg = Segmenter()
    seg.push(HIGH)
    # values between the thresholds keep the previous state: speaking
    assert push_all(seg, [MID] * 100) == []
    assert seg.in_speech and seg.speaking_now
    assert seg.silence_ms == 0.0
    assert seg.speech_ms == pytest.approx(101 * WINDOW_MS)


def test_hysteresis_keeps_silence_going() -> None:
    seg = Segmenter()
    for _ in range(10):
        seg.push(HIGH)
    seg.push(LOW)  # now silent
    silent_so_far = seg.silence_ms
    # mid values keep the previous state: silence keeps accumulating to the end of the turn
    results = push_all(seg, [MID] * windows(700))
    assert results[-1][1] == "end"
    assert silent_so_far == WINDOW_MS


def test_threshold_edges() -> None:
    cfg = SegmenterConfig(threshold=0.5, neg_threshold=0.35)
    seg = Segmenter(cfg)
    assert seg.push(0.4999) is None
    assert seg.push(0.5) == "start"  # >= threshold is speech
    seg.push(0.35)  # not below neg_threshold: still speaking
    assert seg.speaking_now
    seg.push(0.3499)
    assert not seg.speaking_now


def test_max_utterance_forces_an_end() -> None:
    cfg = SegmenterConfig(max_utterance_ms=320)
    seg = Segmenter(cfg)
    results = push_all(seg, [HIGH] * 30)
    # start at window 0; total reaches 320 ms at the 10th window; speech still going: restart
    assert results[:2] == [(0, "start"), (9, "end")]
    assert results[2] == (10, "start")


def test_default_max_utterance_is_30_s() -> None:
    seg = Segmenter()
    results = push_all(seg, [HIGH] * 1000)
    assert results[0] == (0, "start")
    assert results[1] == (windows(30000) - 1, "end")


def test_max_utterance_ends_even_during_a_pause() -> None:
    cfg = SegmenterConfig(max_utterance_ms=640, min_silence_ms=10000)
    seg = Segmenter(cfg)
    results = push_all(seg, [HIGH] * 5 + [LOW] * 30)
    assert results == [(0, "start"), (19, "end")]


def test_next_utterance_after_an_end() -> None:
    seg = Segmenter()
    first = [HIGH] * 20 + [LOW] * windows(700)
    second = [LOW] * 10 + [HIGH] * 20 + [LOW] * windows(700)
    results = push_all(seg, first + second)
    assert [r for _, r in results] == ["start", "end", "start", "end"]
    assert results[2][0] == len(first) + 10


def test_reset() -> None:
    seg = Segmenter()
    for _ in range(10):
        seg.push(HIGH)
    seg.reset()
    assert (seg.in_speech, seg.speaking_now, seg.speech_ms, seg.silence_ms, seg.total_ms) == (False, False, 0.0, 0.0, 0.0)
    assert seg.push(LOW) is None
    assert seg.push(HIGH) == "start"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), max_size=400))
def test_decisions_alternate_and_utterances_are_bounded(probs: list[float]) -> None:
    cfg = SegmenterConfig(max_utterance_ms=3200)
    seg = Segmenter(cfg)
    open_at = None
    for i, p in enumerate(probs):
        r = seg.push(p)
        if r == "start":
            assert open_at is None and p >= cfg.threshold
            open_at = i
        elif r in ("end", "discard"):
            assert open_at is not None
            assert (i - open_at + 1) * WINDOW_MS <= cfg.max_utterance_ms
            if r == "discard":
                assert seg.speech_ms < cfg.min_speech_ms
            open_at = None
        else:
            assert r is None
        assert seg.in_speech == (open_at is not None)
