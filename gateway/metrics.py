"""The gateway's Prometheus metrics."""

from prometheus_client import Counter, Gauge

from shared.metrics import DROPPED, ERRORS, histogram

__all__ = ["DROPPED", "ERRORS"]

SESSIONS = Gauge("xz_gateway_sessions", "Open device WebSocket sessions")
MESSAGES_IN = Counter("xz_gateway_messages_in_total", "JSON messages from devices, by type", ["type"])
FRAMES_IN = Counter("xz_gateway_audio_frames_in_total", "Uplink Opus frames forwarded to VAD")
FRAMES_OUT = Counter("xz_gateway_audio_frames_out_total", "Downlink Opus frames sent to devices")
ABORTS = Counter("xz_gateway_aborts_total", "Aborts received from devices")
TURNS = Counter("xz_gateway_turns_total", "Replies played to the end")
OTA_REQUESTS = Counter("xz_gateway_ota_requests_total", "OTA requests, by method and result", ["method", "result"])
TEXT_TURN_FIRST_AUDIO = histogram("xz_gateway_text_turn_first_audio_seconds", "Typed-text turn to first downlink audio frame")
AUTH_FAILURES = Counter("xz_gateway_auth_failures_total", "WebSocket handshakes rejected, by reason", ["reason"])
IDLE_CLOSES = Counter("xz_gateway_idle_closes_total", "Sessions ended for idleness, by how", ["how"])
VISION_REQUESTS = Counter("xz_gateway_vision_requests_total", "Vision endpoint requests, by result", ["result"])
VOICE_TO_VOICE = histogram("xz_gateway_voice_to_voice_seconds", "End of user speech (VAD) to the first reply audio frame sent")
TURNS_IN_FLIGHT = Gauge("xz_gateway_turns_in_flight", "Sessions with a reply under way (from the user's turn to the reply's end)")
FALLBACK_REPLIES = Counter(
    "xz_gateway_fallback_replies_total",
    "Short fixed phrases spoken instead of an answer, by reason (busy, stt_timeout, turn_timeout, unavailable)",
    ["reason"],
)
VAD_RECLAIMS = Counter("xz_gateway_vad_reclaims_total", "Sessions handed to another VAD worker, by why (dead: no heartbeat, leaving: shut down)", ["why"])
REJECTED = Counter("xz_gateway_connections_rejected_total", "WebSocket handshakes refused, by reason (full, draining, rate_limited)", ["reason"])
DEVICE_COMMANDS = Counter("xz_gateway_device_commands_total", "Owners' commands from the manager sent to a device here, by command (notice, reboot) and result (delivered, failed)", ["command", "result"])
INVALID_UTF8 = Counter("xz_gateway_invalid_utf8_total", "Device text frames that were not valid UTF-8 (raw GBK from cJSON, say), read with the bad bytes replaced")
GLYPHS = Counter("xz_gateway_glyphs_total", "glyph_push glyph look-ups, by result (rendered, cache, missing: the font has none or it is over 64 px)", ["result"])
GLYPH_PUSHES = Counter("xz_gateway_glyph_pushes_total", "stt and sentence_start messages sent with a glyph_push")
WAKE_WORDS = Counter(
    "xz_gateway_wake_words_total",
    "Wake words, by outcome (end: greeted after the VAD heard nothing more; more: a question in the same breath, no greeting; no_verdict: greeted without the VAD's word; no_preroll: greeted at once; nothing_after: a more verdict whose transcript held no question, greeted then)",
    ["outcome"],
)
FIRST_FRAME_RELEASES = Counter(
    "xz_gateway_first_frame_releases_total",
    "First audio frames of replies, by what released them (uplink_quiet: the device's microphone stopped after `tts start`, it is speaking; fixed_gap: no such evidence, start_gap_ms; bound: still streaming after start_wait_max_ms)",
    ["how"],
)
FIRST_FRAME_HOLD = histogram(
    "xz_gateway_first_frame_hold_seconds",
    "How much later a reply's first frame went than the fixed start gap alone would have sent it (waiting for the device to enter speaking)",
    buckets=(0.001, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0),
)
