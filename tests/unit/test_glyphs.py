"""gateway.glyphs against the firmware's decoder: glyph_push payloads as a 2.4 device reads them.

``device_parse`` re-implements main/protocols/text_glyph_payload.cc (TextGlyphPayload::Parse) and
``lvgl_unpack`` LVGL's lv_font_get_bitmap_fmt_txt for LV_FONT_FMT_TXT_PLAIN with stride 0 (what
DynamicGlyphCache::Rebuild declares), from reading their C code.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math

import pytest

from gateway import glyphs, protocol
from gateway.glyphs import Glyph, GlyphPusher, GlyphRenderer, TextFont

FONT = glyphs.find_font()
needs_font = pytest.mark.skipif(FONT is None, reason="no Noto CJK font: apt-get install fonts-noto-cjk (make tools)")

CAPABILITY = {"glyph_push": True, "bundle": "noto-v1", "charset": "basic", "size": 20, "bpp": 4}


class Rejected(Exception):
    pass


def device_parse(message: dict, capability: dict = CAPABILITY) -> list[dict]:
    """TextGlyphPayload::Parse: all or nothing; returns the glyphs with decoded bitmaps."""
    payload = message.get("glyph_push")
    if not isinstance(payload, dict):
        return []
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731 - cJSON_IsNumber
    v, bundle, size, bpp, items = (payload.get(k) for k in ("v", "bundle", "size", "bpp", "glyphs"))
    if not (capability["glyph_push"] and num(v) and int(v) == 1 and isinstance(bundle, str) and bundle == capability["bundle"]
            and num(size) and size == capability["size"] and num(bpp) and bpp == capability["bpp"]
            and isinstance(items, list) and len(items) <= 64):
        raise Rejected("incompatible glyph payload")
    out = []
    total = 0
    for item in items:
        f = {k: item.get(k) for k in ("codepoint", "adv_w", "box_w", "box_h", "ofs_x", "ofs_y", "bitmap")}
        if not (num(f["codepoint"]) and 0 < f["codepoint"] <= 0x10FFFF and num(f["adv_w"]) and 0 <= f["adv_w"] <= 0xFFFFFFFF
                and num(f["box_w"]) and 0 <= int(f["box_w"]) <= 64 and num(f["box_h"]) and 0 <= int(f["box_h"]) <= 64
                and num(f["ofs_x"]) and -32768 <= int(f["ofs_x"]) <= 32767 and num(f["ofs_y"]) and -32768 <= int(f["ofs_y"]) <= 32767
                and isinstance(f["bitmap"], str)):
            raise Rejected("malformed glyph")
        expected = (int(f["box_w"]) * int(f["box_h"]) * int(bpp) + 7) // 8
        total += expected
        if total > 64 * 1024:
            raise Rejected("oversized glyph payload")
        if len(f["bitmap"]) > ((expected + 2) // 3) * 4 + 4:
            raise Rejected("oversized base64 bitmap")
        if expected == 0:
            if f["bitmap"]:
                raise Rejected("bitmap for an empty box")
            out.append({**f, "data": b""})
            continue
        try:
            data = base64.b64decode(f["bitmap"], validate=True)
        except binascii.Error as exc:
            raise Rejected("invalid base64") from exc
        if len(data) != expected:
            raise Rejected(f"bitmap of {len(data)} bytes, {expected} expected")
        out.append({**f, "data": data})
    return out


def lvgl_unpack(data: bytes, width: int, height: int, bpp: int) -> list[list[int]]:
    """lv_font_get_bitmap_fmt_txt, plain format, stride 0: ``i`` runs on across rows (no row
    padding), the first pixel in the high bits; levels scaled to 0..255 like opa*_table."""
    rows = []
    bit = 0
    top = (1 << bpp) - 1
    for _y in range(height):
        row = []
        for _x in range(width):
            byte = data[bit >> 3]
            level = (byte >> (8 - bpp - (bit & 7))) & top
            row.append(level * 255 // top)
            bit += bpp
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- bitmap packing


@pytest.mark.parametrize("bpp", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [(3, 5), (7, 3), (1, 1), (13, 20), (64, 64)])
def test_pack_round_trips_through_lvgl_unpack(bpp: int, size: tuple[int, int]) -> None:
    width, height = size
    top = (1 << bpp) - 1
    alpha = bytes(((x * 37 + y * 91) % 256) for y in range(height) for x in range(width))
    packed = glyphs.pack(alpha, width, height, bpp)
    assert len(packed) == math.ceil(width * height * bpp / 8)  # no row padding
    unpacked = lvgl_unpack(packed, width, height, bpp)
    for y in range(height):
        for x in range(width):
            value = alpha[y * width + x]
            want = (255 if value >= 128 else 0) if bpp == 1 else round(value * top / 255) * 255 // top
            assert unpacked[y][x] == want, (x, y, value)


def test_pack_known_bytes() -> None:
    # 4 bpp: first pixel in the high nibble; a 3-wide row does not end on a byte: no padding.
    assert glyphs.pack(bytes([0, 255, 17, 0, 255, 255]), 3, 2, 4) == bytes([0x0F, 0x10, 0xFF])
    # 1 bpp, 3x3: nine bits, MSB first, continuing across rows.
    assert glyphs.pack(bytes([255, 0, 255, 0, 255, 0, 255, 0, 255]), 3, 3, 1) == bytes([0b10101010, 0b10000000])


# --------------------------------------------------------------------------- hello and charsets


def test_text_font_from_hello() -> None:
    raw = {"bundle": "noto-v1", "charset": "common", "size": 20, "bpp": 4}
    assert glyphs.text_font({"glyph_push": True}, raw) == TextFont("noto-v1", "common", 20, 4)
    assert glyphs.text_font({"glyph_push": True}, {**raw, "size": 20.0}) == TextFont("noto-v1", "common", 20, 4)
    assert glyphs.text_font({}, raw) is None
    assert glyphs.text_font({"glyph_push": False}, raw) is None
    assert glyphs.text_font({"glyph_push": 1}, raw) is not None  # the fonts README's spelling
    assert glyphs.text_font({"glyph_push": 0}, raw) is None and glyphs.text_font({"glyph_push": "true"}, raw) is None
    assert glyphs.text_font({"glyph_push": True}, None) is None
    for bad in ({"bpp": 2}, {"bpp": 8}, {"charset": "full"}, {"bundle": ""}, {"bundle": "x" * 65}, {"size": 0}, {"size": 20.5}, {"size": True}, {"size": float("inf")}, {"bpp": float("nan")}, {"size": "20"}):
        assert glyphs.text_font({"glyph_push": True}, {**raw, **bad}) is None, bad


def test_hello_keeps_text_font() -> None:
    hello = protocol.parse_message(json.dumps({"type": "hello", "features": {"glyph_push": True}, "text_font": {"bundle": "b", "charset": "basic", "size": 14, "bpp": 1}}))
    assert isinstance(hello, protocol.Hello) and hello.text_font == {"bundle": "b", "charset": "basic", "size": 14, "bpp": 1}
    assert protocol.parse_message('{"type":"hello","text_font":"x"}').text_font is None


def test_missing_follows_the_charset() -> None:
    assert glyphs.missing("Hello, wörld! 123", "basic") == []
    # Locale strings are in basic (the firmware's own zh-CN texts); 龘 is in no charset.
    assert glyphs.missing("龘", "basic") == [ord("龘")] and glyphs.missing("龘", "common") == [ord("龘")]
    assert glyphs.missing("你好龘", "basic") == [ord("龘")]  # 你好 are in the zh-CN strings
    # The tokenizer's frequent hanzi are in common: 妈 is pushed to a basic device only.
    assert glyphs.missing("妈妈", "basic") == [ord("妈")] and glyphs.missing("妈妈", "common") == []
    # GB2312 level 1 hanzi that the DeepSeek vocabulary lacks are pushed to common devices too:
    # 佰 and 叁 (financial numerals) would otherwise show blank.
    assert glyphs.missing("叁佰元", "common") == [ord("叁"), ord("佰")]
    # Full-width forms the vocabulary has are in; those it lacks (＠) are pushed.
    assert glyphs.missing("！＠", "common") == [ord("＠")]
    # Once each, in order; controls out.
    assert glyphs.missing("龘\n龘𠮷\t龘", "common") == [ord("龘"), ord("𠮷")]


def test_protocol_messages_carry_glyph_push_only_when_given() -> None:
    assert "glyph_push" not in json.loads(protocol.stt("s", "hi"))
    assert "glyph_push" not in json.loads(protocol.sentence_start("s", "hi", None))
    push = {"v": 1, "bundle": "b", "size": 20, "bpp": 4, "glyphs": []}
    assert json.loads(protocol.stt("s", "hi", push))["glyph_push"] == push
    assert json.loads(protocol.sentence_start("s", "hi", push))["glyph_push"] == push


# --------------------------------------------------------------------------- rendering


@needs_font
@pytest.mark.parametrize("size,bpp", [(14, 1), (16, 4), (20, 4), (30, 4)])  # the firmware's text profiles
def test_rendered_glyph_decodes_on_the_device(size: int, bpp: int) -> None:
    pusher = GlyphPusher(font_path=FONT)
    font = TextFont("noto-v1", "basic", size, bpp)
    message = json.loads(protocol.stt("s", "龘A", pusher.for_text("龘A", font)))
    push = message["glyph_push"]
    assert {k: push[k] for k in ("v", "bundle", "size", "bpp")} == {"v": 1, "bundle": "noto-v1", "size": size, "bpp": bpp}
    parsed = device_parse(message, {**CAPABILITY, "size": size, "bpp": bpp})
    assert [g["codepoint"] for g in parsed] == [ord("龘")]  # A is in the charset: not pushed
    g = parsed[0]
    assert 0 < g["box_w"] <= size + 1 and 0 < g["box_h"] <= size + 1
    assert abs(g["adv_w"] - size * 16) <= 16  # a CJK glyph advances one em
    assert -size // 3 <= g["ofs_y"] <= 0  # its box sits on the baseline, a little below
    image = lvgl_unpack(g["data"], g["box_w"], g["box_h"], bpp)
    ink = sum(1 for row in image for v in row if v)
    assert ink > g["box_w"] * g["box_h"] // 5  # 龘 is dense: plenty of ink, not a blank box
    # The tight box: ink on every edge.
    assert any(image[0]) and any(image[-1]) and any(row[0] for row in image) and any(row[-1] for row in image)


@needs_font
def test_latin_metrics_follow_lvgl_conventions() -> None:
    renderer = GlyphRenderer(FONT)
    a, g, space = (renderer.glyph(ord(c), 20, 4) for c in "Ag ")
    assert a.ofs_y == 0 and a.box_h >= 13  # A stands on the baseline
    assert g.ofs_y < 0  # g's descender goes below it (ofs_y: the box bottom, y up)
    assert space.box_w == space.box_h == 0 and space.bitmap == b"" and space.adv_w > 0


@needs_font
def test_characters_the_font_lacks_are_not_pushed() -> None:
    pusher = GlyphPusher(font_path=FONT)
    assert pusher.for_text("😀🚀", TextFont("b", "basic", 20, 4)) is None  # no emoji in Noto CJK: not its .notdef box


@needs_font
def test_64_glyph_cap() -> None:
    pusher = GlyphPusher(font_path=FONT)
    text = "".join(chr(cp) for cp in range(0x4E00, 0x4E00 + 200))
    message = json.loads(protocol.sentence_start("s", text, pusher.for_text(text, TextFont("noto-v1", "basic", 20, 4))))
    parsed = device_parse(message)
    assert len(parsed) == 64
    assert [g["codepoint"] for g in parsed] == [cp for cp in glyphs.missing(text, "basic")][:64]


@needs_font
def test_64_kib_cap_and_64_pixel_boxes() -> None:
    pusher = GlyphPusher(font_path=FONT)
    text = "".join(chr(cp) for cp in range(0x4E00, 0x4E00 + 64))
    font = TextFont("noto-v1", "basic", 64, 4)  # ~60x60 4-bit boxes: 64 of them would be ~110 KiB
    message = {"type": "stt", "glyph_push": pusher.for_text(text, font)}
    parsed = device_parse(message, {**CAPABILITY, "size": 64, "bpp": 4})
    total = sum(len(g["data"]) for g in parsed)
    assert 0 < len(parsed) < 64 and total <= 64 * 1024
    assert all(g["box_w"] <= 64 and g["box_h"] <= 64 for g in parsed)


def test_payload_caps_without_a_font() -> None:
    big = Glyph(0x9F98, 1024, 64, 64, 0, 0, bytes(64 * 64 // 2))  # 2 KiB at 4 bpp
    font = TextFont("noto-v1", "basic", 64, 4)
    push = glyphs.payload(font, [big] * 40)
    assert len(push["glyphs"]) == 32 and sum(len(base64.b64decode(g["bitmap"])) for g in push["glyphs"]) == 64 * 1024
    device_parse({"glyph_push": push}, {**CAPABILITY, "size": 64})
    small = Glyph(0x9F98, 320, 2, 2, 0, 0, bytes(2))
    assert len(glyphs.payload(font, [small] * 100)["glyphs"]) == 64
    assert glyphs.payload(font, [Glyph(1, 16, 65, 1, 0, 0, bytes(33))]) is None
    assert glyphs.payload(font, []) is None


def test_device_parse_rejects_what_the_firmware_rejects() -> None:
    """The decoder here is as strict as the firmware's (else the round trips above prove little)."""
    good = {"v": 1, "bundle": "noto-v1", "size": 20, "bpp": 4, "glyphs": [Glyph(0x9F98, 320, 2, 2, 0, 0, b"\x12\x34").to_json()]}
    assert len(device_parse({"glyph_push": good})) == 1
    for bad in ({"bundle": "other"}, {"size": 16}, {"bpp": 1}, {"v": 2}, {"glyphs": [good["glyphs"][0]] * 65}):
        with pytest.raises(Rejected):
            device_parse({"glyph_push": {**good, **bad}})
    for bad_glyph in ({"box_w": 65}, {"codepoint": 0}, {"bitmap": base64.b64encode(b"\x12").decode()}, {"ofs_y": 40000}):
        with pytest.raises(Rejected):
            device_parse({"glyph_push": {**good, "glyphs": [{**good["glyphs"][0], **bad_glyph}]}})


@needs_font
def test_cache_is_bounded_lru() -> None:
    renderer = GlyphRenderer(FONT, cache_size=2)
    for char in "龘𠮷龘鱻":
        renderer.glyph(ord(char), 20, 4)
    assert renderer.cached(ord("龘"), 20, 4) and renderer.cached(ord("鱻"), 20, 4)
    assert not renderer.cached(ord("𠮷"), 20, 4)  # least recently used went first


def test_no_font_means_no_glyphs_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "gateway.glyphs"):
        pusher = GlyphPusher(font_path="/nonexistent/NotoSansCJK-Regular.ttc")
    assert pusher.renderer is None
    assert pusher.for_text("龘", TextFont("b", "basic", 20, 4)) is None
    assert [r.getMessage() for r in caplog.records].count("no CJK font for glyph_push: devices get no glyphs") == 1


async def test_downlink_attaches_glyphs_to_stt_and_sentence_start_only() -> None:
    import asyncio

    from gateway.downlink import PacedSender
    from gateway.turns import Text

    sent: list[dict] = []

    async def send(data) -> None:
        sent.append(json.loads(data))

    asked: list[str] = []

    async def source(text: str):
        asked.append(text)
        if text == "boom":
            raise RuntimeError("renderer broke")
        return {"v": 1, "bundle": "b", "size": 20, "bpp": 4, "glyphs": [{"codepoint": 40856}]}

    sender = PacedSender(send, "s", 1, 0.06, 5, 0.0)
    sender.start()
    try:
        sender.push([Text("stt", "龘"), Text("tts_start"), Text("sentence_start", "龘龘"), Text("sentence_start", "boom")])
        sender.glyphs = source
        for _ in range(100):
            if len(sent) == 4:
                break
            await asyncio.sleep(0.01)
    finally:
        await sender.close()
    assert [m.get("glyph_push", {}).get("v") for m in sent] == [1, None, 1, None]
    assert asked == ["龘", "龘龘", "boom"]  # never for tts start
    assert sent[3]["text"] == "boom"  # a failing source costs the glyphs, not the text
