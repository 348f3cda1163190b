"""Real-time pacing of downlink audio, as a pure clock (protocol.md §4.4).

The device buffers at most 40 frames and drops what does not fit, so the server must not burst.
The clock models the device's play-out: it knows when the frames sent so far will have finished
playing, and lets a frame go only while the device then holds at most ``lead_frames`` frames. The
first ``lead_frames`` frames of a reply therefore go at once (the pre-buffer), then one per
frame duration. After a gap (waiting for the LLM, a tool, the next sentence) the device's buffer
has run dry and the clock re-bases by itself, so audio never rushes to catch up.
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
