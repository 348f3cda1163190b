"""Firmware images for OTA upgrades: a folder of ``<board>_<version>.bin`` files (protocol.md §1.6)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FILE = re.compile(r"^(?P<board>[A-Za-z0-9][A-Za-z0-9._-]*)_(?P<version>\d+(?:\.\d+)*)\.bin$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.bin$")


def parse_version(text: str) -> tuple[int, ...] | None:
    """Dotted numeric versions only: the firmware's parser throws on anything else."""
    if not text or not re.fullmatch(r"\d+(?:\.\d+)*", text):
        return None
    return tuple(int(part) for part in text.split("."))


@dataclass(frozen=True)
class Image:
    board: str
    version: str
    filename: str


def newest_of(names: list[str], board: str) -> Image | None:
    """The newest ``<board>_<version>.bin`` among ``names`` (numeric comparison: 1.10 > 1.9)."""
    if not board:
        return None
    best: tuple[tuple[int, ...], Image] | None = None
    for name in names:
        match = _FILE.match(name)
        if not match or match["board"] != board:
            continue
        version = parse_version(match["version"])
        if version is None:
            continue
        if best is None or version > best[0]:
            best = (version, Image(board, match["version"], name))
    return best[1] if best else None


def newest_image(folder: str | Path, board: str) -> Image | None:
    """The newest image for ``board`` in ``folder``."""
    path = Path(folder)
    if not board or not path.is_dir():
        return None
    return newest_of([entry.name for entry in path.iterdir() if entry.is_file()], board)


def newer(a: Image | None, b: Image | None) -> Image | None:
    """The newer of two images (either may be missing)."""
    if a is None or b is None:
        return a or b
    return a if (parse_version(a.version) or ()) >= (parse_version(b.version) or ()) else b


# From 2.4.0 (main/application.cc, auto mode) the firmware plays its queue out after `tts stop`
# and reopens the microphone itself once it is drained; before, `tts stop` cut what was queued.
DRAINS_FROM = (2, 4, 0)
_LEADING_VERSION = re.compile(r"\s*(\d+)\.(\d+)(?:\.(\d+))?")


def drains_playback(version: str | None) -> bool:
    """Whether firmware ``version`` (``2.4.2``, ``2.4.0-rc1``) plays its queue out after `tts
    stop`; False when unknown (the safe answer)."""
    found = _LEADING_VERSION.match(version or "")
    if not found:
        return False
    return tuple(int(part or 0) for part in found.groups()) >= DRAINS_FROM


def safe_path(folder: str | Path, filename: str) -> Path | None:
    """The file inside ``folder``, or None for anything that could escape it."""
    if not SAFE_NAME.match(filename) or ".." in filename:
        return None
    root = Path(folder).resolve()
    candidate = (root / filename).resolve()
    if candidate.parent != root or not candidate.is_file():
        return None
    return candidate
