"""Real-time pacing of downlink audio, as pure clocks (protocol.md §4.4).

The device buffers at most 40 frames and drops what does not fit, so the server must not burst.
The clock models the device's play-out: it knows when the frames sent so far will have finished
playing, and lets a frame go only while the device then holds at most ``lead_frames`` frames. The
first ``lead_frames`` frames of a reply therefore go at once (the pre-buffer), then one per
frame duration. After a gap (waiting for the LLM, a tool, the next sentence) the device's buffer
has run dry and the clock re-bases by itself, so audio never rushes to catch up.
:class:`SpeakingGate` says when a reply's first frame may go: once the device is in *speaking*.
"""

from __future__ import annotations


class PlayoutClock:
    """When may the next frame be sent, and when will the device have played everything?"""

    def __init__(self, frame_s: float = 0.060, lead_frames: int = 5) -> None:
        self.frame_s = frame_s
        self.lead_s = frame_s * lead_frames
        self.play_end = 0.0  # monotonic time at which the device finishes what it was sent
        self.frames_sent = 0

    def reset(self) -> None:
        """A new reply starts: the device flushed its buffer on `tts start`."""
        self.play_end = 0.0
        self.frames_sent = 0

    def delay(self, now: float) -> float:
        """Seconds to wait before the next frame may be sent."""
        # Once sent, the frame must not leave more than ``lead_frames`` frames in the device.
        return max(0.0, self.play_end + self.frame_s - self.lead_s - now)

    def sent(self, now: float) -> None:
        """Record that one frame was sent at ``now``."""
        self.play_end = max(self.play_end, now) + self.frame_s
        self.frames_sent += 1

    def buffered(self, now: float) -> float:
        """Seconds of audio the device still holds at ``now``."""
        return max(0.0, self.play_end - now)


class SpeakingGate:
    """When may the first frame of a reply go? When the device has entered *speaking*.

    The firmware drops downlink audio that arrives before it is in *speaking* (``OnIncomingAudio``),
    and `tts start` only schedules the switch on its main loop. A fixed gap after sending `tts
    start` does not help when the link stalls and then delivers `tts start` and the first frames
    at once. But in auto and manual mode entering *speaking* turns the microphone off
    (``EnableVoiceProcessing(false)``): a device that was streaming uplink audio when `tts start`
    went out stops once it has switched. So the first frame goes when the uplink has been quiet
    for ``quiet_s`` (two uplink frames by default, from the last frame's arrival), never before the
    fixed ``gap_s`` and never later than ``max_s`` after `tts start`. Without that evidence (the
    uplink was already quiet, realtime mode keeps the microphone on, ``max_s`` is 0) the fixed
    gap stays. Pure: times are passed in.
    """

    UPLINK_QUIET = "uplink_quiet"
    FIXED_GAP = "fixed_gap"
    BOUND = "bound"

    def __init__(self, gap_s: float = 0.1, max_s: float = 1.5, quiet_s: float = 0.120) -> None:
        self.gap_s = gap_s
        self.max_s = max_s
        self.quiet_s = quiet_s
        self.started_at = 0.0
        self.last_uplink: float | None = None
        self.watching = False  # the uplink was streaming at `tts start`: wait for it to stop

    def uplink(self, at: float) -> None:
        """An uplink audio frame arrived at ``at``."""
        if self.last_uplink is None or at > self.last_uplink:
            self.last_uplink = at

    def start(self, now: float, mic_stays_on: bool = False) -> None:
        """`tts start` was sent at ``now``; ``mic_stays_on``: realtime mode."""
        self.started_at = now
        self.watching = (
            self.max_s > self.gap_s
            and not mic_stays_on
            and self.last_uplink is not None
            and now - self.last_uplink < self.quiet_s
        )

    def release(self) -> tuple[float, str]:
        """(the earliest time the first frame may go, why), as far as is known now.

        A later uplink frame can only move the time later, so a sender sleeps until it, asks
        again, and sends once the answer is not in the future.
        """
        fixed = self.started_at + self.gap_s
        if not self.watching or self.last_uplink is None:
            return fixed, self.FIXED_GAP
        bound = self.started_at + self.max_s
        quiet = max(fixed, self.last_uplink + self.quiet_s)
        if quiet >= bound:
            return bound, self.BOUND
        return quiet, self.UPLINK_QUIET
