"""Tool names as LLM APIs accept them, and the words a tool name offers to the tool gate."""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Name parts that say nothing about what a tool is for.
_NAME_STOPWORDS = {"self", "get", "set", "the", "a", "of", "to", "do", "is", "on", "off", "tool"}


def sanitise_name(name: str, limit: int = 64) -> str:
    """A function name LLM APIs accept (``[A-Za-z0-9_-]``, at most ``limit`` characters):
    self.audio_speaker.set_volume -> self_audio_speaker_set_volume."""
    clean = _UNSAFE.sub("_", name).strip("_") or "tool"
    return clean[:limit]


def unique_name(name: str, taken: set[str] | dict[str, Any], limit: int = 64) -> str:
    """``name``, or ``name_2``, ``name_3``... (kept within ``limit``) when it is taken."""
    if name not in taken:
        return name
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = name[: limit - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def name_keywords(name: str) -> list[str]:
    """Keywords taken from a tool's name: self.audio_speaker.set_volume -> audio, speaker,
    volume; camelCase is split too (setVolume -> volume)."""
    parts = re.split(r"[._\-\s]+", _CAMEL.sub("_", name).lower())
    out: list[str] = []
    for part in parts:
        if part and part not in _NAME_STOPWORDS and not part.isdigit() and part not in out:
            out.append(part)
    return out
