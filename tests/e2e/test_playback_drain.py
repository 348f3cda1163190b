"""The `tts stop` tail by firmware version, on a real gateway process: firmware 2.4.0 and later
plays its queue out after `tts stop` and reopens the mic itself, so the gateway sends `tts stop`
once the device has played the reply, with no extra tail; older firmware cuts what it holds on
`tts stop` and gets the safe tail. The reply is published on `xz.out.<session>` as the TTS
worker does (no pipeline needed)."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS

from shared.messages import AudioFrameMeta, OutEvent
from tests.conftest import start_gateway
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

TAIL_S = 1.5  # gateway.stop_tail_ms for older firmware, long so that the relation is clear
FRAMES = 8


async def stop_after_last_frame(nc: NATS, ws_url: str, version: str, ota_url: str | None = None) -> float:
    """Seconds from the reply's last audio frame to `tts stop`, as the device sees them. With
    ``ota_url`` the device asks OTA first and speaks no MCP: the gateway knows its version
    from the OTA request only."""
    device = SimDevice(ota_url=ota_url, ws_url=None if ota_url else ws_url, firmware_version=version)
    await device.connect(features={} if ota_url else None)
    try:
        if not ota_url:
            # The device's MCP serverInfo names its version; the gateway asks tools/list after it.
            for _ in range(200):
                if any(r.get("method") == "tools/list" for r in device.mcp_requests):
                    break
                await asyncio.sleep(0.02)
            assert any(r.get("method") == "tools/list" for r in device.mcp_requests)
        sid, turn = device.session_id, f"t-{version}"
        subject = f"xz.out.{sid}"
        await nc.publish(subject, OutEvent(kind="stt", session_id=sid, turn_id=turn, text="hi").encode())
        await nc.publish(subject, OutEvent(kind="sentence_start", session_id=sid, turn_id=turn, seq=0, text="Hello there.").encode())
        for index in range(FRAMES):
            await nc.publish(subject, b"\xf8\xff\xfe", headers=AudioFrameMeta(turn_id=turn, seq=0, index=index).headers())
        await nc.publish(subject, OutEvent(kind="sentence_end", session_id=sid, turn_id=turn, seq=0, frames=FRAMES).encode())
        await nc.publish(subject, OutEvent(kind="turn_end", session_id=sid, turn_id=turn, sentences=1).encode())

        def stop(r) -> bool:
            return r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "stop"

        assert await device.wait_for(stop, timeout=10) is not None
        frames = [r.at for r in device.received if r.kind == "audio"]
        assert len(frames) == FRAMES
        return next(r.at for r in device.received if stop(r)) - frames[-1]
    finally:
        await device.close()


async def test_firmware_that_drains_gets_tts_stop_without_the_tail(nats_only):
    gateway = start_gateway(nats_only, stop_tail_ms=str(int(TAIL_S * 1000)))
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        old = await stop_after_last_frame(nc, gateway.ws_url, "2.3.0")
        new = await stop_after_last_frame(nc, gateway.ws_url, "2.4.2")
        # Firmware without MCP (or before its answer): the version its OTA request named.
        old_ota = await stop_after_last_frame(nc, gateway.ws_url, "2.3.0", ota_url=f"{gateway.http_url}/xiaozhi/ota/")
        new_ota = await stop_after_last_frame(nc, gateway.ws_url, "2.4.0", ota_url=f"{gateway.http_url}/xiaozhi/ota/")
    finally:
        await nc.close()
    # Older firmware: the device's play-out, then the tail (a sleep: never shorter). 2.4.x: the
    # play-out only (at most the few frames sent ahead), well under half of that.
    print(f"tts stop after the last frame: {old:.3f} s (2.3.0), {new:.3f} s (2.4.2)")
    assert old >= TAIL_S, old
    assert new < old / 2, (new, old)
    assert old_ota >= TAIL_S and new_ota < old_ota / 2, (new_ota, old_ota)
