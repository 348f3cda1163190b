"""A simulated xiaozhi device that behaves like the firmware (protocol.md).

It POSTs to OTA with the firmware's headers and body, opens the WebSocket with Authorization,
Protocol-Version, Device-Id and Client-Id, says hello, and talks: ``listen start`` then a WAV's
speech as real-time 60 ms Opus frames at 16 kHz, then real-time silence until it is speaking (its microphone stops then).
It records every message it receives (with arrival times) and the reply audio.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import struct
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import websockets

from shared.audio import OpusDecoder, OpusEncoder, resample
from xiaozhi.firmware import DECODE_QUEUE_PACKETS, PLAYBACK_TASKS, DeviceStateMachine, Jitter, tools_list_page

FRAME_MS = 60
UPLINK_RATE = 16000


def random_mac() -> str:
    return ":".join(f"{random.randint(0, 255):02x}" for _ in range(6))


def read_wav(path: str | Path) -> np.ndarray:
    """A WAV file as 16 kHz mono int16."""
    with wave.open(str(path), "rb") as wav:
        rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        raw = wav.readframes(wav.getnframes())
    if width != 2:
        raise ValueError(f"{path}: only 16-bit WAV is supported")
    pcm = np.frombuffer(raw, dtype=np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm if rate == UPLINK_RATE else resample(pcm, rate, UPLINK_RATE)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype(np.int16).tobytes())


def unwrap_audio(data: bytes, version: int) -> bytes:
    """The Opus packet inside a downlink binary frame of protocol ``version``."""
    if version == 2:
        (size,) = struct.unpack_from(">I", data, 12)
        return data[16 : 16 + size]
    if version == 3:
        (size,) = struct.unpack_from(">H", data, 2)
        return data[4 : 4 + size]
    return data


def wrap_audio(opus: bytes, version: int) -> bytes:
    if version == 2:
        return struct.pack(">HHIII", 2, 0, 0, 0, len(opus)) + opus
    if version == 3:
        return struct.pack(">BBH", 0, 0, len(opus)) + opus
    return opus


# The firmware's output path: a 40-packet decode queue, two decoded frames and the one playing.
DEVICE_QUEUE_FRAMES = DECODE_QUEUE_PACKETS + PLAYBACK_TASKS + 1


@dataclass
class Playout:
    max_buffered: int = 0
    overflow: int = 0
    underruns: int = 0
    end: float = 0.0  # when the last frame finished playing


def simulate_playout(arrivals: list[float], frame_s: float = FRAME_MS / 1000, capacity: int = DEVICE_QUEUE_FRAMES) -> Playout:  # noqa: E501
    """Replay frame arrival times through the device's queue: one frame plays per ``frame_s``.

    A frame that finds the queue full is dropped (overflow); the queue running dry before the
    last frame arrived is an underrun (the listener hears a gap).
    """
    result = Playout()
    playing_until = 0.0  # when the frame now playing (and everything queued before) ends
    queue_ends: list[float] = []  # end time of each queued or playing frame
    for i, at in enumerate(arrivals):
        queue_ends = [t for t in queue_ends if t > at]
        if i > 0 and playing_until < at - 0.005:  # silence of more than 5 ms: a gap
            result.underruns += 1
        if len(queue_ends) >= capacity:
            result.overflow += 1
            continue
        start = max(at, playing_until)
        playing_until = start + frame_s
        queue_ends.append(playing_until)
        result.max_buffered = max(result.max_buffered, len(queue_ends))
    result.end = playing_until
    return result


@dataclass
class Received:
    """One message from the server, stamped with its arrival (monotonic seconds)."""

    at: float
    kind: str  # "json", "text" (not JSON) or "audio"
    message: dict[str, Any] | None = None
    data: bytes = b""


@dataclass
class TurnReport:
    """What one turn looked like from the device."""

    stt: str | None = None
    sentences: list[str] = field(default_factory=list)
    emotion: str | None = None
    frames: int = 0
    audio_s: float = 0.0
    speech_end: float | None = None  # when the last speech frame was sent
    first_audio: float | None = None
    stopped: bool = False
    events: list[str] = field(default_factory=list)
    error: str | None = None
    # Play-out as the device would do it (a 40-frame queue drained every 60 ms):
    max_buffered: int = 0  # most frames waiting at once
    overflow_frames: int = 0  # frames that arrived to a full queue and were dropped
    underruns: int = 0  # times the queue ran dry before the last frame had arrived
    stop_margin_s: float | None = None  # `tts stop` arrival minus the end of play-out
    # The firmware plays audio only while speaking: frames before `tts start` or after
    # `tts stop` are lost, and the switch to speaking takes a moment (protocol.md §9.1-2).
    lost_frames: int = 0
    start_gap_s: float | None = None  # first audio frame minus `tts start`
    max_gap_s: float | None = None  # longest wait between two reply frames (jitter, stalls)
    # Arrival times (monotonic) of the reply's landmarks, for the stage breakdown.
    stt_at: float | None = None
    tts_start_at: float | None = None
    sentence_at: float | None = None
    stop_at: float | None = None

    def after_speech(self, at: float | None) -> float | None:
        """Seconds from the end of speech to ``at``."""
        return None if at is None or self.speech_end is None else at - self.speech_end

    @property
    def latency_s(self) -> float | None:
        """End of speech (or the text was sent) to the first reply audio frame."""
        if self.speech_end is None or self.first_audio is None:
            return None
        return self.first_audio - self.speech_end


def firmware_tools() -> list[dict[str, Any]]:
    """The AI-visible built-in MCP tools of the firmware (protocol.md §5.6)."""
    return [
        {"name": "self.get_device_status", "description": "Provides the real-time information of the device, including the current status of the audio speaker, screen, battery, network, etc.", "inputSchema": {"type": "object", "properties": {}}},
        {"name": "self.audio_speaker.set_volume", "description": "Set the volume of the audio speaker. If the current volume is unknown, you must call `self.get_device_status` tool first and then call this tool.", "inputSchema": {"type": "object", "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["volume"]}},
        {"name": "self.screen.set_brightness", "description": "Set the brightness of the screen.", "inputSchema": {"type": "object", "properties": {"brightness": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["brightness"]}},
    ]


# Stands for the raw SSID bytes while the status JSON is built (then swapped for them).
_RAW_SSID = "@@raw-ssid@@"


class SimDevice:
    """One simulated device. Use as ``async with SimDevice(...) as dev:``.

    Like the firmware it is an MCP server: it answers ``initialize``, pages ``tools/list`` as
    ``GetToolsList`` does (8000 bytes with ``nextCursor``), and runs ``tools/call`` one at a time
    on its (simulated) speaker and screen. Its device state and audio output are the firmware's
    (``self.fw``, xiaozhi/firmware.py): ``self.drops`` counts the downlink frames a real device
    would not have played, in auto mode it sends its own ``listen start`` once playback drained,
    and its microphone stops once *speaking* takes effect (auto and manual mode).
    """

    def __init__(
        self,
        ota_url: str | None = None,
        ws_url: str | None = None,
        device_id: str | None = None,
        client_id: str | None = None,
        protocol_version: int = 1,
        token: str | None = None,
        board: str = "bread-compact-wifi",
        firmware_version: str = "2.4.2",
        mcp_tools: list[dict[str, Any]] | None = None,
        mcp_page_bytes: int = 8000,
        frame_ms: int = FRAME_MS,
        answer_mcp_calls: bool = True,
        ssl_context: "ssl.SSLContext | None" = None,
        status_ssid_bytes: bytes | None = None,
        tool_delays: dict[str, float] | None = None,
        text_font: dict[str, Any] | None = None,
        auto_listen: bool = True,
        channel_timeout_s: float = 120,
        jitter: "Jitter | str | None" = None,
    ) -> None:
        if not ota_url and not ws_url:
            raise ValueError("give an OTA URL or a WebSocket URL")
        # For https/wss servers whose certificate the system does not trust (the firmware
        # carries its own CA bundle).
        self.ssl_context = ssl_context
        self.ota_url = ota_url
        self.ws_url = ws_url
        self.device_id = device_id or random_mac()
        # The firmware keeps its Client-Id in NVS: the same MAC gives the same one (a re-flashed
        # device, or an impersonator, passes another).
        self.client_id = client_id or str(uuid.uuid5(uuid.NAMESPACE_OID, f"xiaozhi-sim:{self.device_id.lower()}"))
        self.protocol_version = protocol_version
        self.token = token
        self._token_given = token is not None  # else each OTA answer's token is used
        self.board = board
        self.firmware_version = firmware_version
        self.session_id: str | None = None
        self.server_hello: dict[str, Any] | None = None
        self.ota_response: dict[str, Any] | None = None
        self.received: list[Received] = []
        self.ws: Any = None
        self._reader: asyncio.Task | None = None
        self._new_message = asyncio.Event()
        self.downlink_rate = 24000
        self.closed = False
        self.mcp_tools = firmware_tools() if mcp_tools is None else mcp_tools
        self.mcp_page_bytes = mcp_page_bytes
        self.frame_ms = frame_ms  # uplink packet duration: 60 like the firmware, 20 like py-xiaozhi
        self.answer_mcp_calls = answer_mcp_calls
        # The Wi-Fi name in `self.get_device_status`, as raw bytes: the firmware's cJSON passes
        # bytes >= 0x80 through, so a GBK SSID arrives in a text frame that is not UTF-8.
        self.status_ssid_bytes = status_ssid_bytes
        # Seconds a tool takes before it answers (a camera: upload plus the vision model).
        self.tool_delays = dict(tool_delays or {})
        self._tool_tasks: set[asyncio.Task] = set()
        # tools/call runs on the firmware's main loop (Schedule): one at a time, in order.
        self._tool_queue: asyncio.Queue | None = None
        # The firmware's device state and audio output (xiaozhi/firmware.py): drops, deferred
        # `listen start`, channel expiry. ``auto_listen``: send that `listen start` itself.
        self.fw = DeviceStateMachine(firmware_version, channel_timeout_s=channel_timeout_s)
        self.auto_listen = auto_listen
        self._listen_timer: asyncio.TimerHandle | None = None
        self._fw_sent_mark = 0  # fw.sent up to here went out (or was left to the test)
        # Downlink delays and stalls (Wi-Fi/4G): messages reach the device later, in order.
        self.jitter = Jitter.parse(jitter) if isinstance(jitter, str) else jitter
        self._delivery: asyncio.Queue | None = None
        self._deliverer: asyncio.Task | None = None
        self.reconnects = 0
        self.sent: list[dict[str, Any]] = []  # every JSON message this device sent
        self.mcp_requests: list[dict[str, Any]] = []
        self.mcp_calls_running = 0
        self.mcp_calls_max_running = 0  # the firmware never runs two tool calls at once
        self.vision: dict[str, Any] | None = None
        self.state: dict[str, Any] = {"volume": 70, "brightness": 80}
        # What the screen shows after ``alert`` messages (the firmware's Alert(): status bar,
        # face, a system chat line), each one kept; and whether a ``system`` reboot came.
        self.screen: dict[str, str] = {}
        self.alerts: list[dict[str, str]] = []
        self.rebooted = False
        # Firmware 2.4's installed text font ({"bundle", "charset", "size", "bpp"}): given, the
        # hello announces features.glyph_push with it, and the server may push glyphs (§5.9).
        self.text_font = text_font

    async def __aenter__(self) -> "SimDevice":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ set-up

    async def ota(self) -> dict[str, Any]:
        """POST the firmware's system-info to OTA, as at boot (protocol.md §1.2, §1.3)."""
        assert self.ota_url
        headers = {
            "Activation-Version": "1",
            "Device-Id": self.device_id,
            "Client-Id": self.client_id,
            "User-Agent": f"{self.board}/{self.firmware_version}",
            "Accept-Language": "en-US",
            "Content-Type": "application/json",
        }
        body = {
            "version": 2,
            "language": "en-US",
            "flash_size": 16777216,
            "minimum_free_heap_size": "123456",
            "mac_address": self.device_id,
            "uuid": self.client_id,
            "chip_model_name": "esp32s3",
            "chip_info": {"model": 9, "cores": 2, "revision": 2, "features": 18},
            "application": {"name": "xiaozhi", "version": self.firmware_version, "compile_time": "Aug  8 2026T08:33:45Z", "idf_version": "v5.5.2", "elf_sha256": "0" * 64},
            "partition_table": [{"label": "nvs", "type": 1, "subtype": 2, "address": 36864, "size": 16384}],
            "ota": {"label": "ota_0"},
            "display": {"monochrome": False, "width": 240, "height": 240},
            "board": {"type": self.board, "name": self.board, "ssid": "sim", "rssi": -50, "channel": 6, "ip": "127.0.0.1", "mac": self.device_id},
        }
        connector = aiohttp.TCPConnector(ssl=self.ssl_context) if self.ssl_context else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as http:
            async with http.post(self.ota_url, json=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"OTA answered HTTP {response.status}: {(await response.text())[:200]}")
                self.ota_response = await response.json(content_type=None)
        ws = (self.ota_response or {}).get("websocket") or {}
        if not self.ws_url:
            self.ws_url = ws.get("url")
        if not self._token_given:
            self.token = ws.get("token") or ""
        if "version" in ws and isinstance(ws["version"], int):
            self.protocol_version = ws["version"]
        return self.ota_response or {}

    async def activate(self, polls: int = 10, wait_pending_s: float = 3.0, wait_error_s: float = 10.0) -> bool:
        """The activation loop of the firmware (protocol.md §1.5): POST ``<ota>activate`` until 200.

        202 means "not bound yet": wait ``wait_pending_s`` and ask again; anything else waits
        ``wait_error_s``. Once activated it runs the OTA check again, as the firmware does (the
        answer without ``activation`` carries the token of a bound device). Returns True once
        activated.
        """
        activation = (self.ota_response or {}).get("activation") or {}
        if not self.ota_url or not activation.get("challenge"):
            return False
        url = self.ota_url + ("activate" if self.ota_url.endswith("/") else "/activate")
        headers = {"Activation-Version": "1", "Device-Id": self.device_id, "Client-Id": self.client_id, "Content-Type": "application/json"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for _ in range(polls):
                async with http.post(url, data=b"{}", headers=headers) as response:
                    status = response.status
                if status == 200:
                    break
                await asyncio.sleep(wait_pending_s if status == 202 else wait_error_s)
            else:
                return False
        await self.ota()
        return True

    async def connect(self, features: dict[str, Any] | None = None) -> None:
        """OTA (when given), WebSocket handshake with the firmware's headers, then hello."""
        self._features = features
        if self.ota_url and not self.ota_response:
            await self.ota()
        assert self.ws_url, "OTA gave no websocket url"
        headers = {"Protocol-Version": str(self.protocol_version), "Device-Id": self.device_id, "Client-Id": self.client_id}
        if self.token:
            headers["Authorization"] = self.token if " " in self.token else f"Bearer {self.token}"
        tls = {"ssl": self.ssl_context} if self.ssl_context and self.ws_url.startswith("wss://") else {}
        self.fw.connecting(time.monotonic())
        self.closed = False
        self.ws = await websockets.connect(self.ws_url, additional_headers=headers, compression=None, open_timeout=10, max_size=None, ping_interval=None, **tls)
        self._reader = asyncio.create_task(self._read())
        hello = {
            "type": "hello",
            "version": self.protocol_version,
            "features": features if features is not None else {"mcp": True},
            "transport": "websocket",
            "audio_params": {"format": "opus", "sample_rate": UPLINK_RATE, "channels": 1, "frame_duration": self.frame_ms},
        }
        if self.text_font is not None:
            hello["features"] = {**hello["features"], "glyph_push": True}
            hello["text_font"] = self.text_font
        await self.send_json(hello)
        reply = await self.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "hello", timeout=10)
        if reply is None:
            raise TimeoutError("no server hello within 10 s")
        self.server_hello = reply.message
        if reply.message.get("transport") != "websocket":
            raise RuntimeError(f"server hello without transport websocket: {reply.message}")
        self.session_id = reply.message.get("session_id") or ""
        self.downlink_rate = int((reply.message.get("audio_params") or {}).get("sample_rate") or 24000)
        self.fw.channel_opened(reply.at)

    async def reopen_if_expired(self) -> bool:
        """As the firmware before a turn: a channel without incoming data for more than 120 s is
        dead (Protocol::IsTimeout), so it drops the socket and opens a new one with a new hello."""
        if self.closed or not self.fw.channel_expired(time.monotonic()):
            return False
        await self.close()
        await self.connect(getattr(self, "_features", None))  # OTA only at boot: not again
        self.reconnects += 1
        return True

    async def close(self, graceful: bool = False) -> None:
        """Close as the firmware does: drop TCP without a close frame (``graceful`` sends one)."""
        if self.ws is not None and not self.closed:
            self.closed = True
            if graceful:
                await self.ws.close()
            else:
                self.ws.transport.abort()
        for task in (self._reader, self._deliverer):
            if task:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
        self._deliverer = None
        for task in list(self._tool_tasks):
            task.cancel()
        self._tool_queue = None
        if self._listen_timer:
            self._listen_timer.cancel()
        self.fw.channel_closed(time.monotonic())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if self.jitter is not None:
                    if self._delivery is None or self._deliverer is None:
                        self._delivery = asyncio.Queue()
                        self._deliverer = asyncio.create_task(self._deliver())
                    self._delivery.put_nowait((self.jitter.deliver_at(time.monotonic(), message), message))
                    continue
                if await self._handle(message, time.monotonic()):
                    return
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._delivery is not None and self._deliverer is not None:
                self._delivery.put_nowait(None)  # what is still on the link arrives, then closed
                try:
                    await asyncio.shield(self._deliverer)
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
            self.closed = True
            self.fw.channel_closed(time.monotonic())
            self._new_message.set()

    async def _deliver(self) -> None:
        """The jittered link: each message reaches the device at its delivery time, in order."""
        assert self._delivery is not None
        while (item := await self._delivery.get()) is not None:
            at, message = item
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if await self._handle(message, time.monotonic()):
                return

    async def _handle(self, message: Any, now: float) -> bool:
        """One message as the device gets it; True once the device has dropped the socket."""
        if isinstance(message, bytes):
            self.fw.on_audio(now)
            self.received.append(Received(now, "audio", data=unwrap_audio(message, self.protocol_version)))
        else:
            try:
                parsed = json.loads(message)
                self.received.append(Received(now, "json", parsed if isinstance(parsed, dict) else {"value": parsed}))
            except ValueError:
                self.fw.on_data(now)
                self.received.append(Received(now, "text", {"text": message}))
            else:
                if isinstance(parsed, dict):
                    self.fw.on_json(parsed, now)
                    self._arm_listen_timer()
                else:
                    self.fw.on_data(now)
                if isinstance(parsed, dict) and parsed.get("type") == "mcp" and isinstance(parsed.get("payload"), dict):
                    await self._on_mcp(parsed["payload"])
                elif isinstance(parsed, dict) and parsed.get("type") == "alert":
                    self._on_alert(parsed)
                elif isinstance(parsed, dict) and parsed.get("type") == "system" and parsed.get("command") == "reboot":
                    # The firmware closes the channel and restarts: TCP drops, no close frame.
                    self.rebooted = True
                    self.ws.transport.abort()
                    self._new_message.set()
                    return True
        self._new_message.set()
        return False

    # ------------------------------------------------------------------ the device's own `listen start`

    def _arm_listen_timer(self) -> None:
        """Auto mode after `tts stop`: `listen start` goes out once playback has drained."""
        if self._listen_timer:
            self._listen_timer.cancel()
            self._listen_timer = None
        self.fw.poll(time.monotonic())
        self._send_device_messages()
        due = self.fw.listen_start_due()
        if due is None:
            return
        loop = asyncio.get_running_loop()
        self._listen_timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()) + 0.001, self._listen_timer_fired)

    def _listen_timer_fired(self) -> None:
        self._listen_timer = None
        self.fw.poll(time.monotonic())
        self._send_device_messages()

    def _send_device_messages(self) -> None:
        """Messages the firmware sent by itself (its `listen start`), unless the test drives them."""
        messages = [{k: v for k, v in m.items() if k != "at"} for m in self.fw.sent[self._fw_sent_mark :]]
        self._fw_sent_mark = len(self.fw.sent)
        for message in messages:
            if self.auto_listen and not self.closed:
                task = asyncio.ensure_future(self.send_json(dict(message)))
                self._tool_tasks.add(task)
                task.add_done_callback(self._tool_tasks.discard)
            elif message.get("type") == "listen":
                self.fw.processor_running = False  # not sent: the test sends its own

    def _on_alert(self, message: dict[str, Any]) -> None:
        """As the firmware: shown only when status, message and emotion are all strings."""
        fields = {k: message.get(k) for k in ("status", "message", "emotion")}
        if all(isinstance(v, str) for v in fields.values()):
            self.alerts.append(fields)  # type: ignore[arg-type]
            self.screen = dict(fields)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ MCP server (as the firmware)

    async def _on_mcp(self, payload: dict[str, Any]) -> None:
        self.mcp_requests.append(payload)
        method = payload.get("method")
        msg_id = payload.get("id")
        if isinstance(method, str) and method.startswith("notifications"):
            return
        if not isinstance(msg_id, int) or isinstance(msg_id, bool):
            return  # the firmware drops requests whose id is not a number
        params = payload.get("params") if isinstance(payload.get("params"), dict) else {}
        if method == "initialize":
            self.vision = (params.get("capabilities") or {}).get("vision")
            result: dict[str, Any] = {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}}, "serverInfo": {"name": self.board, "version": self.firmware_version}}
            await self._mcp_reply(msg_id, result=result)
        elif method == "tools/list":
            await self._mcp_list(msg_id, str(params.get("cursor") or ""), params.get("withUserTools") is True)
        elif method == "tools/call":
            if not self.answer_mcp_calls:
                return  # a device that hangs: the server must time out
            name = str(params.get("name") or "")
            arguments = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
            # The firmware schedules each call on its main loop: calls run one at a time, in the
            # order they came, while the network side goes on reading (a slow tool delays the next).
            if self._tool_queue is None:
                self._tool_queue = asyncio.Queue()
                self._tool_tasks.add(worker := asyncio.create_task(self._tool_worker(self._tool_queue)))
                worker.add_done_callback(self._tool_tasks.discard)
            self._tool_queue.put_nowait((msg_id, name, arguments))
        else:
            await self._mcp_reply(msg_id, error=f"Method not implemented: {method}")

    async def _tool_worker(self, queue: asyncio.Queue) -> None:
        while True:
            msg_id, name, arguments = await queue.get()
            self.mcp_calls_running += 1
            self.mcp_calls_max_running = max(self.mcp_calls_max_running, self.mcp_calls_running)
            try:
                await self._mcp_call(msg_id, name, arguments)
            except websockets.ConnectionClosed:
                return
            finally:
                self.mcp_calls_running -= 1
                queue.task_done()

    async def mcp_idle(self) -> None:
        """Wait until every queued ``tools/call`` has been answered."""
        if self._tool_queue is not None:
            await self._tool_queue.join()

    async def _mcp_reply(self, msg_id: int, result: Any = None, error: str | None = None) -> None:
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id}
        if error is not None:
            payload["error"] = {"message": error}
        else:
            payload["result"] = result
        await self.send_json({"type": "mcp", "payload": payload})

    async def _mcp_list(self, msg_id: int, cursor: str, with_user_tools: bool = False) -> None:
        """One page as McpServer::GetToolsList computes it (xiaozhi/firmware.py)."""
        result, error = tools_list_page(self.mcp_tools, cursor, with_user_tools, self.mcp_page_bytes)
        await self._mcp_reply(msg_id, result=result, error=error)

    async def _mcp_call(self, msg_id: int, name: str, arguments: dict[str, Any]) -> None:
        tool = next((t for t in self.mcp_tools if t["name"] == name), None)
        if tool is None:
            await self._mcp_reply(msg_id, error=f"Unknown tool: {name}")
            return
        properties = tool.get("inputSchema", {}).get("properties", {})
        for required in tool.get("inputSchema", {}).get("required", []):
            value = arguments.get(required)
            kind = properties.get(required, {}).get("type")
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind == "integer" else (
                isinstance(value, bool) if kind == "boolean" else isinstance(value, str) if kind == "string" else value is not None)
            if not ok:
                await self._mcp_reply(msg_id, error=f"Missing valid argument: {required}")
                return
            if kind == "integer":
                spec = properties[required]
                if "maximum" in spec and value > spec["maximum"]:
                    await self._mcp_reply(msg_id, error=f"Value exceeds maximum allowed: {spec['maximum']}")
                    return
                if "minimum" in spec and value < spec["minimum"]:
                    await self._mcp_reply(msg_id, error=f"Value is below minimum allowed: {spec['minimum']}")
                    return
        delay = self.tool_delays.get(name, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if name == "self.get_device_status":
            network: dict[str, Any] = {"type": "wifi", "signal": "strong"}
            if self.status_ssid_bytes is not None:
                network["ssid"] = _RAW_SSID
            text = json.dumps({"audio_speaker": {"volume": self.state["volume"]}, "screen": {"brightness": self.state["brightness"]}, "network": network})
            if self.status_ssid_bytes is not None:
                payload = {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}], "isError": False}}
                frame = json.dumps({"session_id": self.session_id, "type": "mcp", "payload": payload}, ensure_ascii=False).encode()
                await self.send_raw_text(frame.replace(_RAW_SSID.encode(), self.status_ssid_bytes))
                return
        elif name == "self.audio_speaker.set_volume":
            self.state["volume"] = int(arguments["volume"])
            text = "true"
        elif name == "self.screen.set_brightness":
            self.state["brightness"] = int(arguments["brightness"])
            text = "true"
        else:
            text = "true"
        await self._mcp_reply(msg_id, result={"content": [{"type": "text", "text": text}], "isError": False})

    # ------------------------------------------------------------------ sending

    async def send_raw_text(self, data: bytes) -> None:
        """A text frame with exactly these bytes, UTF-8 or not (as cJSON output can be)."""
        await self.ws.send(data, text=True)

    async def send_json(self, message: dict[str, Any]) -> None:
        if self.session_id and "session_id" not in message:
            message = {"session_id": self.session_id, **message}
        self.sent.append(message)
        await self.ws.send(json.dumps(message, ensure_ascii=False))

    async def listen_start(self, mode: str = "auto") -> None:
        self.fw.listen_start(mode, time.monotonic())
        await self.send_json({"type": "listen", "state": "start", "mode": mode})

    async def listen_stop(self) -> None:
        self.fw.listen_stop(time.monotonic())
        await self.send_json({"type": "listen", "state": "stop"})

    async def listen_for_turn(self, mode: str = "auto", max_wait_s: float = 10.0) -> None:
        """`listen start` as the firmware would before the next utterance: none when it already
        listens in that mode (auto: sent by itself once playback drained; realtime: never
        re-sent); it waits for a deferred one rather than talking over its own playback."""
        deadline = time.monotonic() + max_wait_s
        while self.auto_listen and self.fw.pending_listen and not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        fw = self.fw
        if self.auto_listen and mode != "manual" and fw.state == "listening" and fw.processor_running and fw.mode == mode:
            return
        await self.listen_start(mode)

    async def detect(self, text: str) -> None:
        await self.send_json({"type": "listen", "state": "detect", "text": text})

    async def wake_word(self, text: str, preroll: np.ndarray | None = None, mode: str = "auto") -> None:
        """As a device whose on-board wake word fired (protocol.md §6.3): the buffered wake-word
        audio (at most 2 s) as a burst, then `listen detect` with the word, then `listen start`.

        While speaking or listening the firmware instead aborts (reason wake_word_detected) and
        listens again (HandleWakeWordDetectedEvent): no pre-roll, no detect; in auto mode the
        `listen start` waits until playback drained.
        """
        barge = self.fw.wake_word(time.monotonic(), mode)
        if barge:
            self._fw_sent_mark = len(self.fw.sent)  # an immediate `listen start` is in ``barge``
            for message in barge:
                await self.send_json(message)
            self._arm_listen_timer()
            return
        await self.reopen_if_expired()
        if preroll is not None and len(preroll):
            encoder = OpusEncoder(UPLINK_RATE, self.frame_ms, complexity=0, dtx=True)
            samples = UPLINK_RATE * self.frame_ms // 1000
            tail = preroll[-2 * UPLINK_RATE :]
            for k in range(0, len(tail) - samples + 1, samples):
                await self.ws.send(wrap_audio(encoder.encode(tail[k : k + samples]), self.protocol_version))
        await self.detect(text)
        await self.listen_start(mode)

    async def abort(self, reason: str | None = None) -> None:
        message: dict[str, Any] = {"type": "abort"}
        if reason:
            message["reason"] = reason
        await self.send_json(message)

    async def stream_pcm(self, pcm: np.ndarray, until: "callable | None" = None, max_s: float | None = None) -> float:
        """Send PCM as real-time 60 ms Opus frames; returns when the last frame was sent.

        With ``until``, keeps sending until it returns True (or ``max_s`` passes): used for the
        silence a device streams while it waits for the reply.
        """
        encoder = OpusEncoder(UPLINK_RATE, self.frame_ms, complexity=0, dtx=True)
        samples = UPLINK_RATE * self.frame_ms // 1000
        start = time.monotonic()
        k = 0
        last = start
        while True:
            if until is None and k * samples >= len(pcm):
                break
            if until is not None and (until() or (max_s is not None and time.monotonic() - start > max_s) or self.closed):
                break
            frame = pcm[k * samples : (k + 1) * samples] if until is None else np.zeros(samples, dtype=np.int16)
            if len(frame) < samples:
                frame = np.concatenate([frame, np.zeros(samples - len(frame), dtype=np.int16)])
            target = start + k * self.frame_ms / 1000
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.closed:
                break
            if until is not None and until():
                break
            if not self.fw.microphone_on(time.monotonic()):
                break  # the device entered speaking: its microphone is off (auto, manual)
            await self.ws.send(wrap_audio(encoder.encode(frame), self.protocol_version))
            last = time.monotonic()
            k += 1
        return last

    # ------------------------------------------------------------------ an always-on microphone

    def start_mic(self) -> None:
        """Stream the microphone continuously in real time (realtime mode, AEC devices):
        silence, or whatever :meth:`mic_say` queued."""
        self._mic_queue: list[np.ndarray] = []
        self.mic_last_speech: float | None = None
        self._mic_task = asyncio.create_task(self._mic())

    def mic_say(self, pcm: np.ndarray) -> None:
        self._mic_queue.append(pcm)

    async def stop_mic(self) -> None:
        task = getattr(self, "_mic_task", None)
        if task:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _mic(self) -> None:
        encoder = OpusEncoder(UPLINK_RATE, self.frame_ms, complexity=0, dtx=True)
        samples = UPLINK_RATE * self.frame_ms // 1000
        pending = np.zeros(0, dtype=np.int16)
        start = time.monotonic()
        k = 0
        while not self.closed:
            if len(pending) == 0 and self._mic_queue:
                pending = self._mic_queue.pop(0)
            speech = len(pending) > 0
            frame, pending = pending[:samples], pending[samples:]
            if len(frame) < samples:
                frame = np.concatenate([frame, np.zeros(samples - len(frame), dtype=np.int16)])
            delay = start + k * self.frame_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.fw.microphone_on(time.monotonic()):
                k += 1  # speaking in auto or manual mode: the microphone is off, the words lost
                continue
            try:
                await self.ws.send(wrap_audio(encoder.encode(frame), self.protocol_version))
            except websockets.ConnectionClosed:
                break
            if speech:
                self.mic_last_speech = time.monotonic()
            k += 1

    # ------------------------------------------------------------------ receiving

    async def wait_for(self, predicate, timeout: float, start_index: int = 0) -> Received | None:
        """The first received message (from ``start_index``) that matches, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = start_index
        while True:
            while index < len(self.received):
                item = self.received[index]
                index += 1
                if predicate(item):
                    return item
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed and index >= len(self.received):
                return None
            self._new_message.clear()
            try:
                await asyncio.wait_for(self._new_message.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    def _is_tts(self, state: str):
        return lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == state

    async def speak(self, pcm: np.ndarray, mode: str = "auto", reply_timeout: float = 60, trailing_silence_max_s: float = 15) -> TurnReport:
        """One spoken turn, as the firmware does it in auto mode; waits for `tts stop`."""
        await self.reopen_if_expired()
        mark = len(self.received)
        await self.listen_for_turn(mode)
        speech_end = await self.stream_pcm(pcm)
        if mode == "manual":
            await self.listen_stop()
        else:
            def started() -> bool:
                """`tts start` was delivered and the switch to speaking took effect."""
                if not any(self._is_tts("start")(r) for r in self.received[mark:] if r.kind == "json"):
                    return False
                return self.fw.speaking_from is None or time.monotonic() >= self.fw.speaking_from

            # Real-time silence until the device is speaking: the microphone stays open until
            # then (the firmware's voice processing stops on entering speaking, not on arrival).
            await self.stream_pcm(np.zeros(0, dtype=np.int16), until=started, max_s=trailing_silence_max_s)
        return await self.collect_turn(mark, speech_end, reply_timeout)

    async def type_text(self, text: str, reply_timeout: float = 60) -> TurnReport:
        """A typed-text turn through `listen detect` (protocol.md §6.7)."""
        await self.reopen_if_expired()
        mark = len(self.received)
        sent = time.monotonic()
        await self.detect(text)
        return await self.collect_turn(mark, sent, reply_timeout)

    async def collect_turn(self, mark: int, speech_end: float, timeout: float) -> TurnReport:
        report = TurnReport(speech_end=speech_end)
        stop = await self.wait_for(self._is_tts("stop"), timeout, start_index=mark)
        report.stopped = stop is not None
        if stop is None:
            report.error = "connection closed" if self.closed else f"no tts stop within {timeout}s"
        end = self.received.index(stop) + 1 if stop is not None else len(self.received)
        for item in self.received[mark:end]:
            if item.kind == "audio":
                report.frames += 1
                report.events.append("audio")
                if report.first_audio is None:
                    report.first_audio = item.at
                continue
            message = item.message or {}
            mtype = message.get("type")
            if mtype == "mcp":
                continue  # the device's MCP traffic is not part of the turn
            label = mtype if mtype != "tts" else f"tts.{message.get('state')}"
            report.events.append(str(label))
            if mtype == "stt":
                report.stt = message.get("text")
                report.stt_at = report.stt_at or item.at
            elif mtype == "llm":
                report.emotion = message.get("emotion")
            elif mtype == "tts" and message.get("state") == "sentence_start":
                report.sentences.append(message.get("text", ""))
                report.sentence_at = report.sentence_at or item.at
            elif mtype == "tts" and message.get("state") == "start":
                report.tts_start_at = report.tts_start_at or item.at
        report.audio_s = report.frames * FRAME_MS / 1000
        speaking = False
        started_at = None
        for item in self.received[mark:end]:
            message = item.message or {}
            if item.kind == "json" and message.get("type") == "tts" and message.get("state") in ("start", "stop"):
                speaking = message.get("state") == "start"
                if speaking and started_at is None:
                    started_at = item.at
            elif item.kind == "audio":
                if not speaking:
                    report.lost_frames += 1
                elif report.start_gap_s is None and started_at is not None:
                    report.start_gap_s = item.at - started_at
        arrivals = [item.at for item in self.received[mark:end] if item.kind == "audio"]
        if len(arrivals) > 1:
            report.max_gap_s = max(b - a for a, b in zip(arrivals, arrivals[1:]))
        playout = simulate_playout(arrivals)
        report.max_buffered, report.overflow_frames, report.underruns = playout.max_buffered, playout.overflow, playout.underruns
        if stop is not None:
            report.stop_at = stop.at
        if stop is not None and arrivals:
            report.stop_margin_s = stop.at - playout.end
        return report

    @property
    def drops(self) -> int:
        """Downlink frames the firmware would not have played (not speaking, queue full, flushed)."""
        return self.fw.drops.total

    def reply_audio(self, start_index: int = 0) -> np.ndarray:
        """Every audio frame received (from ``start_index``), decoded at the announced rate."""
        decoder = OpusDecoder(self.downlink_rate)
        chunks = []
        for item in self.received[start_index:]:
            if item.kind == "audio":
                chunks.append(decoder.decode(item.data))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
