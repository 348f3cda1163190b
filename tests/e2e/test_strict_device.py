"""The simulated device is as strict as the firmware, over a real socket (a scripted server).

A tiny WebSocket server plays the gateway's part exactly as each test scripts it, so what the
device drops, sends by itself and re-opens is checked without the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from xiaozhi.firmware import Jitter
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

HELLO = {"type": "hello", "transport": "websocket", "session_id": "s1", "audio_params": {"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 60}}
FRAME = b"\xf8\xff\xfe"  # a tiny Opus packet


class Scripted:
    """A server whose reply to each device text message is ``script(ws, message)``."""

    def __init__(self, script=None, hello_first=None) -> None:
        self.script = script
        self.hello_first = hello_first  # sent before the hello reply
        self.connections = 0
        self.hellos = 0
        self.messages: list[dict] = []
        self.tasks: list[asyncio.Task] = []

    async def handler(self, ws) -> None:
        self.connections += 1
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue
                message = json.loads(raw)
                self.messages.append(message)
                if message.get("type") == "hello":
                    self.hellos += 1
                    if self.hello_first:
                        await self.hello_first(ws)
                    await ws.send(json.dumps(HELLO))
                elif self.script:
                    # On its own, as the gateway does: the server goes on reading while it replies.
                    self.tasks.append(asyncio.create_task(self.script(ws, message)))
        except websockets.ConnectionClosed:
            pass


async def serve(server: Scripted):
    return await websockets.serve(server.handler, "127.0.0.1", 0, compression=None)


def url(ws_server) -> str:
    return f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/"


async def reply(ws, frames: int, gap_s: float = 0.1, spacing_s: float = 0.06, ahead: int = 5) -> None:
    """A reply as the gateway paces it: tts start, a gap, frames ahead then real time, tts stop."""
    await ws.send(json.dumps({"type": "tts", "state": "start"}))
    await asyncio.sleep(gap_s)
    start = time.monotonic()
    for k in range(frames):
        delay = start + max(0, k - ahead) * spacing_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(FRAME)
    await asyncio.sleep(ahead * 0.06 + 0.1)
    await ws.send(json.dumps({"type": "tts", "state": "stop"}))


async def test_a_paced_reply_loses_nothing_and_auto_mode_listens_again_by_itself():
    async def script(ws, message):
        if message.get("type") == "listen" and message.get("state") == "detect":
            await reply(ws, 20)

    server = Scripted(script)
    ws_server = await serve(server)
    try:
        async with SimDevice(ws_url=url(ws_server)) as device:
            await device.listen_start("auto")
            report = await device.type_text("hi")
            assert report.frames == 20 and device.drops == 0, device.fw.drops
            await asyncio.sleep(0.2)
            starts = [m for m in server.messages if m.get("type") == "listen" and m.get("state") == "start"]
            assert len(starts) == 2 and device.fw.state == "listening"  # ours, then the device's own
    finally:
        ws_server.close()


async def test_a_burst_beyond_the_decode_queue_is_dropped():
    async def script(ws, message):
        if message.get("state") == "detect":
            await ws.send(json.dumps({"type": "tts", "state": "start"}))
            await asyncio.sleep(0.1)
            for _ in range(60):  # no pacing at all
                await ws.send(FRAME)
            await asyncio.sleep(0.3)
            await ws.send(json.dumps({"type": "tts", "state": "stop"}))

    ws_server = await serve(Scripted(script))
    try:
        async with SimDevice(ws_url=url(ws_server)) as device:
            await device.type_text("hi")
            # 40 in the decode queue, two decoded, one playing: 60 - 43 lost.
            assert device.fw.drops.queue_full == 17 and device.fw.accepted == 43
    finally:
        ws_server.close()


async def test_audio_before_speaking_and_tts_start_while_connecting_are_dropped():
    async def early(ws):
        await ws.send(json.dumps({"type": "tts", "state": "start"}))
        await ws.send(FRAME)

    async def script(ws, message):
        if message.get("state") == "detect":
            await ws.send(json.dumps({"type": "tts", "state": "start"}))
            await ws.send(FRAME)  # no gap: the device has not switched to speaking yet
            await asyncio.sleep(0.1)
            await ws.send(FRAME)
            await ws.send(json.dumps({"type": "tts", "state": "stop"}))
            await ws.send(FRAME)  # after stop: listening

    ws_server = await serve(Scripted(script, hello_first=early))
    try:
        async with SimDevice(ws_url=url(ws_server)) as device:
            await device.type_text("hi")
            assert ("tts start", "connecting") in device.fw.ignored
            await asyncio.sleep(0.1)
            assert device.fw.drops.not_speaking == {"connecting": 1, "entering speaking": 1, "listening": 1}, device.fw.drops
            assert device.fw.accepted == 1
    finally:
        ws_server.close()


async def test_older_firmware_drops_the_queue_at_tts_stop():
    async def script(ws, message):
        if message.get("state") == "detect":
            await ws.send(json.dumps({"type": "tts", "state": "start"}))
            await asyncio.sleep(0.1)
            for _ in range(10):
                await ws.send(FRAME)
            await ws.send(json.dumps({"type": "tts", "state": "stop"}))  # no tail

    ws_server = await serve(Scripted(script))
    try:
        for version, flushed in (("2.3.0", True), ("2.4.0", False)):
            async with SimDevice(ws_url=url(ws_server), firmware_version=version) as device:
                await device.type_text("hi")
                assert (device.fw.drops.flushed >= 8) is flushed, (version, device.fw.drops)
    finally:
        ws_server.close()


async def test_realtime_sends_listen_start_once():
    async def script(ws, message):
        if message.get("state") == "detect":
            await reply(ws, 3)

    server = Scripted(script)
    ws_server = await serve(server)
    try:
        async with SimDevice(ws_url=url(ws_server)) as device:
            await device.listen_for_turn("realtime")
            for _ in range(2):
                await device.type_text("hi")
                await asyncio.sleep(0.3)
                await device.listen_for_turn("realtime")  # the firmware's pipeline never stopped
            starts = [m for m in server.messages if m.get("type") == "listen" and m.get("state") == "start"]
            assert [m["mode"] for m in starts] == ["realtime"]
    finally:
        ws_server.close()


async def test_wake_word_while_speaking_aborts_and_listens_after_playback():
    async def script(ws, message):
        if message.get("state") == "detect":
            await reply(ws, 30)

    server = Scripted(script)
    ws_server = await serve(server)
    try:
        async with SimDevice(ws_url=url(ws_server)) as device:
            await device.listen_start("auto")
            await device.detect("hi")
            assert await device.wait_for(lambda r: r.kind == "audio", timeout=5)
            await asyncio.sleep(0.1)
            await device.wake_word("你好小智")
            await asyncio.sleep(0.05)
            abort_at = server.messages.index({"session_id": "s1", "type": "abort", "reason": "wake_word_detected"}) + 1
            assert not any(m.get("state") == "detect" for m in server.messages[abort_at:])  # no detect while speaking
            # The `listen start` waits until what was queued has played.
            assert device.fw.pending_listen
            await device.wait_for(device._is_tts("stop"), timeout=10)
            for _ in range(100):
                if not device.fw.pending_listen:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)
            assert server.messages[-1].get("type") == "listen" and server.messages[-1].get("state") == "start"
            assert device.fw.drops.not_speaking.get("listening", 0) > 0  # the rest of the reply is not played
    finally:
        ws_server.close()


async def test_an_idle_channel_expires_and_the_next_turn_opens_a_new_socket():
    async def script(ws, message):
        if message.get("state") == "detect":
            await reply(ws, 2)

    server = Scripted(script)
    ws_server = await serve(server)
    try:
        async with SimDevice(ws_url=url(ws_server), channel_timeout_s=1) as device:
            await device.type_text("hi")
            await asyncio.sleep(0.5)
            await device.type_text("again")  # within the limit: same socket
            assert server.connections == 1
            await asyncio.sleep(2.1)  # more than 1 whole second without data
            report = await device.type_text("later")
            assert report.stopped and device.reconnects == 1
            assert server.connections == 2 and server.hellos == 2
    finally:
        ws_server.close()


async def test_jitter_stalls_show_as_underruns():
    async def script(ws, message):
        if message.get("state") == "detect":
            await reply(ws, 80)

    ws_server = await serve(Scripted(script))
    try:
        # Seeded (the same stall schedule each run) and long enough (4.8 s of audio) that stalls
        # fall while the device plays, not only before its first frame.
        stalls = Jitter(delay_ms=5, jitter_ms=2, stall_every_s=0.5, stall_ms=600, seed=7)
        async with SimDevice(ws_url=url(ws_server), jitter=stalls) as device:
            report = await device.type_text("hi")
            assert report.frames == 80 and report.underruns > 0 and report.max_gap_s > 0.4, report
        async with SimDevice(ws_url=url(ws_server)) as device:
            report = await device.type_text("hi")
            assert report.underruns == 0 and report.max_gap_s < 0.2, report
    finally:
        ws_server.close()


async def test_wake_word_barge_in_against_the_gateway(pipeline):
    """The firmware's wake-word barge-in, against the real pipeline: the gateway ends the reply
    (its `tts stop` finds the device already listening), and the next spoken turn works."""
    from tests.conftest import fixture_wav
    from xiaozhi.sim import read_wav

    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        assert await device.wait_for(lambda r: r.kind == "audio", timeout=60, start_index=mark)
        await asyncio.sleep(0.5)
        barge = len(device.received)
        await device.wake_word("你好小智")
        assert device.sent[-1] == {"session_id": device.session_id, "type": "abort", "reason": "wake_word_detected"}
        assert await device.wait_for(device._is_tts("stop"), timeout=5, start_index=barge), "abort not answered with tts stop"
        assert ("tts stop", "listening") in device.fw.ignored
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")), reply_timeout=60)
        assert report.error is None and "time" in (report.stt or "").lower(), report
        assert report.frames > 0 and device.fw.drops.queue_full == 0
        assert "entering speaking" not in device.fw.drops.not_speaking, device.fw.drops


# ---------------------------------------------------------------------- a stall that holds `tts start`


class StallAtTtsStart(Jitter):
    """A 4g-like link (40 ms + ~25 ms, seeded) that stalls for ``stall_ms`` the moment `tts start`
    leaves the server: `tts start` and whatever the server sends in the next ``stall_ms`` reach
    the device together when the stall ends (TCP order), as in the bench's 4g runs that lost the
    start of replies."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stalls = 0

    def deliver_at(self, now: float, message=None) -> float:
        if isinstance(message, str) and '"tts"' in message:
            parsed = json.loads(message)
            if parsed.get("type") == "tts" and parsed.get("state") == "start":
                self._stall_until = max(self._stall_until, now + self.stall_ms / 1000)
                self.stalls += 1
        return super().deliver_at(now, message)


def spoken_wake_word():
    """你好小智 (real speech), cut where the wake word engine fires (as test_session_flows)."""
    from tests.conftest import fixture_wav
    from xiaozhi.sim import read_wav

    return read_wav(fixture_wav("zh_wake.wav"))[: 16 * 960]


async def greeting_over_a_stall(ws_url: str):
    """The wake word with its pre-roll, then the live microphone (silence) until the device is
    speaking: the cached greeting's `tts start` and first frames leave the gateway within a
    moment of each other, and the link stalls 700 ms as `tts start` goes."""
    import numpy as np

    link = StallAtTtsStart(delay_ms=40, jitter_ms=25, stall_ms=700, seed=11)
    async with SimDevice(ws_url=ws_url, jitter=link) as device:
        mark = len(device.received)
        await device.wake_word("你好小智", preroll=spoken_wake_word())
        speaking = lambda: device.fw.state == "speaking" and time.monotonic() >= (device.fw.speaking_from or 0)  # noqa: E731
        await device.stream_pcm(np.zeros(0, dtype=np.int16), until=speaking, max_s=20)
        report = await device.collect_turn(mark, time.monotonic(), timeout=30)
        return device.fw.drops, report, link


async def test_a_stall_holding_tts_start_loses_nothing_entering_speaking(pipeline):
    """The gateway holds the first frame until the device's microphone has gone quiet (it
    entered speaking): the frames do not come with the stalled `tts start`."""
    from xiaozhi import prom

    before = await asyncio.to_thread(prom.scrape, pipeline.metrics["gateway"])
    drops, report, link = await greeting_over_a_stall(pipeline.ws_url)
    after = await asyncio.to_thread(prom.scrape, pipeline.metrics["gateway"])
    assert link.stalls == 1 and report.stopped and report.sentences == ["Hi! I'm listening."], report
    assert report.frames > 5 and report.lost_frames == 0, report
    assert "entering speaking" not in drops.not_speaking and drops.total == 0, drops
    # The first frame came after the device had switched (20 ms after `tts start` arrived).
    assert report.start_gap_s is not None and report.start_gap_s >= 0.02, report
    released = prom.delta(after, before)
    assert prom.value(released, "xz_gateway_first_frame_releases_total", how="uplink_quiet") >= 1, released


@pytest.fixture
def fixed_gap_gateway(pipeline):
    """A second gateway on the same pipeline with the old fixed 100 ms start gap only."""
    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, start_wait_max_ms="0")
    yield gateway.ws_url
    gateway.stop()


async def test_the_same_stall_loses_the_first_frames_with_only_the_fixed_gap(fixed_gap_gateway):
    """The control: without waiting for the device, the same stall delivers `tts start` with the
    first frames at once, and the device drops them entering speaking (so the test above can
    fail)."""
    async with SimDevice(ws_url=fixed_gap_gateway) as device:  # the greeting clip is cached
        await device.detect("你好小智")
        await device.listen_start("auto")
        assert (await device.collect_turn(0, time.monotonic(), timeout=30)).stopped
    drops, report, link = await greeting_over_a_stall(fixed_gap_gateway)
    assert link.stalls == 1 and report.stopped, report
    assert drops.not_speaking.get("entering speaking", 0) > 0, drops
