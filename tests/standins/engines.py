"""The remote ASR engines the session pipeline's ASR worker is configured with, each pointed at
a port fixed here before the pipeline starts. A test serves the stand-in on that port
(:class:`tests.standins.ThreadedServer`) for as long as it needs it, and gives a fresh device an
agent that chooses the engine by name. Nothing listens on a port while its stand-in is down: the
engine fails to connect and the fallback (the built-in Whisper) answers.

Each vendor's engines are one block below, with the stand-in module that serves them.
"""

from __future__ import annotations

import json

from xiaozhi.stack import free_port

PORTS: dict[str, int] = {name: free_port() for name in ("openai", "dead", "funasr", "doubao", "aliyun")}

ALIYUN = f"ws://127.0.0.1:{PORTS['aliyun']}/api-ws/v1/inference"

ENGINES: dict[str, dict] = {
    # tests/standins/openai_asr.py: POST /v1/audio/transcriptions.
    "openai": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['openai']}/v1", "model": "whisper-1", "api_key": "sk-test-good", "timeout_s": 10},
    "openai-badkey": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['openai']}/v1", "model": "whisper-1", "api_key": "sk-test-revoked", "timeout_s": 10},
    # Slow on purpose: the stand-in holds the answer of a request for model "slow" past this.
    "openai-slow": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['openai']}/v1", "model": "slow", "api_key": "sk-test-good", "timeout_s": 2},
    # Nothing ever listens here.
    "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['dead']}/v1", "model": "whisper-1", "timeout_s": 5},
    "openai-garbage": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['openai']}/v1", "model": "garbage", "api_key": "sk-test-good", "timeout_s": 10},
    "openai-quota": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['openai']}/v1", "model": "quota", "api_key": "sk-test-good", "timeout_s": 10},
    # Dead with no fallback: the device must hear the spoken sorry.
    "dead-alone": {"type": "openai", "base_url": f"http://127.0.0.1:{PORTS['dead']}/v1", "model": "whisper-1", "timeout_s": 5, "fallback": ""},
    # tests/standins/funasr.py: the FunASR runtime WebSocket (plain ws://); the URL path picks
    # the stand-in's behaviour (/ answers; /slow never does; /die drops the connection
    # mid-utterance; /garbage answers non-JSON; /empty and /notext: a final with no text).
    "funasr": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/", "mode": "offline", "timeout_s": 10},
    "funasr-2pass": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/", "mode": "2pass", "timeout_s": 10},
    "funasr-slow": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/slow", "mode": "2pass", "timeout_s": 2},
    "funasr-die": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/die", "mode": "2pass", "timeout_s": 10},
    "funasr-garbage": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/garbage", "mode": "offline", "timeout_s": 10},
    "funasr-empty": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/empty", "mode": "offline", "timeout_s": 10},
    "funasr-notext": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['funasr']}/notext", "mode": "offline", "timeout_s": 10},
    # Nothing ever listens here.
    "funasr-dead": {"type": "funasr", "url": f"ws://127.0.0.1:{PORTS['dead']}/", "mode": "2pass", "timeout_s": 5},
    # tests/standins/doubao.py: Volcengine sauc bigmodel; the app key picks the behaviour.
    **{
        name: {"type": "doubao", "url": f"ws://127.0.0.1:{PORTS['doubao']}/api/v3/sauc/{path}", "app_key": app_key, "api_key": token, "resource_id": "volc.bigasr.sauc.duration", "timeout_s": timeout}
        for name, path, app_key, token, timeout in [
            ("doubao", "bigmodel", "1234567890", "doubao-test-token", 10),
            # The streaming-input endpoint: the only one that takes audio.language.
            ("doubao-nostream", "bigmodel_nostream", "1234567890", "doubao-test-token", 10),
            ("doubao-badkey", "bigmodel", "1234567890", "doubao-revoked-token", 10),
            ("doubao-quota", "bigmodel", "quota", "doubao-test-token", 10),
            ("doubao-badaudio", "bigmodel", "badaudio", "doubao-test-token", 10),
            ("doubao-garbage", "bigmodel", "garbage", "doubao-test-token", 10),
            # Slow on purpose: the stand-in never answers the last packet of app key "slow".
            ("doubao-slow", "bigmodel", "slow", "doubao-test-token", 2),
            ("doubao-die", "bigmodel", "die", "doubao-test-token", 10),
            # Nothing ever listens here.
            ("doubao-dead", "bigmodel", "1234567890", "doubao-test-token", 5),
        ]
    },
    # tests/standins/aliyun.py: DashScope realtime ASR, wss://.../api-ws/v1/inference.
    "aliyun": {"type": "aliyun", "url": ALIYUN, "model": "paraformer-realtime-v2", "api_key": "sk-aliyun-good", "vocabulary_id": "vocab-xiaozhi-0001", "timeout_s": 20},
    "aliyun-badkey": {"type": "aliyun", "url": ALIYUN, "api_key": "sk-aliyun-revoked", "timeout_s": 10},
    "aliyun-quota": {"type": "aliyun", "url": ALIYUN, "model": "quota", "api_key": "sk-aliyun-good", "timeout_s": 10},
    "aliyun-badaudio": {"type": "aliyun", "url": ALIYUN, "model": "bad-audio", "api_key": "sk-aliyun-good", "timeout_s": 10},
    "aliyun-garbage": {"type": "aliyun", "url": ALIYUN, "model": "garbage", "api_key": "sk-aliyun-good", "timeout_s": 10},
    # Slow on purpose: the stand-in never answers finish-task for model "slow".
    "aliyun-slow": {"type": "aliyun", "url": ALIYUN, "model": "slow", "api_key": "sk-aliyun-good", "timeout_s": 2},
    "aliyun-dies": {"type": "aliyun", "url": ALIYUN, "model": "dies", "api_key": "sk-aliyun-good", "timeout_s": 10},
    "aliyun-dead": {"type": "aliyun", "url": f"ws://127.0.0.1:{PORTS['dead']}/api-ws/v1/inference", "api_key": "sk-aliyun-good", "timeout_s": 5},
}
ENGINES["doubao-dead"]["url"] = f"ws://127.0.0.1:{PORTS['dead']}/api/v3/sauc/bigmodel"


def env() -> dict[str, str]:
    """The ASR worker's environment for these engines."""
    return {"XZ_ASR__ENGINES": json.dumps(ENGINES)}
