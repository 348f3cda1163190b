"""Audio helpers: Opus encode/decode, resampling, framing PCM into fixed-size frames."""

from __future__ import annotations

import logging

import numpy as np
import opuslib_next as opus
import soxr

log = logging.getLogger("shared.audio")

# The largest Opus packet duration is 120 ms; at 48 kHz that is 5760 samples.
MAX_FRAME_MS = 120


class OpusDecoder:
    """Decodes mono Opus packets of 2.5-120 ms to int16 PCM at ``sample_rate``."""

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = sample_rate
        self._decoder = opus.Decoder(sample_rate, 1)
        self._max_samples = sample_rate * MAX_FRAME_MS // 1000

    def decode(self, packet: bytes) -> np.ndarray:
        """One packet -> int16 samples. Raises ``opus.OpusError`` on a corrupt packet."""
        pcm = self._decoder.decode(packet, self._max_samples)
        return np.frombuffer(pcm, dtype=np.int16)

    def reset(self) -> None:
        self._decoder.reset_state()


class OpusEncoder:
    """Encodes int16 mono PCM frames of exactly ``frame_ms`` to Opus."""

    def __init__(self, sample_rate: int = 24000, frame_ms: int = 60, application: str = "voip", complexity: int | None = None, dtx: bool = False) -> None:
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.frame_samples = sample_rate * frame_ms // 1000
        self._encoder = opus.Encoder(sample_rate, 1, application)
        if complexity is not None:
            self._encoder.complexity = complexity
        if dtx:
            # Discontinuous transmission, as the firmware's encoder: silence -> 1-3 byte packets.
            self._encoder.dtx = 1

    def encode(self, frame: np.ndarray) -> bytes:
        if len(frame) != self.frame_samples:
            raise ValueError(f"frame has {len(frame)} samples, want {self.frame_samples}")
        return self._encoder.encode(frame.astype(np.int16).tobytes(), self.frame_samples)


class FrameCutter:
    """Cuts a stream of int16 PCM chunks into fixed-size frames, zero-padding the last one."""

    def __init__(self, frame_samples: int) -> None:
        self.frame_samples = frame_samples
        self._rest = np.zeros(0, dtype=np.int16)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._rest, pcm.astype(np.int16)]) if len(self._rest) else pcm.astype(np.int16)
        n = len(data) // self.frame_samples
        frames = [data[i * self.frame_samples : (i + 1) * self.frame_samples] for i in range(n)]
        self._rest = data[n * self.frame_samples :]
        return frames

    def flush(self) -> list[np.ndarray]:
        if len(self._rest) == 0:
            return []
        frame = np.zeros(self.frame_samples, dtype=np.int16)
        frame[: len(self._rest)] = self._rest
        self._rest = np.zeros(0, dtype=np.int16)
        return [frame]


class Resampler:
    """Streaming int16 resampler (soxr), for TTS output at the device rate."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")

    def push(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return pcm.astype(np.int16)
        return self._stream.resample_chunk(pcm.astype(np.int16), last=last)


def resample(pcm: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole int16 buffer."""
    if in_rate == out_rate:
        return pcm.astype(np.int16)
    return soxr.resample(pcm.astype(np.int16), in_rate, out_rate, quality="HQ").astype(np.int16)


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def encode_pcm(pcm: np.ndarray, sample_rate: int, frame_ms: int = 60) -> list[bytes]:
    """Encode a whole int16 buffer as fixed-duration Opus packets (the last one padded)."""
    encoder = OpusEncoder(sample_rate, frame_ms)
    cutter = FrameCutter(encoder.frame_samples)
    frames = cutter.push(pcm) + cutter.flush()
    return [encoder.encode(f) for f in frames]


def decode_packets(packets: list[bytes], sample_rate: int) -> np.ndarray:
    """Decode a list of Opus packets to one int16 buffer; corrupt packets are skipped."""
    decoder = OpusDecoder(sample_rate)
    out = []
    for packet in packets:
        try:
            out.append(decoder.decode(packet))
        except opus.OpusError as exc:
            log.debug("skipping corrupt opus packet: %s", exc)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)
