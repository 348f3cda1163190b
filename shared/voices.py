"""TTS voices by name (``tts.voices``), resolved only inside ``tts.voices_dir``.

An agent's voice comes from the manager, a role's from ``tools.roles``: either may be anything,
so the TTS worker opens a voice only when it is a configured name and its files are plain files
directly in the voices folder. Everything else is the caller's to count and answer with the
default voice.
"""

from __future__ import annotations

import os
import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def valid_voice_name(name: str) -> bool:
    """A bare file name stem: no separator, no ``..``, no leading dot."""
    return bool(_NAME.fullmatch(name)) and ".." not in name


class VoiceRefused(ValueError):
    """The voice is not one this worker may open; ``reason`` is a short label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def resolve_voice(name: str, voices: list[str], voices_dir: str) -> str:
    """The path of the configured voice ``name`` (its ``.onnx``), else VoiceRefused.

    Refused: names not in ``voices`` (paths, ``..``, other spellings), files that are symlinks or
    not plain files, and anything whose real path is not directly inside the voices folder."""
    if name not in voices or not valid_voice_name(name):
        raise VoiceRefused("unknown_voice", f"voice {name[:120]!r} is not one of tts.voices")
    folder = os.path.realpath(voices_dir)
    model = os.path.join(folder, name + ".onnx")
    for path in (model, model + ".json"):
        if os.path.islink(path):
            raise VoiceRefused("voice_symlink", f"voice file {path} is a symlink")
        if not os.path.isfile(path):
            raise VoiceRefused("voice_missing", f"voice file {path} not found")
        if os.path.dirname(os.path.realpath(path)) != folder:
            raise VoiceRefused("voice_outside", f"voice file {path} is outside {folder}")
    return model
