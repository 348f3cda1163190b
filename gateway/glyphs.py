"""glyph_push (firmware 2.4, protocol.md §5.9): bitmaps for characters the device's font lacks.

A device whose hello has ``features.glyph_push`` and a ``text_font`` (bundle, charset, size, bpp)
draws text with the font it has, then with a fallback font it builds from glyphs the server sends
with the text: ``glyph_push`` on ``stt`` and ``tts sentence_start`` (firmware docs/glyph-push.md,
main/protocols/text_glyph_payload.cc). Without them a rare character (龘) shows as nothing.

The firmware's own server tool extracts glyphs from the Noto "full" CBIN bundle, which is not
distributed; here they are rasterised with FreeType from Noto Sans CJK (the family the bundle is
built from) at the device's pixel size and bpp, in LVGL's plain bitmap layout. Close to the
bundle's, not byte-identical (hinting and the OLED line-box fitting differ).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from gateway import metrics as m
from gateway.glyph_charsets import BASIC_LOCALE_CHARS, COMMON_CHARS

log = logging.getLogger("gateway.glyphs")

VERSION = 1
# TextGlyphPayload::Parse rejects the whole payload beyond these.
MAX_GLYPHS = 64
MAX_BOX = 64
MAX_BITMAP_BYTES = 64 * 1024
# DynamicGlyphCache::EnsureFont builds a fallback font only for 1 and 4 bpp; the packing below
# also does LVGL's 2 and 8, but a device would drop those.
DEVICE_BPP = (1, 4)
CHARSETS = ("basic", "common")

# Debian/Ubuntu fonts-noto-cjk first (`make tools` installs it), then Fedora, Arch, Alpine.
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)


@dataclass(frozen=True)
class TextFont:
    """The device's installed text font, from its hello."""

    bundle: str
    charset: str
    size: int
    bpp: int


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return int(value) if value == int(value) else None
    except (OverflowError, ValueError):  # Infinity, NaN: valid to json.loads
        return None


def text_font(features: dict[str, Any], raw: Any) -> TextFont | None:
    """The hello's ``text_font`` when the device takes glyph pushes we can serve, else None.

    Mirrors what the firmware itself would advertise (assets.cc): a bundle of 1..64 chars, the
    ``basic`` or ``common`` charset, a positive size, bpp 1 or 4."""
    flag = features.get("glyph_push")
    # The firmware sends true (cJSON_AddBoolToObject); the fonts component's README writes 1.
    if not (flag is True or (type(flag) is int and flag == 1)) or not isinstance(raw, dict):
        return None
    bundle, charset = raw.get("bundle"), raw.get("charset")
    size, bpp = _whole(raw.get("size")), _whole(raw.get("bpp"))
    if not isinstance(bundle, str) or not 0 < len(bundle) <= 64 or charset not in CHARSETS:
        return None
    if size is None or not 0 < size <= MAX_BOX or bpp not in DEVICE_BPP:
        return None
    return TextFont(bundle=bundle, charset=charset, size=size, bpp=bpp)


# --------------------------------------------------------------------------- charsets

_LATIN = {cp for cp in range(0x20, 0x7F)} | {cp for cp in range(0xA1, 0x100)}
_BASIC = frozenset(_LATIN | {ord(c) for c in "".join(BASIC_LOCALE_CHARS)})


# ``common`` is basic plus every character of the DeepSeek-V4-Flash tokenizer's vocabulary
# (78/xiaozhi-fonts scripts/build.py ``build_charsets``); its list is built at font build time
# and is in neither repository. COMMON_CHARS stands in for it: the DeepSeek-V3 vocabulary's
# characters that are also GB2312 level 1, CJK punctuation or full-width forms (see
# scripts/gen_glyph_charsets.py). That leaves out frequent-looking hanzi the vocabulary lacks
# (佰, 叁, 沏): a device shows those blank unless pushed. A character pushed needlessly costs
# only bytes (the installed font is searched first), so the list stays on the smaller side.
_COMMON = frozenset(_BASIC | {ord(c) for c in "".join(COMMON_CHARS)})

_CHARSET_SETS = {"basic": _BASIC, "common": _COMMON}


def in_charset(charset: str, codepoint: int) -> bool:
    return codepoint in _CHARSET_SETS.get(charset, _BASIC)


def missing(text: str, charset: str) -> list[int]:
    """Code points of ``text`` the charset lacks, in order, once each, without controls."""
    seen: set[int] = set()
    out = []
    for char in text:
        cp = ord(char)
        if cp in seen or cp < 0x20 or unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or in_charset(charset, cp):
            continue
        seen.add(cp)
        out.append(cp)
    return out


# --------------------------------------------------------------------------- bitmaps


def pack(alpha: bytes, width: int, height: int, bpp: int) -> bytes:
    """8-bit coverage (row-major) to LVGL's plain bitmap: ``bpp`` bits a pixel, the first pixel
    in the high bits, no row padding (stride 0), ceil(w*h*bpp/8) bytes."""
    if bpp not in (1, 2, 4, 8):
        raise ValueError(f"bpp {bpp}")
    if len(alpha) != width * height:
        raise ValueError("alpha size")
    if bpp == 8:
        return bytes(alpha)
    out = bytearray((width * height * bpp + 7) // 8)
    bit = 0
    for value in alpha:
        level = _level(value, bpp)
        if level:
            out[bit >> 3] |= level << (8 - bpp - (bit & 7))
        bit += bpp
    return bytes(out)


def _level(value: int, bpp: int) -> int:
    top = (1 << bpp) - 1
    return int(value >= 128) if bpp == 1 else (value * top + 127) // 255


_FAINT: dict[int, bytes] = {}


def _faint(bpp: int) -> bytes:
    """A bytes.translate table: coverage that quantises to level 0 becomes 0."""
    if bpp not in _FAINT:
        _FAINT[bpp] = bytes(v if _level(v, bpp) else 0 for v in range(256))
    return _FAINT[bpp]


@dataclass(frozen=True)
class Glyph:
    codepoint: int
    adv_w: int  # 1/16 px
    box_w: int
    box_h: int
    ofs_x: int
    ofs_y: int  # bottom of the box above the baseline (LVGL: y up)
    bitmap: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "codepoint": self.codepoint, "adv_w": self.adv_w, "box_w": self.box_w, "box_h": self.box_h,
            "ofs_x": self.ofs_x, "ofs_y": self.ofs_y, "bitmap": base64.b64encode(self.bitmap).decode("ascii"),
        }


def payload(font: TextFont, glyphs: list[Glyph]) -> dict[str, Any] | None:
    """The ``glyph_push`` object: header equal to the device's text_font, at most 64 glyphs and
    64 KiB of bitmaps (those that do not fit wait for a later message); None when empty."""
    items = []
    total = 0
    for glyph in glyphs:
        if len(items) == MAX_GLYPHS:
            break
        if glyph.box_w > MAX_BOX or glyph.box_h > MAX_BOX or total + len(glyph.bitmap) > MAX_BITMAP_BYTES:
            continue
        total += len(glyph.bitmap)
        items.append(glyph.to_json())
    if not items:
        return None
    return {"v": VERSION, "bundle": font.bundle, "size": font.size, "bpp": font.bpp, "glyphs": items}


def find_font(path: str = "") -> str | None:
    """The configured font file, else the first Noto CJK found where distributions put it."""
    if path:
        return path if Path(path).is_file() else None
    return next((p for p in FONT_CANDIDATES if Path(p).is_file()), None)


class GlyphRenderer:
    """Rasterises glyphs from one CJK font file with Pillow's FreeType; a bounded LRU keeps
    them, since the same rare characters come back turn after turn."""

    def __init__(self, path: str, index: int = -1, cache_size: int = 4096) -> None:
        from PIL import ImageFont  # noqa: F401 - fail here, at start, when Pillow is missing

        self.path = path
        self.index = index if index >= 0 else self._simplified_face(path)
        self.cache_size = cache_size
        self._fonts: dict[int, Any] = {}
        self._notdef: dict[int, tuple] = {}
        self._cache: OrderedDict[tuple[int, int, int], Glyph | None] = OrderedDict()
        self._lock = threading.Lock()  # one FreeType face is not safe across threads

    @staticmethod
    def _simplified_face(path: str) -> int:
        """In a Noto CJK collection, the SC face (simplified Chinese forms); else the first."""
        from PIL import ImageFont

        for index in range(16):
            try:
                family = ImageFont.truetype(path, 12, index=index).getname()[0] or ""
            except OSError:
                break
            if family.endswith(" SC") and "Mono" not in family:
                return index
        return 0

    def _font(self, size: int):
        font = self._fonts.get(size)
        if font is None:
            from PIL import ImageFont

            font = self._fonts[size] = ImageFont.truetype(self.path, size, index=self.index)
        return font

    def _raster(self, char: str, size: int) -> tuple:
        """(ink bbox in the mask, mask offset from the baseline origin, mask bytes, advance px)."""
        from PIL import Image, ImageDraw

        font = self._font(size)
        mask, (ox, oy) = font.getmask2(char, mode="L", anchor="ls")
        width, height = mask.size
        data = b""
        if width and height:
            image = Image.new("L", (width, height))
            ImageDraw.Draw(image).text((-ox, -oy), char, font=font, fill=255, anchor="ls")
            data = image.tobytes()
        return mask.getbbox(), (ox, oy), (width, height), data, font.getlength(char)

    def cached(self, codepoint: int, size: int, bpp: int) -> bool:
        return (codepoint, size, bpp) in self._cache

    def glyph(self, codepoint: int, size: int, bpp: int) -> Glyph | None:
        """The glyph, or None when the font has none (FreeType's .notdef box) or it is too big."""
        key = (codepoint, size, bpp)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                m.GLYPHS.labels("cache").inc()
                return self._cache[key]
            glyph = self._render(codepoint, size, bpp)
            self._cache[key] = glyph
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            m.GLYPHS.labels("rendered" if glyph else "missing").inc()
            return glyph

    def _render(self, codepoint: int, size: int, bpp: int) -> Glyph | None:
        if size not in self._notdef:
            self._notdef[size] = self._raster("\U0010fffd", size)  # private use: .notdef in any CJK font
        raster = self._raster(chr(codepoint), size)
        if raster == self._notdef[size]:
            return None
        _ink, (ox, oy), (width, height), data, advance = raster
        # The box is tight around what survives quantisation (a faint 1-bpp edge is no ink).
        ink = None
        if data:
            from PIL import Image

            data = data.translate(_faint(bpp))
            ink = Image.frombytes("L", (width, height), data).getbbox()
        if ink is None:  # a space: advance only
            return Glyph(codepoint, round(advance * 16), 0, 0, 0, 0, b"")
        x0, y0, x1, y1 = ink
        box_w, box_h = x1 - x0, y1 - y0
        if box_w > MAX_BOX or box_h > MAX_BOX:
            return None
        alpha = bytes(data[y * width + x] for y in range(y0, y1) for x in range(x0, x1))
        return Glyph(
            codepoint=codepoint,
            adv_w=max(0, round(advance * 16)),
            box_w=box_w,
            box_h=box_h,
            ofs_x=ox + x0,
            ofs_y=-(oy + y1),
            bitmap=pack(alpha, box_w, box_h, bpp),
        )


class GlyphPusher:
    """Process-wide: one renderer (and cache) for every connection; per connection only the
    text_font tuple differs."""

    def __init__(self, enabled: bool = True, font_path: str = "", font_index: int = -1, cache_size: int = 4096) -> None:
        self.renderer: GlyphRenderer | None = None
        if not enabled:
            return
        path = find_font(font_path)
        if path is None:
            log.warning("no CJK font for glyph_push: devices get no glyphs", extra={"fields": {"font_path": font_path or None, "searched": list(FONT_CANDIDATES) if not font_path else None, "install": "apt-get install fonts-noto-cjk"}})
            return
        try:
            self.renderer = GlyphRenderer(path, font_index, cache_size)
        except Exception as exc:  # noqa: BLE001 - a broken font or no Pillow: no glyphs, no crash
            log.warning("glyph_push font unusable: devices get no glyphs", extra={"fields": {"font_path": path, "error": str(exc)}})
            return
        log.info("glyph_push font", extra={"fields": {"font_path": path, "index": self.renderer.index}})

    def needs_render(self, text: str, font: TextFont) -> bool:
        """Whether building the payload would rasterise (worth a thread) rather than hit the cache."""
        r = self.renderer
        return r is not None and any(not r.cached(cp, font.size, font.bpp) for cp in missing(text, font.charset)[: MAX_GLYPHS * 2])

    def for_text(self, text: str, font: TextFont) -> dict[str, Any] | None:
        """The ``glyph_push`` object for ``text`` on this device, or None (nothing missing, no font)."""
        if self.renderer is None or not text:
            return None
        glyphs = []
        # Characters the font lacks as well are skipped; look a little past 64 for them.
        for cp in missing(text, font.charset)[: MAX_GLYPHS * 2]:
            try:
                glyph = self.renderer.glyph(cp, font.size, font.bpp)
            except Exception as exc:  # noqa: BLE001
                log.warning("glyph render failed", extra={"fields": {"codepoint": cp, "error": str(exc)}})
                glyph = None
            if glyph is not None:
                glyphs.append(glyph)
            if len(glyphs) == MAX_GLYPHS:
                break
        result = payload(font, glyphs)
        if result is not None:
            m.GLYPH_PUSHES.inc()
        return result


_pusher: GlyphPusher | None = None
_pusher_lock = threading.Lock()


def pusher(settings: Any) -> GlyphPusher:
    """The process's pusher, made at the first glyph_push hello (so the font is looked for, and
    a missing one logged, once)."""
    global _pusher
    with _pusher_lock:
        if _pusher is None:
            _pusher = GlyphPusher(True, settings.glyph_font_path, settings.glyph_font_index, settings.glyph_cache_size)
        return _pusher


def for_hello(settings: Any, hello: Any) -> Callable[[str], Awaitable[dict[str, Any] | None]] | None:
    """The downlink's glyph source for this device, or None (no glyph_push, no usable text_font,
    switched off, or no font here)."""
    font = text_font(hello.features, hello.text_font)
    if font is None or not getattr(settings, "glyph_push", True):
        return None
    source = pusher(settings)
    if source.renderer is None:
        return None
    log.info("glyph_push", extra={"fields": {"bundle": font.bundle, "charset": font.charset, "size": font.size, "bpp": font.bpp}})

    async def glyphs_for(text: str) -> dict[str, Any] | None:
        # Rasterising 64 new glyphs takes ~20 ms: off the event loop; cache hits stay on it.
        if source.needs_render(text, font):
            return await asyncio.to_thread(source.for_text, text, font)
        return source.for_text(text, font)

    return glyphs_for
