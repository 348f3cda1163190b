"""gateway.pacing.PlayoutClock and SpeakingGate, driven with explicit ``now`` values (no sleeping)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing import PlayoutClock, SpeakingGate

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


# ---------------------------------------------------------------------- SpeakingGate

QUIET = 1.75 * FRAME  # 105 ms without an uplink frame: the microphone is off


def streaming_gate(until: float, start: float = 0.0, max_s: float = 1.5) -> SpeakingGate:
    """A gate that saw one uplink frame per 60 ms from ``start`` up to ``until``."""
    gate = SpeakingGate(gap_s=0.1, max_s=max_s, quiet_s=QUIET)
    n = round((until - start) / FRAME)
    for k in range(n + 1):
        gate.uplink(until - (n - k) * FRAME)  # the last one exactly at ``until``
    return gate


def test_streaming_uplink_holds_the_first_frame_until_it_goes_quiet() -> None:
    gate = streaming_gate(until=10.0)
    gate.start(10.0)  # `tts start` sent while the device streams
    at, why = gate.release()
    assert why == "uplink_quiet" and at == pytest.approx(10.0 + QUIET)
    # the stalled `tts start` has not arrived: the microphone keeps streaming, the release moves
    for t in (10.06, 10.12, 10.18, 10.24):
        gate.uplink(t)
        at2, why2 = gate.release()
        assert why2 == "uplink_quiet" and at2 == pytest.approx(t + QUIET) and at2 > at
        at = at2


def test_release_never_before_the_start_gap() -> None:
    gate = streaming_gate(until=5.0)
    gate.start(5.05)  # the last frame came 50 ms before `tts start`: quiet at 5.105
    at, why = gate.release()
    assert why == "uplink_quiet" and at == pytest.approx(5.05 + 0.1)  # the gap is later


def test_a_microphone_that_never_stops_is_released_at_the_bound() -> None:
    gate = streaming_gate(until=1.0)
    gate.start(1.0)
    t = 1.0
    while t < 4.0:
        t += FRAME
        gate.uplink(t)
    at, why = gate.release()
    assert why == "bound" and at == pytest.approx(1.0 + 1.5)


def test_no_evidence_keeps_the_fixed_gap() -> None:
    # a client that sent no audio
    gate = SpeakingGate(gap_s=0.1, max_s=1.5, quiet_s=QUIET)
    gate.start(3.0)
    assert gate.release() == (pytest.approx(3.1), "fixed_gap")
    # manual mode after `listen stop`: the uplink was quiet before `tts start`
    gate = streaming_gate(until=2.0)
    gate.start(2.0 + QUIET + 0.5)
    assert gate.release()[1] == "fixed_gap"
    gate.uplink(2.8)  # a frame after `tts start` does not turn the fixed gap into a wait
    assert gate.release() == (pytest.approx(2.0 + QUIET + 0.6), "fixed_gap")
    # realtime mode: the microphone stays on while speaking
    gate = streaming_gate(until=2.0)
    gate.start(2.01, mic_stays_on=True)
    assert gate.release() == (pytest.approx(2.11), "fixed_gap")
    # the wait turned off (start_wait_max_ms 0)
    gate = streaming_gate(until=2.0, max_s=0.0)
    gate.start(2.01)
    assert gate.release() == (pytest.approx(2.11), "fixed_gap")


def test_each_reply_is_judged_afresh() -> None:
    gate = streaming_gate(until=1.0)
    gate.start(1.01)
    assert gate.release()[1] == "uplink_quiet"
    gate.start(9.0)  # the next reply: the microphone has been quiet since 1.0
    assert gate.release() == (pytest.approx(9.1), "fixed_gap")
    gate.uplink(19.96)
    gate.uplink(20.02)
    gate.start(20.02)
    assert gate.release() == (pytest.approx(20.02 + QUIET), "uplink_quiet")


@settings(max_examples=200, deadline=None)
@given(
    start=st.floats(min_value=0, max_value=1000),
    arrivals=st.lists(st.floats(min_value=-0.2, max_value=3.0), max_size=40),
    max_s=st.floats(min_value=0.0, max_value=3.0),
    realtime=st.booleans(),
)
def test_gate_invariants(start: float, arrivals: list[float], max_s: float, realtime: bool) -> None:
    """Never before the gap, never after the bound, and never while the microphone streams."""
    gate = SpeakingGate(gap_s=0.1, max_s=max_s, quiet_s=QUIET)
    before = [a for a in arrivals if a < 0]
    after = sorted(a for a in arrivals if a >= 0)
    for a in before:
        gate.uplink(start + a)
    gate.start(start, mic_stays_on=realtime)
    for a in after:
        gate.uplink(start + a)
    at, why = gate.release()
    assert at >= start + 0.1 - EPS
    assert at <= start + max(0.1, max_s) + EPS
    if why == "uplink_quiet":
        assert not realtime and gate.last_uplink is not None
        assert at >= gate.last_uplink + QUIET - EPS  # quiet for 1.75 frames when released
