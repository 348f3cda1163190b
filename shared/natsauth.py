"""NATS authorisation: one user per service, each allowed only its own subjects.

``render(passwords)`` writes a nats-server ``authorization`` block. Every service may use the
JetStream API (to make its stage's work queue and read its buckets) but not delete or purge
streams; beyond that it may publish and subscribe only to what its job needs. The gateway, for
example, may put user turns on ``xz.llm.*`` but cannot publish to ``xz.tts.*`` or
``xz.asr.*``, and no worker can publish uplink audio or control messages as if it were the
gateway. Replies to requests a service received are allowed (``allow_responses``).

    xiaozhi nats-auth > auth.conf    # random passwords, printed per service on stderr
"""

from __future__ import annotations

import json
import secrets

SERVICES = ("gateway", "vad", "asr", "llm", "tts", "tools", "manager")

_JS_ADMIN_DENIED = ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.CONSUMER.DELETE.>", "$JS.API.ACCOUNT.PURGE.>"]


def permissions(prefix: str = "xz") -> dict[str, dict[str, list[str]]]:
    """``{service: {"pub": [...], "sub": [...]}}`` for the subjects of ``shared/subjects.py``."""
    p = prefix
    js_api = ["$JS.API.>"]
    inbox = ["_INBOX.>"]

    def ack(stream: str) -> list[str]:
        return [f"$JS.ACK.{stream}.>"]

    stage = {s: f"{p}_{s}".upper() for s in ("asr", "llm", "tts")}
    return {
        "gateway": {
            "pub": [f"{p}.audio.*", f"{p}.ctl.*", f"{p}.vad.claim", f"{p}.llm.*", f"{p}.say.*", f"{p}.session.end", f"{p}.registry.seen"] + js_api,
            "sub": [f"{p}.out.*", f"{p}.device.*.mcp", f"{p}.vad.alive", f"{p}.gateway.bind", f"{p}.registry.online"] + inbox,
        },
        "vad": {
            "pub": [f"{p}.asr.*", f"{p}.out.*", f"{p}.vad.alive"] + js_api,
            "sub": [f"{p}.vad.claim", f"{p}.audio.*", f"{p}.ctl.*"] + inbox,
        },
        "asr": {
            "pub": [f"{p}.llm.*", f"{p}.out.*", f"$O.{p}_audio.>"] + ack(stage["asr"]) + js_api,
            "sub": inbox,
        },
        "llm": {
            "pub": [f"{p}.tts.*", f"{p}.out.*", f"{p}.tools.list", f"{p}.tools.call.*", f"{p}.device.*.mcp", f"$KV.{p}_memory.>", f"{p}.history"]
            + ack(stage["llm"]) + js_api,
            "sub": [f"{p}.ctl.*", f"{p}.session.end"] + inbox,
        },
        "tts": {
            "pub": [f"{p}.out.*"] + ack(stage["tts"]) + js_api,
            "sub": [f"{p}.say.*"] + inbox,
        },
        "tools": {
            # play_music: an intro sentence for TTS, then the song's frames to the gateway.
            "pub": [f"{p}.tts.*", f"{p}.out.*"] + js_api,
            "sub": [f"{p}.tools.list", f"{p}.tools.call.*"] + inbox,
        },
        "manager": {
            "pub": [f"$KV.{p}_agents.>", f"$KV.{p}_config.>", f"$KV.{p}_devices.>", f"$O.{p}_firmware.>", f"$O.{p}_audio.>", f"{p}.gateway.bind", f"{p}.registry.online"] + js_api,
            "sub": [f"{p}.registry.seen", f"{p}.history"] + inbox,
        },
    }


def render(passwords: dict[str, str], prefix: str = "xz") -> str:
    """A nats-server config ``authorization`` block for these services' users."""
    rules = permissions(prefix)
    users = []
    for service, password in passwords.items():
        rule = rules[service]
        users.append(
            "    {\n"
            f"      user: {json.dumps(service)}\n"
            f"      password: {json.dumps(password)}\n"
            "      permissions: {\n"
            f"        publish: {{ allow: {json.dumps(rule['pub'])}, deny: {json.dumps(_JS_ADMIN_DENIED)} }}\n"
            f"        subscribe: {{ allow: {json.dumps(rule['sub'])} }}\n"
            "        allow_responses: true\n"
            "      }\n"
            "    }"
        )
    return "authorization: {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"


def generate(prefix: str = "xz", services: tuple[str, ...] = SERVICES) -> tuple[str, dict[str, str]]:
    """A config with fresh random passwords, and the passwords."""
    passwords = {service: secrets.token_urlsafe(24) for service in services}
    return render(passwords, prefix), passwords
