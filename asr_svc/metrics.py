"""The ASR stage's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.metrics import histogram

SECONDS = histogram("xz_asr_seconds", "Time to transcribe one utterance")
RTF = histogram("xz_asr_real_time_factor", "Transcription time divided by audio duration")
UTTERANCES = Counter("xz_asr_utterances_total", "Utterances transcribed, by outcome", ["outcome"])
IN_FLIGHT = Gauge("xz_asr_in_flight", "Utterances being transcribed now")
ENGINE_CALLS = Counter("xz_asr_engine_calls_total", "Transcriptions asked of each ASR engine, by outcome (ok, or the failure: auth, quota, bad_audio, timeout, unavailable, protocol, server, error)", ["engine", "outcome"])
ENGINE_SECONDS = histogram("xz_asr_engine_seconds", "Time an ASR engine took for one utterance that it transcribed", ("engine",))
FALLBACKS = Counter("xz_asr_fallbacks_total", "Utterances the fallback engine was asked for because the chosen engine failed, by chosen engine and reason", ["engine", "reason"])
CORRECTIONS = Counter("xz_asr_corrections_total", "Transcripts changed by an agent's correction list")
BATCH_SIZE = histogram("xz_asr_batch_size", "Utterances transcribed together in one pass of a Whisper model on a GPU", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
