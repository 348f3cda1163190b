"""Every NATS subject name used by the services, in one place.

Subjects are the API between stages. ``<S>`` is a session id. A namespace prefix (default
``xz``) lets several deployments share one NATS server.
"""

from __future__ import annotations

from dataclasses import dataclass

# Queue group names: one per stage, so replicas share work.
QUEUE_VAD = "vad"
QUEUE_ASR = "asr"
QUEUE_LLM = "llm"
QUEUE_TTS = "tts"
QUEUE_TOOLS = "tools"


@dataclass(frozen=True)
class Subjects:
    """Builds subject names under one namespace prefix."""

    prefix: str = "xz"

    def audio(self, session_id: str) -> str:
        """Uplink Opus frames, gateway -> owning VAD worker."""
        return f"{self.prefix}.audio.{session_id}"

    def ctl(self, session_id: str) -> str:
        """Session control (listen start/stop, abort, close), gateway -> whoever works on S."""
        return f"{self.prefix}.ctl.{session_id}"

    @property
    def vad_claim(self) -> str:
        """Request/reply: a VAD worker takes ownership of a session."""
        return f"{self.prefix}.vad.claim"

    @property
    def vad_alive(self) -> str:
        """VAD worker heartbeats (JSON ``{"worker_id", "sessions", "leaving"}``), every second:
        gateways re-claim the sessions of a worker that falls silent."""
        return f"{self.prefix}.vad.alive"

    def asr(self, session_id: str) -> str:
        """One finished utterance, VAD -> any ASR worker."""
        return f"{self.prefix}.asr.{session_id}"

    @property
    def asr_all(self) -> str:
        return f"{self.prefix}.asr.*"

    @property
    def asr_live_claim(self) -> str:
        """Request/reply (queue group of the ASR workers): stream the utterance now starting to
        a streaming engine; the worker that takes it answers with its id."""
        return f"{self.prefix}.asrs.claim"

    def asr_live(self, session_id: str, turn_id: str) -> str:
        """The utterance's Opus packets while it is spoken (``Xz-Seq``), then its end (``Xz-End``
        with the packet count) or a cancel: VAD -> the ASR worker that took the stream."""
        return f"{self.prefix}.asrs.audio.{session_id}.{turn_id}"

    @property
    def asr_live_all(self) -> str:
        return f"{self.prefix}.asrs.audio.*.*"

    def asr_live_result(self, worker_id: str) -> str:
        """Request/reply: the final text of a turn this worker streamed, for the ASR worker that
        pulled the turn's work item."""
        return f"{self.prefix}.asrs.result.{worker_id}"

    @property
    def asr_live_result_all(self) -> str:
        return f"{self.prefix}.asrs.result.*"

    def llm(self, session_id: str) -> str:
        """One user turn (text), ASR or gateway -> any LLM worker."""
        return f"{self.prefix}.llm.{session_id}"

    @property
    def llm_all(self) -> str:
        return f"{self.prefix}.llm.*"

    def tts(self, session_id: str) -> str:
        """One sentence to speak, LLM -> any TTS worker."""
        return f"{self.prefix}.tts.{session_id}"

    @property
    def tts_all(self) -> str:
        return f"{self.prefix}.tts.*"

    def say(self, session_id: str) -> str:
        """A fixed phrase (greeting, "busy", "sorry"), gateway -> any TTS worker, from its clip
        cache; plain NATS, outside the bounded sentence queue, so it is heard even when the
        stages are saturated."""
        return f"{self.prefix}.say.{session_id}"

    @property
    def say_all(self) -> str:
        return f"{self.prefix}.say.*"

    def out(self, session_id: str) -> str:
        """Events and Opus frames for the device, any stage -> the gateway holding S."""
        return f"{self.prefix}.out.{session_id}"

    def device_mcp(self, session_id: str) -> str:
        """Request/reply: JSON-RPC to the device's own MCP server, via its gateway."""
        return f"{self.prefix}.device.{session_id}.mcp"

    def tool(self, name: str) -> str:
        """Request/reply: call one server-side tool."""
        return f"{self.prefix}.tools.call.{name}"

    @property
    def tools_all(self) -> str:
        return f"{self.prefix}.tools.call.*"

    @property
    def tools_list(self) -> str:
        """Request/reply: the schemas of every server-side tool."""
        return f"{self.prefix}.tools.list"

    @property
    def session_end(self) -> str:
        """A session closed (gateway -> any LLM worker): time to write its memory summary."""
        return f"{self.prefix}.session.end"

    # JetStream key-value buckets.
    @property
    def kv_memory(self) -> str:
        return f"{self.prefix}_memory"

    @property
    def gateway_bind(self) -> str:
        """Request: the manager claims the device waiting with an activation code; the gateway
        holding that code answers (the others stay silent)."""
        return f"{self.prefix}.gateway.bind"

    @property
    def gateway_unbind(self) -> str:
        """Event or request to every gateway (no queue group): ``{"device_id": ...}`` was
        unbound; each gateway drops its binding, revokes the device's tokens and closes its
        sessions (answering ``{"device_id", "unbound", "sessions_closed"}`` when asked)."""
        return f"{self.prefix}.gateway.unbind"

    @property
    def gateway_command(self) -> str:
        """Request to every gateway (no queue group), manager -> gateways: ``{"device_id",
        "command": "notice"|"reboot", ...}`` for the device's screen or power; only a gateway
        holding a session of the device answers (``{"delivered": true, "session_id"}``), the
        others stay silent, so no answer means the device is offline."""
        return f"{self.prefix}.gateway.command"

    @property
    def gateway_opened(self) -> str:
        """Event to every gateway: a proved session of ``{"device_id", "session_id"}`` opened;
        the others close the device's older sessions (one session per device across replicas)."""
        return f"{self.prefix}.gateway.opened"

    @property
    def device_seen(self) -> str:
        """Event: a device asked OTA, connected or disconnected (board, firmware, when)."""
        return f"{self.prefix}.registry.seen"

    @property
    def online(self) -> str:
        """Request to every gateway: which of these devices have a session with you now?
        Each gateway holding some answers; the asker gathers the answers for a moment."""
        return f"{self.prefix}.registry.online"

    @property
    def history(self) -> str:
        """Event: one finished turn's texts (user and reply), for the owner's chat history."""
        return f"{self.prefix}.history"

    @property
    def kv_devices(self) -> str:
        """Per-device flags the gateways need (auto_upgrade), written by the manager."""
        return f"{self.prefix}_devices"

    @property
    def obj_firmware(self) -> str:
        """Object store of firmware images, ``<board>_<version>.bin``, written by the manager."""
        return f"{self.prefix}_firmware"

    @property
    def obj_audio(self) -> str:
        """Object store of utterances kept for the chat history (asr.keep_audio)."""
        return f"{self.prefix}_audio"

    @property
    def kv_agents(self) -> str:
        return f"{self.prefix}_agents"


def session_from_subject(subject: str) -> str:
    """The session id is the last token of every per-session subject."""
    return subject.rsplit(".", 1)[-1]
