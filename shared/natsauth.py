"""NATS authorisation: one user per service, each allowed only its own subjects.

``render(passwords)`` writes a nats-server ``authorization`` block. Each service may publish and
subscribe only to what its job needs, and of the JetStream API only the calls its job makes on
its own streams, buckets and object stores (:func:`js_permissions`): information on the work
queues, pulling and acking its own stage's work, reading the buckets it reads, writing (``$KV.``
/ ``$O.`` subjects) only the ones it writes. No service may create, update, delete or purge a
stream (the manager excepted for purging objects of its own object stores), make a consumer on a
stream it may not read, or delete messages. The gateway, for example, may put user turns on
``xz.llm.*`` but cannot publish to ``xz.tts.*`` or ``xz.asr.*``, and no worker can publish uplink
audio or control messages as if it were the gateway, not even through a stream's ``republish``
or a consumer of its own. Replies to requests a service received are allowed
(``allow_responses``).

Streams, buckets and object stores are made by the ``admin`` user (the whole JetStream API, and
nothing else: no service subject), used only by ``xiaozhi nats-setup`` (:mod:`shared.natssetup`).

    xiaozhi nats-auth > auth.conf    # random passwords, printed per user on stderr
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from shared.agents import DEVICE_KEY_PREFIX
from shared.workqueue import stream_name

SERVICES = ("gateway", "vad", "asr", "llm", "tts", "tools", "manager")
# The identity that creates streams, buckets and object stores (xiaozhi nats-setup).
ADMIN = "admin"
USERS = SERVICES + (ADMIN,)

# Whatever the allow lists say, no service may do these (deny wins in nats-server).
_JS_ADMIN_DENIED = [
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.PEER.>",
    "$JS.API.STREAM.LEADER.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.DURABLE.>",
    "$JS.API.ACCOUNT.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
]
_PURGE_DENIED = ["$JS.API.STREAM.PURGE.>"]


def _kv_read(bucket: str) -> list[str]:
    """Open a KV bucket (its stream's info) and get keys (stream or direct get)."""
    s = f"KV_{bucket}"
    return [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>"]


def _kv_write(bucket: str) -> list[str]:
    """Put and delete keys (plain publishes to the bucket's subjects); open the bucket."""
    return [f"$KV.{bucket}.>", f"$JS.API.STREAM.INFO.KV_{bucket}"]


def _obj_write(bucket: str) -> list[str]:
    """Put objects: look up an existing one's meta (msg get), publish chunks and meta."""
    s = f"OBJ_{bucket}"
    return [f"$O.{bucket}.>", f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>"]


def _obj_read(bucket: str) -> list[str]:
    """Get and list objects: meta by msg get, then an ordered (ephemeral, flow-controlled)
    consumer on the stream's chunks or metas; the client finds the stream by its name list."""
    s = f"OBJ_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{s}",
        f"$JS.API.STREAM.MSG.GET.{s}",
        f"$JS.API.DIRECT.GET.{s}",
        f"$JS.API.DIRECT.GET.{s}.>",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{s}",
        f"$JS.API.CONSUMER.CREATE.{s}.>",
        f"$JS.FC.{s}.>",
    ]


def _work_info(prefix: str) -> list[str]:
    """Every service checks at start that the three work queues (and their consumers) exist."""
    out = []
    for stage in ("asr", "llm", "tts"):
        s = stream_name(prefix, stage)
        out += [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.CONSUMER.INFO.{s}.{stage}"]
    return out


def _work_pull(prefix: str, stage: str) -> list[str]:
    """Pull its own stage's work from the one durable consumer, and ack it."""
    s = stream_name(prefix, stage)
    return [f"$JS.API.CONSUMER.MSG.NEXT.{s}.{stage}", f"$JS.ACK.{s}.>"]


def js_permissions(prefix: str = "xz") -> dict[str, list[str]]:
    """``{service: [...]}``: the JetStream subjects (API and data) each service may publish to."""
    p = prefix
    agents, devices, memory, firmware, audio = f"{p}_agents", f"{p}_devices", f"{p}_memory", f"{p}_firmware", f"{p}_audio"
    bindings, codes = f"{p}_bindings", f"{p}_codes"
    info = _work_info(p)
    return {
        # Agents (greeting, voice), upgrade flags and firmware images for OTA; the shared
        # bindings and activation codes, read and written.
        "gateway": info + _kv_read(agents) + _kv_read(devices) + _obj_read(firmware) + _kv_read(bindings) + _kv_write(bindings) + _kv_read(codes) + _kv_write(codes)
        # A used code is purged (no delete marker keeps its place under the limit).
        + [f"$JS.API.STREAM.PURGE.KV_{codes}"],
        # Agents: does this device's engine stream (asr_svc/live.py)?
        "vad": info + _kv_read(agents),
        # Its work; agents (the language, the model); kept utterances into xz_audio.
        "asr": info + _work_pull(p, "asr") + _kv_read(agents) + _obj_write(audio),
        # Its work; agents; the devices' memory, read and written.
        "llm": info + _work_pull(p, "llm") + _kv_read(agents) + _kv_read(memory) + _kv_write(memory),
        "tts": info + _work_pull(p, "tts"),
        # Agents; change_role writes a device's own entry (dev.<hash>), never the default.
        "tools": info + _kv_read(agents) + [f"$KV.{agents}.{DEVICE_KEY_PREFIX}>"],
        # Writes agents and upgrade flags, re-syncs them; firmware in and out; plays and deletes
        # kept audio; forgets a device's memory (writes, never reads, xz_memory); unbinds devices
        # in the shared bindings (a compare-and-set: reads them too).
        "manager": info
        + _kv_read(bindings)
        + _kv_write(bindings)
        + _kv_read(agents)
        + _kv_write(agents)
        + _kv_read(devices)
        + _kv_write(devices)
        + _kv_write(memory)
        + _obj_read(firmware)
        + _obj_write(firmware)
        + _obj_read(audio)
        + _obj_write(audio)
        + [f"$JS.API.STREAM.PURGE.OBJ_{firmware}", f"$JS.API.STREAM.PURGE.OBJ_{audio}"],
    }


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of ``user``'s connections (``shared.bus`` sets it): each user may
    subscribe to its own inboxes only. With the common ``_INBOX.>`` any user could read every
    reply on the bus -- KV reads of memories, the work a pull consumer hands out, tool results."""
    return f"_INBOX_{user}"


def permissions(prefix: str = "xz") -> dict[str, dict[str, list[str]]]:
    """``{service: {"pub": [...], "sub": [...]}}`` for the subjects of ``shared/subjects.py``."""
    p = prefix
    js = js_permissions(prefix)

    def dedup(items: list[str]) -> list[str]:
        return list(dict.fromkeys(items))

    rules = {
        "gateway": {
            "pub": [f"{p}.audio.*", f"{p}.ctl.*", f"{p}.vad.claim", f"{p}.llm.*", f"{p}.say.*", f"{p}.session.end", f"{p}.registry.seen", f"{p}.gateway.unbind", f"{p}.gateway.opened", f"{p}.registry.online"],
            "sub": [f"{p}.out.*", f"{p}.device.*.mcp", f"{p}.vad.alive", f"{p}.gateway.bind", f"{p}.gateway.unbind", f"{p}.gateway.opened", f"{p}.registry.online", f"{p}.gateway.command"],
        },
        "vad": {
            # Streaming ASR: claim a worker, then the live packets of the utterance.
            "pub": [f"{p}.asr.*", f"{p}.out.*", f"{p}.vad.alive", f"{p}.asrs.claim", f"{p}.asrs.audio.*.*"],
            "sub": [f"{p}.vad.claim", f"{p}.audio.*", f"{p}.ctl.*"],
        },
        "asr": {
            # A streamed turn's text, asked of the worker that streamed it.
            "pub": [f"{p}.llm.*", f"{p}.out.*", f"{p}.asrs.result.*"],
            "sub": [f"{p}.asrs.claim", f"{p}.asrs.audio.*.*", f"{p}.asrs.result.*"],
        },
        "llm": {
            "pub": [f"{p}.tts.*", f"{p}.out.*", f"{p}.tools.list", f"{p}.tools.call.*", f"{p}.device.*.mcp", f"{p}.history"],
            "sub": [f"{p}.ctl.*", f"{p}.session.end"],
        },
        "tts": {
            "pub": [f"{p}.out.*"],
            "sub": [f"{p}.say.*"],
        },
        "tools": {
            # play_music: an intro sentence for TTS, then the song's frames to the gateway.
            "pub": [f"{p}.tts.*", f"{p}.out.*"],
            "sub": [f"{p}.tools.list", f"{p}.tools.call.*"],
        },
        "manager": {
            "pub": [f"{p}.gateway.bind", f"{p}.gateway.unbind", f"{p}.registry.online", f"{p}.gateway.command"],
            "sub": [f"{p}.registry.seen", f"{p}.history"],
        },
    }
    for service, rule in rules.items():
        rule["pub"] = dedup(rule["pub"] + js[service])
        rule["sub"] = rule["sub"] + [f"{inbox_prefix(service)}.>"]
    # The admin: the JetStream API (make streams, buckets, object stores), no service subject.
    rules[ADMIN] = {"pub": ["$JS.API.>"], "sub": [f"{inbox_prefix(ADMIN)}.>"]}
    return rules


def denied(user: str) -> list[str]:
    """Publish subjects refused to ``user`` whatever its allow list says."""
    if user == ADMIN:
        return []
    # The manager purges its own object stores, the gateway the codes it used; their allow
    # lists name exactly those streams.
    return _JS_ADMIN_DENIED + ([] if user in ("manager", "gateway") else _PURGE_DENIED)


def render(passwords: dict[str, str], prefix: str = "xz") -> str:
    """A nats-server config ``authorization`` block for these users."""
    rules = permissions(prefix)
    users = []
    for user, password in passwords.items():
        rule = rules[user]
        deny = denied(user)
        deny_part = f", deny: {json.dumps(deny)}" if deny else ""
        users.append(
            "    {\n"
            f"      user: {json.dumps(user)}\n"
            f"      password: {json.dumps(password)}\n"
            "      permissions: {\n"
            f"        publish: {{ allow: {json.dumps(rule['pub'])}{deny_part} }}\n"
            f"        subscribe: {{ allow: {json.dumps(rule['sub'])} }}\n"
            "        allow_responses: true\n"
            "      }\n"
            "    }"
        )
    return "authorization: {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"


def generate(prefix: str = "xz", services: tuple[str, ...] = USERS) -> tuple[str, dict[str, str]]:
    """A config with fresh random passwords (every service and the admin), and the passwords."""
    passwords = {service: secrets.token_urlsafe(24) for service in services}
    return render(passwords, prefix), passwords


# The layout of ``xiaozhi nats-auth --secrets-dir DIR --per-service-dirs`` (compose): one folder
# per container, so that each container can be given its folder alone (a volume subpath) --
# DIR/<user>/<user>.password for each user, DIR/nats/auth.conf for nats-server. Without it (the
# Kubernetes Secret, `xiaozhi up`) everything lies flat in DIR.
SERVER_DIR = "nats"


def secret_paths(folder: str | os.PathLike, per_service_dirs: bool = False) -> tuple[Path, dict[str, Path]]:
    """Where ``auth.conf`` and each user's password file lie in ``folder``, in either layout."""
    folder = Path(folder)
    if per_service_dirs:
        return folder / SERVER_DIR / "auth.conf", {user: folder / user / f"{user}.password" for user in USERS}
    return folder / "auth.conf", {user: folder / f"{user}.password" for user in USERS}


def read_passwords(folder: str | os.PathLike, per_service_dirs: bool = False) -> dict[str, str] | None:
    """Every user's password from ``folder``'s files (with its auth.conf); None if any is missing."""
    conf, files = secret_paths(folder, per_service_dirs)
    if not conf.is_file() or not all(path.is_file() for path in files.values()):
        return None
    passwords = {user: path.read_text().strip() for user, path in files.items()}
    return passwords if all(passwords.values()) else None


def _write_private(path: Path, text: str) -> None:
    """Written whole (created 0600, never readable by others), then renamed into place."""
    tmp = path.parent / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def write_secrets(
    folder: str | os.PathLike,
    prefix: str = "xz",
    private_folder: bool = False,
    per_service_dirs: bool = False,
    passwords: dict[str, str] | None = None,
) -> tuple[Path, dict[str, Path]]:
    """``auth.conf`` and one password file per user in ``folder`` (flat, or one folder each with
    ``per_service_dirs``), files mode 0600, per-service folders 0700 (and ``folder`` with
    ``private_folder``); fresh passwords unless ``passwords`` (every user's) are given, the
    config rendered from them. Returns auth.conf's path and each user's file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if private_folder:
        folder.chmod(0o700)
    if passwords is None:
        config, passwords = generate(prefix)
    else:
        if set(passwords) != set(USERS):
            raise ValueError(f"passwords for {sorted(passwords)}, not for {sorted(USERS)}")
        config = render(passwords, prefix)
    conf, files = secret_paths(folder, per_service_dirs)
    for path, text in [(conf, config)] + [(files[u], p + "\n") for u, p in passwords.items()]:
        if path.parent != folder:
            path.parent.mkdir(exist_ok=True)
            path.parent.chmod(0o700)
        _write_private(path, text)
    if per_service_dirs:
        # Files of the flat layout (a volume written before): every password, readable by
        # whatever mounts the folder whole; the ones that count are in the folders now.
        flat_conf, flat_files = secret_paths(folder)
        for path in [flat_conf, *flat_files.values()]:
            path.unlink(missing_ok=True)
    return conf, files
