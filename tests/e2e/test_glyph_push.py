"""glyph_push end to end (firmware 2.4, protocol.md §5.9): a device whose hello announces its
text font gets bitmaps for the characters its charset lacks, on stt and sentence_start; a device
without the feature gets none; a gateway without a CJK font sends none and says so once.

Light on CPU: the typed turn is aborted as soon as its stt came; sentence_start comes from a
wake-word greeting (the TTS worker's clip, no LLM).
"""

from __future__ import annotations

import time

import pytest

from gateway import glyphs
from tests.conftest import start_gateway
from tests.unit.test_glyphs import device_parse, lvgl_unpack
from xiaozhi.sim import SimDevice

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(glyphs.find_font() is None, reason="no Noto CJK font: apt-get install fonts-noto-cjk (make tools)"),
]

TEXT_FONT = {"bundle": "noto-v1", "charset": "common", "size": 20, "bpp": 4}
CAPABILITY = {"glyph_push": True, **TEXT_FONT}
GREETING = "Hi 龘! I'm listening."


def is_stt(r) -> bool:
    return r.kind == "json" and r.message.get("type") == "stt"


def sentence(r) -> bool:
    return r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "sentence_start"


def assert_pushes_dragon(message: dict) -> None:
    parsed = device_parse(message, CAPABILITY)  # raises where the firmware would reject it
    assert [g["codepoint"] for g in parsed] == [ord("龘")], parsed
    g = parsed[0]
    image = lvgl_unpack(g["data"], g["box_w"], g["box_h"], 4)
    assert g["box_w"] > 10 and g["box_h"] > 10 and sum(1 for row in image for v in row if v) > 50


async def typed_stt(device: SimDevice, text: str) -> dict:
    mark = len(device.received)
    await device.detect(text)
    stt = await device.wait_for(is_stt, timeout=60, start_index=mark)
    assert stt is not None, "no stt for the typed text"
    await device.abort()  # the reply itself is not needed
    return stt.message


async def test_stt_carries_glyphs_only_for_a_glyph_push_device(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url, text_font=TEXT_FONT) as device:
        message = await typed_stt(device, "龘字怎么读？")
        assert message["text"] == "龘字怎么读？"
        # 字怎么读 are in the common charset: only 龘 is pushed.
        assert_pushes_dragon(message)
    async with SimDevice(ws_url=pipeline.ws_url) as plain:
        message = await typed_stt(plain, "龘字怎么读？")
        assert "glyph_push" not in message
    assert '"glyph_push"' in pipeline.log("gateway")


@pytest.fixture
def greeting_gateways(pipeline):
    """Two more gateways whose wake-word greeting has a rare character: one with the font, one
    pointed at a font that is not there."""
    with_font = start_gateway(pipeline.stack, wake_word_greeting=GREETING)
    no_font = start_gateway(pipeline.stack, wake_word_greeting=GREETING, glyph_font_path="/nonexistent/NotoSansCJK-Regular.ttc")
    yield with_font, no_font
    with_font.stop()
    no_font.stop()


async def greet(ws_url: str, text_font: dict | None) -> dict:
    async with SimDevice(ws_url=ws_url, text_font=text_font) as device:
        mark = len(device.received)
        await device.detect("你好小智")
        await device.listen_start("auto")
        report = await device.collect_turn(mark, time.monotonic(), timeout=30)
        assert report.sentences == [GREETING], report.events
        first = next(r for r in device.received[mark:] if sentence(r))
        return first.message


async def test_sentence_start_carries_glyphs_and_no_font_sends_none(pipeline, greeting_gateways):
    with_font, no_font = greeting_gateways
    assert_pushes_dragon(await greet(with_font.ws_url, TEXT_FONT))
    assert "glyph_push" not in await greet(with_font.ws_url, None)
    # No font: the text goes out alone, twice, and the gateway said why once.
    for _ in range(2):
        assert "glyph_push" not in await greet(no_font.ws_url, TEXT_FONT)
    assert pipeline.log("gateway").count("no CJK font for glyph_push") == 1  # all gateways log there
