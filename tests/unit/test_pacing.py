"""gateway.pacing.PlayoutClock, driven with explicit ``now`` values (no sleeping)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing import PlayoutClock

FRAME = 0.060
EPS = 1e-9


def send_asap(clock: PlayoutClock, now: float, n: int) -> tuple[float, list[float]]:
    """Send ``n`` frames each as soon as the clock allows; returns (time, delays)."""
    delays = []
    for _ in range(n):
        d = clock.delay(now)
        delays.append(d)
        now += d
        clock.sent(now)
    return now, delays


@pytest.mark.parametrize("start", [0.0, 12.5, 100000.0])
def test_first_lead_frames_go_at_once_then_one_per_frame(start: float) -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now = start
    for i in range(5):
        assert clock.delay(now) == pytest.approx(0.0, abs=EPS), f"frame {i} of the pre-buffer waited"
        clock.sent(now)
    # the 6th frame sent at the same instant would be a burst: it must wait one frame
    assert clock.delay(now) == pytest.approx(FRAME, abs=EPS)
    _, delays = send_asap(clock, now, 20)
    assert delays == pytest.approx([FRAME] * 20, abs=1e-6)


def test_pre_buffer_is_exactly_lead_frames() -> None:
    for lead in (1, 3, 5, 10):
        clock = PlayoutClock(frame_s=0.02, lead_frames=lead)
        zero = 0
        while clock.delay(0.0) <= EPS:
            clock.sent(0.0)
            zero += 1
            assert zero < 1000
        assert zero == lead


def test_device_never_holds_more_than_lead_frames() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now = 3.0
    for _ in range(200):
        now += clock.delay(now)
        clock.sent(now)
        assert clock.buffered(now) <= 5 * FRAME + EPS
        now += 0.001  # the send itself takes a little time


def test_steady_state_rate_is_one_frame_per_duration() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    start = 50.0
    end, _ = send_asap(clock, start, 105)
    # 5 go at once, the other 100 one per frame duration
    assert end - start == pytest.approx(100 * FRAME, abs=1e-6)


def test_late_sender_is_not_asked_to_wait() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now, _ = send_asap(clock, 0.0, 10)
    # the sender shows up late (e.g. the next frame was slow to arrive): no delay
    assert clock.delay(now + 0.5) == 0.0


def test_idle_gap_rebases_without_rushing() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now, _ = send_asap(clock, 0.0, 30)
    assert clock.buffered(now) == pytest.approx(5 * FRAME, abs=1e-6)
    # a gap (waiting for the next sentence) much longer than the buffer
    now += 2.0
    assert clock.buffered(now) == 0.0
    # the buffer ran dry: a fresh pre-buffer of 5 goes at once...
    for _ in range(5):
        assert clock.delay(now) == pytest.approx(0.0, abs=EPS)
        clock.sent(now)
    # ...but no more: the clock does not try to "catch up" on the gap
    assert clock.delay(now) == pytest.approx(FRAME, abs=EPS)
    assert clock.play_end == pytest.approx(now + 5 * FRAME, abs=1e-6)


def test_short_gap_keeps_remaining_buffer() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now, _ = send_asap(clock, 0.0, 10)  # device holds 5 frames (0.3 s)
    now += 0.12  # two frames played meanwhile
    assert clock.buffered(now) == pytest.approx(3 * FRAME, abs=1e-6)
    # two frames may go at once to top the buffer up to 5, then pacing resumes
    assert clock.delay(now) == pytest.approx(0.0, abs=EPS)
    clock.sent(now)
    assert clock.delay(now) == pytest.approx(0.0, abs=EPS)
    clock.sent(now)
    assert clock.delay(now) == pytest.approx(FRAME, abs=EPS)


def test_buffered() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    assert clock.buffered(10.0) == 0.0
    for _ in range(3):
        clock.sent(10.0)
    assert clock.buffered(10.0) == pytest.approx(0.18)
    assert clock.buffered(10.1) == pytest.approx(0.08)
    assert clock.buffered(10.18) == pytest.approx(0.0, abs=EPS)
    assert clock.buffered(11.0) == 0.0  # never negative


def test_frames_sent_counts() -> None:
    clock = PlayoutClock()
    send_asap(clock, 0.0, 7)
    assert clock.frames_sent == 7


def test_reset_starts_a_new_reply() -> None:
    clock = PlayoutClock(frame_s=FRAME, lead_frames=5)
    now, _ = send_asap(clock, 0.0, 12)
    assert clock.delay(now) > 0
    clock.reset()
    assert clock.frames_sent == 0
    assert clock.play_end == 0.0
    assert clock.buffered(now) == 0.0
    # the device flushed its buffer on `tts start`: a new pre-buffer goes at once
    for _ in range(5):
        assert clock.delay(now) == pytest.approx(0.0, abs=EPS)
        clock.sent(now)
    assert clock.delay(now) > 0


def test_defaults() -> None:
    clock = PlayoutClock()
    assert clock.frame_s == pytest.approx(0.060)
    assert clock.lead_s == pytest.approx(0.300)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.01, 0.12),
    st.integers(1, 10),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60),
)
def test_pacing_invariants(frame_s: float, lead: int, gaps: list[float]) -> None:
    """With arbitrary pauses between frames the device never over-fills, and a frame is only
    ever delayed while the device already holds a full pre-buffer."""
    clock = PlayoutClock(frame_s=frame_s, lead_frames=lead)
    now = 1000.0
    for gap in gaps:
        now += gap
        d = clock.delay(now)
        assert d >= 0.0
        if d > 1e-9:
            assert clock.buffered(now) > (lead - 1) * frame_s - 1e-6
        now += d
        clock.sent(now)
        assert clock.buffered(now) <= lead * frame_s + 1e-6
