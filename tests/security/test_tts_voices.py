"""Attack: an agent's ``voice`` as a server path (issue 14, vulnerability 9).

The manager lets an owner type any voice into an agent; the TTS worker opened it as a Piper
model, so ``/etc/passwd``, ``../`` paths and any file on the server were opened, and each
spelling of one voice file loaded another ~165 MB engine, kept for ever in the shared worker.
Now voices are names from ``tts.voices``, files only directly inside ``tts.voices_dir`` (no
symlinks), anything else falls back to the default voice (counted), and at most
``tts.max_loaded_voices`` chosen voices stay loaded. A real TTS worker process over NATS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from shared.messages import AudioFrameMeta, OutEvent, SentenceJob, new_turn_id
from shared.subjects import Subjects
from tests.conftest import log_records
from tts_svc.engine import default_voice_path
from xiaozhi.procstat import rss_mb
from xiaozhi.stack import free_port

S = Subjects()

def place_voice(folder: Path, name: str) -> Path:
    """A real Piper voice (a copy of the packaged one) as <folder>/<name>.onnx(.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(default_voice_path())
    for suffix in (".onnx", ".onnx.json"):
        dst = folder / f"{name}{suffix}"
        try:
            os.link(str(src) + suffix[5:] if suffix != ".onnx" else src, dst)
        except OSError:
            shutil.copyfile(str(src) + suffix[5:] if suffix != ".onnx" else src, dst)
    return folder / f"{name}.onnx"


async def speak(nc, voice: str | None, text: str = "Hello there.") -> int:
    """One sentence through the worker with ``voice``; the number of Opus frames it spoke."""
    session, turn_id = f"s-voice-{new_turn_id()}", new_turn_id()
    sub = await nc.subscribe(S.out(session))
    await nc.publish(S.tts(session), SentenceJob(session_id=session, turn_id=turn_id, seq=0, text=text, voice=voice).encode())
    frames = 0
    while True:
        msg = await sub.next_msg(timeout=60)
        if AudioFrameMeta.from_headers(msg.headers):
            frames += 1
            continue
        event = OutEvent.decode(msg.data)
        if event.kind == "sentence_end":
            await sub.unsubscribe()
            return frames


def metric(port: int, kind: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        text = response.read().decode()
    found = re.search(rf'xz_errors_total\{{kind="{kind}",service="tts"\}} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


async def test_agent_voices_are_names_inside_the_voices_folder_and_the_cache_is_bounded(nats_only, nc, tmp_path):
    voices = tmp_path / "voices"
    outside = tmp_path / "outside"
    for name in ("alt", "alt2", "alt3"):
        place_voice(voices, name)
    evil = place_voice(outside, "evil")  # a loadable model outside the folder
    (voices / "linked.onnx").symlink_to(evil)
    (voices / "linked.onnx.json").symlink_to(str(evil) + ".json")
    port = free_port()
    env = {
        "XZ_TTS__VOICES": json.dumps(["alt", "alt2", "alt3", "linked"]),
        "XZ_TTS__VOICES_DIR": str(voices),
        "XZ_TTS__MAX_LOADED_VOICES": "2",
        # The worker's working directory is the repository: "../" climbs out of it.
    }
    proc = nats_only.start_service("tts", port, env)
    nats_only.wait_healthy([proc], timeout=120)
    pid = proc.popen.pid
    assert await speak(nc, None) > 5
    base = rss_mb(pid)

    # Paths, climbing out, a configured name that is a symlink to a file outside: all spoken
    # with the default voice, none opened.
    packaged = default_voice_path()
    relative_evil = os.path.relpath(evil, os.getcwd())[: -len(".onnx")]
    attacks = ["/etc/passwd", "../../../../etc/passwd", str(evil), relative_evil, "../outside/evil", "linked", str(voices / "alt.onnx"), "alt/../alt"]
    # Spellings of the packaged voice file: each was another engine kept for ever.
    spellings = [packaged, packaged.replace("/", "//"), packaged.replace("/data/", "/data/./"), packaged.replace("/data/", "/data/../data/"), "/." + packaged, packaged.replace("/", "/./", 2)]
    for voice in attacks + spellings:
        assert await speak(nc, voice) > 5, f"no speech with voice {voice!r}"
    grown = rss_mb(pid) - base
    assert grown < 60, f"the worker grew {grown:.0f} MB on {len(spellings)} spellings of one voice"
    log = (nats_only.log_dir / "tts.log").read_text()
    loaded = [r["voice"] for r in log_records(log, "piper voice loaded")]
    assert "evil" not in loaded and "linked" not in loaded and "passwd" not in loaded, loaded
    assert loaded == [Path(packaged).stem], loaded  # only the default voice was ever loaded
    assert metric(port, "unknown_voice") >= len(attacks) - 1 + len(spellings)
    assert metric(port, "voice_symlink") >= 1
    # One log line per refused voice, not per sentence.
    assert await speak(nc, "/etc/passwd") > 5
    refused = [line for line in (nats_only.log_dir / "tts.log").read_text().splitlines() if "voice refused" in line]
    assert len(refused) == len(set(attacks + spellings)), len(refused)

    # Configured names load; at most two stay loaded however many are cycled through, and
    # loading one after another does not add up (each load was ~+110 MB, kept for ever).
    assert await speak(nc, "alt") > 5
    one_voice = rss_mb(pid) - base
    for voice in ["alt2", "alt3"]:
        assert await speak(nc, voice) > 5
    first = rss_mb(pid)
    for voice in ["alt", "alt2", "alt3"] * 3:
        assert await speak(nc, voice) > 5
    later = rss_mb(pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as response:
        assert len(json.loads(response.read())["loaded_voices"]) == 2
    # (Freed models leave some heap behind, ~30-50 MB in all, but it does not add up per load.)
    one_voice = max(one_voice, 60)
    assert later - first < one_voice, f"9 more voice loads: +{later - first:.0f} MB (one voice: +{one_voice:.0f} MB)"
    assert later - base < 3.5 * one_voice, f"3 voices cycled: +{later - base:.0f} MB (one voice: +{one_voice:.0f} MB)"
    print(f"RSS base {base:.0f} MB, {len(spellings)} spellings +{grown:.0f}, one voice +{one_voice:.0f}, three loads +{first - base:.0f}, twelve +{later - base:.0f}")
    assert proc.alive()


def test_the_manager_offers_and_accepts_only_the_configured_voices(nats_only, tmp_path):
    """GET /api/options lists tts.voices; an agent naming anything else (a path, ``..``) is
    refused with 400 and never reaches the TTS worker."""
    from tests.manager.conftest import ADMIN_PASSWORD, Api, start_manager

    base, _proc = start_manager(nats_only, f"sqlite:///{tmp_path / 'manager.db'}", XZ_TTS__VOICES=json.dumps(["alt", "en_GB-alba-medium"]))
    admin = Api(base).login("admin", ADMIN_PASSWORD)
    for bad in ("/etc/passwd", "../voices/alt", "alt.onnx", "/srv/voices/alt.onnx", "ALT"):
        status, problem = admin.call("POST", "/api/agents", {"name": "x", "voice": bad})
        assert status == 400 and "unknown voice" in problem["detail"], (bad, status, problem)
    status, options = admin.call("GET", "/api/options")
    assert status == 200 and options["voices"] == ["alt", "en_GB-alba-medium"], options
    status, agent = admin.call("POST", "/api/agents", {"name": "x", "voice": "alt"})
    assert status == 201 and agent["voice"] == "alt"
    assert admin.call("PUT", f"/api/agents/{agent['id']}", {"name": "x", "voice": "/etc/passwd"})[0] == 400
    assert admin.call("PUT", f"/api/agents/{agent['id']}", {"name": "x", "voice": None})[0] == 200


def test_configured_voices_must_be_names(monkeypatch):
    """tts.voices are names: a path or ``..`` in them is refused when the settings load."""
    import pydantic

    from shared.settings import Settings

    for bad in ("../etc/passwd", "/srv/voices/a", "a/b", ".hidden", "a..b"):
        monkeypatch.setenv("XZ_TTS__VOICES", json.dumps([bad]))
        with pytest.raises(pydantic.ValidationError, match="tts.voices are names"):
            Settings()
    monkeypatch.setenv("XZ_TTS__VOICES", json.dumps(["en_US-lessac-medium", "zh_CN-huayan-x_low"]))
    assert Settings().tts.voices == ["en_US-lessac-medium", "zh_CN-huayan-x_low"]
