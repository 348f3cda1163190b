"""The VAD stream after a wake word's pre-roll, and control messages held behind their audio
(real Silero, real speech)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shared.audio import encode_pcm
from shared.messages import Control, OutEvent, VadClaim
from shared.settings import Settings
from tests.conftest import fixture_wav
from vad_svc.service import SessionStream, VadWorker
from xiaozhi.sim import read_wav

FRAME = 960


@pytest.fixture(scope="module")
def worker() -> VadWorker:
    return VadWorker(Settings())


def wake_packets() -> list[bytes]:
    return encode_pcm(read_wav(fixture_wav("zh_wake.wav"))[: 16 * FRAME], 16000, 60)


def stream_for(worker: VadWorker) -> SessionStream:
    return SessionStream(VadClaim(session_id="s", device_id="d"), worker.vad, worker.model)


def feed(stream: SessionStream, packets: list[bytes]) -> list:
    return [r for p in packets if (r := stream.on_frame(p)) is not None]


def test_wake_word_alone_is_dropped_with_an_end_verdict(worker: VadWorker) -> None:
    stream = stream_for(worker)
    assert feed(stream, wake_packets()) == []
    assert stream.utterance is not None  # the wake word is speech, still open
    stream.begin_wake()
    assert feed(stream, encode_pcm(np.zeros(16000, dtype=np.int16), 16000, 60)) == []
    assert stream.wake_verdict == "end" and not stream.wake_pending
    assert stream.utterance is None  # no turn of it


def test_question_in_the_same_breath_joins_the_wake_word(worker: VadWorker) -> None:
    stream = stream_for(worker)
    burst = wake_packets()
    feed(stream, burst)
    stream.begin_wake()
    question = encode_pcm(np.concatenate([read_wav(fixture_wav("en_what_time.wav"))[640:], np.zeros(16000, dtype=np.int16)]), 16000, 60)
    done = feed(stream, question)
    assert stream.wake_verdict == "more"
    assert len(done) == 1
    packets, reason, _ = done[0]
    assert reason == "silence"
    # The wake word's speech (from 0.12 s of the burst) and the whole question: one utterance.
    assert len(packets) >= len(burst) - 3 + 12, len(packets)


class FakeNats:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes, headers=None) -> None:
        self.published.append((subject, data))


async def test_a_control_waits_for_the_audio_sent_before_it(worker: VadWorker) -> None:
    """`detect` overtaking its pre-roll (another subscription's task) is applied after it."""
    nc = FakeNats()
    worker.nc = nc  # type: ignore[assignment]
    stream = stream_for(worker)
    worker.streams["s"] = stream
    try:
        burst = wake_packets()
        await worker._on_ctl("s", SimpleNamespace(data=Control(session_id="s", kind="detect", text="小土豆", wake=True, frames=len(burst)).encode()))
        assert not stream.wake_pending and len(stream.held) == 1
        for packet in burst:
            await worker._on_audio("s", SimpleNamespace(data=packet, headers=None))
        assert stream.wake_pending and not stream.held
        for packet in encode_pcm(np.zeros(16000, dtype=np.int16), 16000, 60):
            await worker._on_audio("s", SimpleNamespace(data=packet, headers=None))
        kinds = [OutEvent.decode(data).kind for _, data in nc.published]
        assert kinds.count("wake_end") == 1 and "utterance" not in kinds, kinds
    finally:
        worker.streams.pop("s", None)


def test_the_preroll_burst_is_told_from_a_live_microphone(monkeypatch) -> None:
    """The gateway's test for `detect` right after the pre-roll: frames faster than real time."""
    from collections import deque

    from gateway import session as gs

    now = 1000.0
    monkeypatch.setattr(gs.time, "monotonic", lambda: now)
    s = gs.DeviceSession.__new__(gs.DeviceSession)
    s.hello = None  # 60 ms frames
    s._frame_arrivals = deque([now - 0.01 + i * 0.0005 for i in range(16)], maxlen=64)  # 1 s of audio in 8 ms
    assert s._preroll_burst()
    s._frame_arrivals = deque([now - 0.96 + i * 0.06 for i in range(17)], maxlen=64)  # real time
    assert not s._preroll_burst()
    s._frame_arrivals = deque([now - 0.3 + i * 0.015 for i in range(17)], maxlen=64)  # a busy sender catching up
    assert not s._preroll_burst()
    s._frame_arrivals = deque([now - 2.0 + i * 0.001 for i in range(16)], maxlen=64)  # audio long before the detect
    assert not s._preroll_burst()
    s._frame_arrivals = deque([now - 0.002, now - 0.001], maxlen=64)  # two stray frames
    assert not s._preroll_burst()


async def test_a_second_listen_start_ends_a_wake_no_audio_followed(worker: VadWorker, monkeypatch) -> None:
    """A client that sends no live audio after its wake word gets the greeting without a
    verdict; when it listens again, the pre-roll must not start its next utterance (it would be
    transcribed in front of the question)."""
    told: list[OutEvent] = []

    async def publish(subject, data):
        told.append(OutEvent.decode(data))

    monkeypatch.setattr(worker, "nc", SimpleNamespace(publish=publish), raising=False)
    stream = stream_for(worker)
    feed(stream, wake_packets())
    await worker._apply_ctl(stream, Control(session_id="s", kind="detect", text="你好小智", wake=True))
    await worker._apply_ctl(stream, Control(session_id="s", kind="listen_start", mode="auto"))
    assert stream.wake_pending and stream.utterance is not None  # the first: the utterance goes on
    # No audio; the greeting plays; the device listens again.
    await worker._apply_ctl(stream, Control(session_id="s", kind="listen_start", mode="auto"))
    assert not stream.wake_pending and stream.utterance is None and stream.wake_word == ""
    assert [e.kind for e in told] == ["wake_end"]
    # The question that follows is an utterance of its own, without the wake word.
    question = encode_pcm(np.concatenate([read_wav(fixture_wav("en_what_time.wav")), np.zeros(16000, dtype=np.int16)]), 16000, 60)
    (done,) = feed(stream, question)
    assert len(done[0]) <= len(question), len(done[0])
