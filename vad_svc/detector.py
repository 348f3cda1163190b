"""Voice activity detection and end-of-turn segmentation for one stream.

Two detectors in series: webrtcvad is a cheap gate (microseconds per window) that skips
obvious silence; Silero (ONNX) scores the windows that pass it. A hysteresis on the Silero
probability gives a speech/silence decision per 32 ms window, and :class:`Segmenter` turns those
decisions into utterances: speech of at least ``min_speech_ms`` followed by ``min_silence_ms``
of silence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import webrtcvad

WINDOW = 512  # Silero window at 16 kHz: 32 ms
CONTEXT = 64
RATE = 16000
WINDOW_MS = WINDOW * 1000 / RATE


def silero_model_path() -> str:
    """The Silero VAD v6 ONNX model that ships inside faster-whisper."""
    import faster_whisper

    return os.path.join(os.path.dirname(faster_whisper.__file__), "assets", "silero_vad_v6.onnx")


class SileroModel:
    """The ONNX model, shared by every stream of a worker (the state lives in the stream)."""

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(path or silero_model_path(), providers=["CPUExecutionProvider"], sess_options=opts)

    def run(self, window: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        out, h, c = self.session.run(None, {"input": window.reshape(1, -1), "h": h, "c": c})
        return float(np.asarray(out).reshape(-1)[0]), h, c


class SpeechScorer:
    """Speech probability per 32 ms window of one 16 kHz stream (webrtcvad gate + Silero)."""

    def __init__(self, model: SileroModel, aggressiveness: int = 2) -> None:
        self.model = model
        self.gate = webrtcvad.Vad(aggressiveness)
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.int16)

    def push(self, pcm: np.ndarray) -> list[float]:
        """Feed int16 samples; returns one probability per complete window."""
        data = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        probs: list[float] = []
        n = len(data) // WINDOW
        for i in range(n):
            window = data[i * WINDOW : (i + 1) * WINDOW]
            probs.append(self._score(window))
        self._pending = data[n * WINDOW :].copy()
        return probs

    def _score(self, window: np.ndarray) -> float:
        audio = window.astype(np.float32) / 32768.0
        gated = not self.gate.is_speech(window[:480].tobytes(), RATE)
        if gated:
            # Keep Silero's context continuous, but skip the model: this is clear silence.
            self._context = audio[-CONTEXT:]
            return 0.0
        prob, self._h, self._c = self.model.run(np.concatenate([self._context, audio]), self._h, self._c)
        self._context = audio[-CONTEXT:]
        return prob


@dataclass
class SegmenterConfig:
    threshold: float = 0.5
    neg_threshold: float = 0.35
    min_silence_ms: int = 700
    min_speech_ms: int = 250
    max_utterance_ms: int = 30000


@dataclass
class Segmenter:
    """Turns per-window probabilities into speech start / end-of-turn decisions."""

    config: SegmenterConfig = field(default_factory=SegmenterConfig)
    in_speech: bool = False
    speaking_now: bool = False
    speech_ms: float = 0.0
    silence_ms: float = 0.0
    total_ms: float = 0.0

    def reset(self) -> None:
        self.in_speech = False
        self.speaking_now = False
        self.speech_ms = self.silence_ms = self.total_ms = 0.0

    def push(self, prob: float) -> str | None:
        """One window's probability -> ``"start"``, ``"end"``, ``"discard"`` or None."""
        cfg = self.config
        if prob >= cfg.threshold:
            self.speaking_now = True
        elif prob < cfg.neg_threshold:
            self.speaking_now = False
        if not self.in_speech:
            if self.speaking_now:
                self.in_speech = True
                self.speech_ms = WINDOW_MS
                self.silence_ms = 0.0
                self.total_ms = WINDOW_MS
                return "start"
            return None
        self.total_ms += WINDOW_MS
        if self.speaking_now:
            self.speech_ms += WINDOW_MS
            self.silence_ms = 0.0
        else:
            self.silence_ms += WINDOW_MS
        if self.total_ms >= cfg.max_utterance_ms:
            self.in_speech = False
            return "end"
        if self.silence_ms >= cfg.min_silence_ms:
            self.in_speech = False
            return "end" if self.speech_ms >= cfg.min_speech_ms else "discard"
        return None
