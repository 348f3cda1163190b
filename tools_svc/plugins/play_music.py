"""``play_music``: play a song from the music folder on the device, after a short spoken intro.

The tool puts its audio into the turn itself: the intro goes to TTS as sentence ``seq`` and the
song, decoded and cut into paced-ready 60 ms Opus frames, is published as sentence ``seq + 1``
straight to the gateway, which plays it in order and paces it like speech.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from shared.audio import FrameCutter, OpusEncoder
from shared.phrases import tool_phrase
from shared.messages import AudioFrameMeta, OutEvent, SentenceJob, ToolCall, ToolResult, ToolSpec
from shared.workqueue import StageBusy, StageUnavailable, publish_work

log = logging.getLogger("tools_svc.play_music")

SPEC = ToolSpec(
    name="play_music",
    description="Play a song or music for the user.",
    parameters={"type": "object", "properties": {"song": {"type": "string", "description": "Song name, optional"}}, "required": []},
    keywords=["music", "song", "songs", "play", "sing", "音乐", "歌", "播放"],
)
EXTENSIONS = {".mp3", ".wav", ".ogg", ".flac", ".m4a", ".opus"}
MAX_SECONDS = 600


def library(folder: str | Path) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())


def pick(songs: list[Path], wanted: str) -> Path | None:
    """The song whose name shares most words with ``wanted``; a random one when nothing is asked."""
    if not songs:
        return None
    words = set(re.findall(r"\w+", wanted.lower()))
    if words:
        scored = [(len(words & set(re.findall(r"\w+", s.stem.lower()))), s) for s in songs]
        best = max(scored, key=lambda x: x[0])
        if best[0] > 0:
            return best[1]
    return random.choice(songs)


def title(path: Path) -> str:
    return re.sub(r"[_\-]+", " ", path.stem).strip()


def decode(path: Path, sample_rate: int) -> np.ndarray:
    """Any audio file (PyAV/FFmpeg) to mono int16 at ``sample_rate``, at most MAX_SECONDS."""
    import av

    out: list[np.ndarray] = []
    total = 0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        for frame in container.decode(stream):
            for chunk in resampler.resample(frame):
                pcm = chunk.to_ndarray().reshape(-1).astype(np.int16)
                out.append(pcm)
                total += len(pcm)
            if total >= MAX_SECONDS * sample_rate:
                break
    return np.concatenate(out)[: MAX_SECONDS * sample_rate] if out else np.zeros(0, dtype=np.int16)


def encode(pcm: np.ndarray, sample_rate: int, frame_ms: int) -> list[bytes]:
    encoder = OpusEncoder(sample_rate, frame_ms, application="audio")
    cutter = FrameCutter(encoder.frame_samples)
    return [encoder.encode(f) for f in cutter.push(pcm) + cutter.flush()]


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    songs = library(context["settings"].music_dir)
    song = pick(songs, str(request.arguments.get("song") or ""))
    if song is None:
        return ToolResult(name=SPEC.name, action="response", text=tool_phrase("no_music", request.language))
    nc, subjects = context["nc"], context["subjects"]
    name = title(song)
    intro = SentenceJob(session_id=request.session_id, turn_id=request.turn_id, seq=request.seq, text=tool_phrase("now_playing", request.language, name=name), voice=request.voice, engine=request.engine, language=request.language, sample_rate=request.sample_rate, frame_duration=request.frame_duration)
    try:
        await publish_work(nc, subjects.tts(request.session_id), intro.encode(), context["work"].publish_timeout_s)
    except (StageBusy, StageUnavailable) as exc:
        return ToolResult(name=SPEC.name, action="error", text=f"speech is unavailable: {exc}")

    async def stream() -> None:
        out = subjects.out(request.session_id)
        seq = request.seq + 1
        frames: list[bytes] = []
        try:
            pcm = await asyncio.to_thread(decode, song, request.sample_rate)
            frames = await asyncio.to_thread(encode, pcm, request.sample_rate, request.frame_duration)
        except Exception as exc:  # noqa: BLE001 - a broken file: the turn still ends
            log.warning("cannot play %s: %s", song.name, exc)
        await nc.publish(out, OutEvent(kind="sentence_start", session_id=request.session_id, turn_id=request.turn_id, seq=seq, text=f"♪ {name}").encode())
        for index, frame in enumerate(frames):
            await nc.publish(out, frame, headers=AudioFrameMeta(turn_id=request.turn_id, seq=seq, index=index).headers())
        await nc.publish(out, OutEvent(kind="sentence_end", session_id=request.session_id, turn_id=request.turn_id, seq=seq, frames=len(frames)).encode())
        log.info("music streamed", extra={"fields": {"song": song.name, "frames": len(frames)}})

    task = asyncio.create_task(stream())
    context.setdefault("tasks", set()).add(task)
    task.add_done_callback(context["tasks"].discard)
    return ToolResult(name=SPEC.name, action="none", text=f"Playing {name}.", seqs_used=2)
