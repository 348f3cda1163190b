"""The firmware model the simulated device runs, against scripted frame sequences (no network)."""

from __future__ import annotations

import asyncio
import json

from xiaozhi.firmware import DECODE_QUEUE_PACKETS, DeviceStateMachine, Jitter, tools_list_page, version_at_least
from xiaozhi.sim import SimDevice

F = 0.060


def opened(version: str = "2.4.2", mode: str = "auto") -> DeviceStateMachine:
    """A device whose channel is open and which has sent `listen start`."""
    fw = DeviceStateMachine(version, speaking_delay_s=0.02)
    fw.connecting(0.0)
    fw.channel_opened(0.1)
    fw.listen_start(mode, 0.2)
    return fw


def tts(fw: DeviceStateMachine, state: str, at: float) -> None:
    fw.on_json({"type": "tts", "state": state}, at)


def test_tts_start_ignored_while_connecting_and_audio_dropped():
    fw = DeviceStateMachine()
    fw.connecting(0.0)
    tts(fw, "start", 0.1)
    assert fw.state == "connecting" and fw.ignored == [("tts start", "connecting")]
    assert fw.on_audio(0.2) is False
    assert fw.drops.not_speaking == {"connecting": 1}


def test_audio_only_in_speaking():
    fw = opened()
    assert fw.on_audio(0.3) is False  # listening
    tts(fw, "start", 1.0)
    assert fw.on_audio(1.01) is False  # the switch to speaking has not happened yet
    assert fw.on_audio(1.1) is True
    tts(fw, "stop", 5.0)
    assert fw.on_audio(5.5) is False  # after stop: listening again
    assert fw.drops.not_speaking == {"listening": 2, "entering speaking": 1} and fw.accepted == 1


def test_microphone_stops_when_speaking_takes_effect_not_on_arrival():
    """HandleStateChangedEvent(speaking): EnableVoiceProcessing(false) unless realtime, when the
    scheduled switch runs (20 ms after `tts start` arrived); auto mode reopens it only with its
    own `listen start` after playback drained."""
    fw = opened("2.4.2", "auto")
    assert fw.microphone_on(0.5)
    tts(fw, "start", 1.0)
    assert fw.microphone_on(1.0) and fw.microphone_on(1.019)  # `tts start` only scheduled
    assert not fw.microphone_on(1.02) and not fw.microphone_on(3.0)
    assert fw.on_audio(1.03)
    tts(fw, "stop", 1.05)  # 2.4.x plays the queued frame out, `listen start` after it
    assert fw.state == "listening" and not fw.microphone_on(1.06)
    assert fw.poll(1.2) and fw.microphone_on(1.2)
    manual = opened("2.4.2", "manual")
    tts(manual, "start", 1.0)
    assert not manual.microphone_on(1.1)
    realtime = opened("2.4.2", "realtime")
    tts(realtime, "start", 1.0)
    assert realtime.state == "speaking" and realtime.microphone_on(1.1)  # AEC: the mic stays on


def test_paced_turn_drops_nothing():
    fw = opened()
    tts(fw, "start", 1.0)
    for k in range(100):  # 5 frames ahead, then real time
        fw.on_audio(1.1 + max(0, k - 5) * F)
    tts(fw, "stop", 1.1 + 100 * F)
    assert fw.drops.total == 0 and fw.accepted == 100


def test_burst_beyond_the_decode_queue_is_dropped():
    fw = opened()
    tts(fw, "start", 1.0)
    accepted = [fw.on_audio(1.1 + k * 1e-4) for k in range(60)]
    # 40 wait in the decode queue, two are decoded, one plays: the rest is lost.
    assert sum(accepted) == DECODE_QUEUE_PACKETS + 3 and fw.drops.queue_full == 60 - 43
    assert accepted[:43] == [True] * 43 and not any(accepted[43:])


def test_queued_audio_plays_after_tts_stop_from_2_4_0_and_listen_start_waits_for_drain():
    fw = opened("2.4.2")
    tts(fw, "start", 1.0)
    for k in range(20):
        fw.on_audio(1.1 + k * 1e-3)
    tts(fw, "stop", 1.2)
    assert fw.state == "listening" and fw.drops.flushed == 0
    assert fw.pending_listen and abs(fw.listen_start_due() - (1.1 + 20 * F)) < 0.01
    assert fw.poll(1.5) == []  # still playing
    assert fw.poll(2.4) == [{"type": "listen", "state": "start", "mode": "auto"}]
    assert fw.poll(2.5) == []  # once


def test_older_firmware_flushes_on_tts_stop():
    fw = opened("2.3.9")
    tts(fw, "start", 1.0)
    for k in range(20):
        fw.on_audio(1.1 + k * 1e-3)
    tts(fw, "stop", 1.2)
    assert fw.drops.flushed == 18  # one has played, one is being output: the rest goes
    assert fw.poll(1.1 + 2 * F) == [{"type": "listen", "state": "start", "mode": "auto"}]


def test_realtime_never_resends_listen_start():
    fw = opened(mode="realtime")
    for turn in range(3):
        start = 1.0 + turn * 5
        tts(fw, "start", start)
        fw.on_audio(start + 0.1)
        tts(fw, "stop", start + 1)
        assert fw.state == "listening" and not fw.pending_listen and fw.poll(start + 4) == []
    assert fw.sent == []


def test_manual_mode_goes_idle_after_stop():
    fw = opened(mode="manual")
    tts(fw, "start", 1.0)
    tts(fw, "stop", 2.0)
    assert fw.state == "idle" and fw.poll(5.0) == []


def test_wake_word_while_speaking_aborts_then_listens_after_drain():
    fw = opened()
    tts(fw, "start", 1.0)
    for k in range(10):
        fw.on_audio(1.1 + k * 1e-3)
    out = fw.wake_word(1.2)
    assert out == [{"type": "abort", "reason": "wake_word_detected"}] and fw.state == "listening"
    assert fw.on_audio(1.25) is False  # late reply audio: not speaking any more
    tts(fw, "stop", 1.3)  # ignored: already listening
    assert ("tts stop", "listening") in fw.ignored
    assert fw.poll(1.1 + 10 * F + 0.01) == [{"type": "listen", "state": "start", "mode": "auto"}]


def test_wake_word_while_listening_restarts_listening_at_once():
    fw = opened()
    assert fw.wake_word(0.5) == [{"type": "abort", "reason": "wake_word_detected"}, {"type": "listen", "state": "start", "mode": "auto"}]
    assert DeviceStateMachine().wake_word(0.0) == []  # idle: the caller invokes (detect + start)


def test_channel_expires_after_120_whole_seconds_without_data():
    fw = opened()
    fw.on_data(10.0)
    assert not fw.channel_expired(130.9)  # 120 whole seconds: not yet "more than 120"
    assert fw.channel_expired(131.0)
    fw.on_data(131.0)
    assert not fw.channel_expired(200.0)


def test_tools_list_page_size_arithmetic():
    tools = [{"name": f"t{i}", "description": "x" * 50, "inputSchema": {"type": "object", "properties": {}}} for i in range(5)]
    one = len(json.dumps(tools[0], separators=(",", ":"))) + 1
    # '{"tools":[' (10) + n tools with commas + 30 must stay <= the limit.
    result, error = tools_list_page(tools, max_payload=10 + 2 * one + 30)
    assert error is None and [t["name"] for t in result["tools"]] == ["t0", "t1"] and result["nextCursor"] == "t2"
    result, _ = tools_list_page(tools, max_payload=10 + 2 * one + 29)
    assert [t["name"] for t in result["tools"]] == ["t0"] and result["nextCursor"] == "t1"
    result, _ = tools_list_page(tools, cursor="t3", max_payload=8000)
    assert [t["name"] for t in result["tools"]] == ["t3", "t4"] and "nextCursor" not in result
    assert tools_list_page(tools, max_payload=one)[1] == "Failed to add tool t0 because of payload size limit"
    assert tools_list_page(tools, cursor="nope")[1] == "Failed to add tool  because of payload size limit"
    hidden = tools + [{"name": "self.reboot", "description": "", "inputSchema": {}, "userOnly": True}]
    assert len(tools_list_page(hidden)[0]["tools"]) == 5
    assert tools_list_page(hidden, with_user_tools=True)[0]["tools"][-1] == {"name": "self.reboot", "description": "", "inputSchema": {}}
    assert tools_list_page([]) == ({"tools": []}, None)


def test_version_compare():
    assert version_at_least("2.4.0", "2.4.0") and version_at_least("2.10.1", "2.4.0")
    assert not version_at_least("2.3.9", "2.4.0") and not version_at_least("1.9", "2.4.0")


def test_jitter_keeps_order_and_stalls():
    link = Jitter.parse("delay=10,jitter=5,stall_every=1,stall=300", seed=1)
    times = [link.deliver_at(k * F) for k in range(200)]
    assert times == sorted(times) and all(t >= k * F + 0.010 for k, t in enumerate(times))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 0.2  # a stall held frames back, then they came in a burst
    assert Jitter.parse("wifi") and Jitter.parse("4g") and Jitter.parse(None) is None


async def test_tool_calls_are_answered_one_at_a_time_in_order():
    device = SimDevice(ws_url="ws://unused/", tool_delays={"self.get_device_status": 0.2})
    sent: list[dict] = []

    async def capture(message: dict) -> None:
        sent.append(message)

    device.send_json = capture  # type: ignore[method-assign]
    await device._on_mcp({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "self.get_device_status", "arguments": {}}})
    await device._on_mcp({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 10}}})
    await asyncio.sleep(0.05)
    assert sent == []  # the quick call waits behind the slow one
    await device.mcp_idle()
    assert [m["payload"]["id"] for m in sent] == [1, 2] and device.mcp_calls_max_running == 1
