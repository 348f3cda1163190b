"""The gateway service: WebSocket for devices on :8000, HTTP (OTA) on :8003."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import ssl
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from gateway import auth, ota, protocol
from gateway import metrics as m
from gateway.fwstore import FirmwareCatalog
from gateway.httpguard import guarded
from gateway.limits import ClientAddress, RateLimiter
from gateway.session import DeviceSession
from gateway.wsconn import DeviceConnection
from shared import bindings as binding_store
from shared.agents import AgentDirectory
from shared.bindings import BOUND, OTHER, BindingStore, StoreUnavailable
from shared.settings import Settings
from shared.subjects import Subjects

# The firmware's ``User-Agent: <board-name>/<version>`` (system_info.cc), not a library's
# ("Python/3.12 websockets/14.1").
FIRMWARE_AGENT = re.compile(r"[a-z0-9.-]{1,100}/(?P<version>\d+(?:\.\d+){1,3}(?:-[A-Za-z0-9._-]{1,30})?)")

log = logging.getLogger("gateway.server")


def server_tls(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """wss:// and https:// when a certificate is configured."""
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def peer_ip(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if address else "unknown"


def device_headers(request: Request) -> dict[str, str]:
    """Device-Id, Client-Id, Authorization and Protocol-Version, from headers or the query.

    Browsers cannot set headers, so when ``Device-Id`` is absent they come from the query
    string (protocol.md §2.3).
    """
    headers = request.headers
    found = {
        "device-id": headers.get("Device-Id", ""),
        "client-id": headers.get("Client-Id", ""),
        "authorization": headers.get("Authorization", ""),
        "protocol-version": headers.get("Protocol-Version", ""),
    }
    if not found["device-id"]:
        query = parse_qs(urlsplit(request.path).query)
        for key in found:
            if not found[key] and query.get(key):
                found[key] = query[key][0]
    return found


@dataclass(frozen=True)
class Admission:
    """What the handshake established about a connection."""

    ip: str  # the client's address (X-Forwarded-For from a trusted proxy)
    # The device proved who it is: a valid token (or the allow-list), or the bound pair.
    proved: bool
    # Its word may reach the manager (seen events): proved, or nothing can be checked at all.
    trusted: bool
    # The handshake found this pair bound (binding on): a later check that finds it unbound,
    # or unbound since the session began, closes the session.
    bound: bool = False
    at: float = 0.0  # when the handshake looked (epoch seconds)


class Gateway:
    """Accepts devices, and bridges each connection to the NATS pipeline."""

    name = "gateway"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gw = settings.gateway
        self.subjects = Subjects(settings.nats.prefix)
        self.agents: AgentDirectory | None = None  # devices' agents (greetings), from start()
        self.nc: NATS | None = None
        self._ws_server: Server | None = None
        self._http_runner: web.AppRunner | None = None
        self.sessions: set[DeviceSession] = set()
        # VAD workers' last heartbeat (monotonic), by worker id.
        self._vad_seen: dict[str, float] = {}
        self._vad_watch: asyncio.Task | None = None
        self._alive_sub = None
        self._bind_sub = None
        self._unbind_sub = None
        self._online_sub = None
        self._opened_sub = None
        self._command_sub = None
        self._recheck: asyncio.Task | None = None
        self.bindings: BindingStore | None = None
        # Tokens of a device issued before this time (its last unbind) are refused.
        self._not_before: dict[str, float] = {}
        # What _process_request learnt about a connection, for _handle.
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, Admission] = weakref.WeakKeyDictionary()
        # Sessions admitted while binding is on: their admission and when (epoch seconds), for
        # the periodic re-check against the shared store.
        self._session_admissions: dict[DeviceSession, tuple[Admission, float]] = {}
        self._ota_info: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._http_server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._draining = False
        # SIGTERM: replies in flight may finish (gateway.drain_s), then the process exits.
        self.stop_timeout_s = self.gw.drain_s + 5
        limits = self.gw.rate_limits
        self._conn_ip = RateLimiter(limits.connections_per_minute_per_ip)
        self._conn_device = RateLimiter(limits.connections_per_minute_per_device)
        self._auth_fail_ip = RateLimiter(limits.auth_failures_per_minute_per_ip)
        self._client_address = ClientAddress(self.gw.trusted_proxies)
        self._turn_ip = RateLimiter(limits.turns_per_minute_per_ip)
        self._turn_device = RateLimiter(limits.turns_per_minute_per_device)
        m.TURNS_IN_FLIGHT.set_function(lambda: sum(1 for s in list(self.sessions) if s.turn_in_flight))
        self.ws_port: int | None = None
        self.http_port: int | None = None
        self.auth_key = self.gw.auth.key or secrets.token_hex(16)
        if not self.gw.auth.key:
            log.warning("no auth key configured: using a random one, tokens will not survive a restart")
        # Raises on a missing or bad file: checking chip keys must not silently turn off.
        self.device_keys = auth.load_device_keys(self.gw.auth.device_keys_file)
        if self.gw.auth.require_device_keys:
            if not self.device_keys.macs:
                # No device could ever activate: a configuration mistake, not a policy.
                raise ValueError("gateway.auth.require_device_keys is on but gateway.auth.device_keys_file lists no chip with its mac")
            unmatched = len(self.device_keys.keys) - len(self.device_keys.macs)
            if unmatched:
                log.warning(
                    "chip keys without a mac: with require_device_keys those chips cannot activate",
                    extra={"fields": {"keys_without_mac": unmatched}},
                )
        why = ota.timezone_warning(self.gw)
        if why:
            log.warning(why, extra={"fields": {"setting": "gateway.timezone_offset_minutes"}})
        if self.gw.auth.enabled and not self.gw.binding:
            log.warning(
                "device auth is on but binding is off: OTA gives tokens to allow-listed devices only, so no other device can connect",
                extra={"fields": {"allowed_devices": len(self.gw.auth.allowed_devices)}},
            )

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self.agents = AgentDirectory(nc, self.subjects.kv_agents)
        self._tls = server_tls(self.gw.tls_cert_file, self.gw.tls_key_file)
        self._alive_sub = await nc.subscribe(self.subjects.vad_alive, cb=self._on_vad_alive)
        self._vad_watch = asyncio.create_task(self._watch_vad())
        self._ws_server = await serve(
            self._handle,
            self.gw.host,
            self.gw.ws_port,
            process_request=self._process_request,
            max_size=self.gw.max_ws_message_bytes,
            compression=None,
            ping_interval=self.gw.ping_interval_s,
            ping_timeout=self.gw.ping_interval_s,
            open_timeout=10,
            # Devices drop TCP rather than answer a close frame: do not wait long for one.
            close_timeout=2,
            ssl=self._tls,
            # Text frames with raw non-UTF-8 bytes (cJSON passes them through) do not close.
            create_connection=DeviceConnection,
        )
        self.ws_port = self._ws_server.sockets[0].getsockname()[1] if self._ws_server.sockets else self.gw.ws_port
        if self.gw.binding:
            await self._open_bindings(nc)
            # The manager's "bind by code": codes are in the shared store, so any one gateway
            # answers (a queue group).
            self._bind_sub = await nc.subscribe(self.subjects.gateway_bind, queue="gateways", cb=self._on_bind)
            self._recheck = asyncio.create_task(self._recheck_sessions())
        # Unbinds go to every gateway (no queue group): each drops the binding, revokes the
        # device's tokens and closes its sessions.
        self._unbind_sub = await nc.subscribe(self.subjects.gateway_unbind, cb=self._on_unbind)
        self._online_sub = await nc.subscribe(self.subjects.online, cb=self._on_online)
        self._opened_sub = await nc.subscribe(self.subjects.gateway_opened, cb=self._on_opened)
        # The owner's notices and reboots: every gateway hears them, the one holding the device answers.
        self._command_sub = await nc.subscribe(self.subjects.gateway_command, cb=self._on_command)
        catalog = FirmwareCatalog(nc, self.subjects.obj_firmware, self.subjects.kv_devices, ttl_s=self.gw.firmware_cache_s)
        app = ota.make_app(
            self.gw, self.auth_key, self.bindings, on_seen=self._publish_seen, catalog=catalog,
            device_keys=self.device_keys, not_before=self._not_before.get, agents=self.agents,
            session_open=self._session_open,
        )
        # Idle keep-alive connections close after 15 s (aiohttp's default is an hour).
        self._http_runner = web.AppRunner(app, access_log=None, keepalive_timeout=15)
        await self._http_runner.setup()
        # Not web.TCPSite: the protocol factory is wrapped with a deadline on request heads.
        self._http_server = await asyncio.get_running_loop().create_server(
            guarded(self._http_runner.server, self.gw.http_header_timeout_s, lambda: m.DROPPED.labels("gateway", "http_head_timeout").inc()),  # type: ignore[arg-type]
            self.gw.host,
            self.gw.http_port,
            ssl=self._tls,
            reuse_address=True,
        )
        self.http_port = self._http_server.sockets[0].getsockname()[1]
        log.info(
            "listening",
            extra={"fields": {"ws": f"{self.gw.host}:{self.ws_port}", "http": f"{self.gw.host}:{self.http_port}", "websocket_url": ota.websocket_url(self.gw)}},
        )

    def _background(self, coro) -> None:
        """Run ``coro`` on its own, holding a reference so it is not collected mid-way."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _publish_seen(self, event: dict[str, Any], trusted: bool = True) -> None:
        """Tell the manager a device was seen (OTA, connected, disconnected); best effort.

        Only ``trusted`` events (the bound pair, an authenticated device) are published: anyone
        else could set the board, firmware and last-seen the console shows."""
        client_id = event.pop("client_id", None)
        if event.get("event") == "ota":
            # Board and firmware of the pairs that asked OTA lately: a bind by code answers with
            # those of the pair whose code it was.
            key = f"{event['device_id'].lower()}|{client_id}"
            self._ota_info[key] = {k: event.get(k) for k in ("board", "firmware_version")}
            self._ota_info.move_to_end(key)
            while len(self._ota_info) > 10000:
                self._ota_info.popitem(last=False)
        if not trusted:
            return
        if self.nc is None or self.nc.is_closed:
            return
        event = {**event, "at": time.time()}

        async def send() -> None:
            try:
                await self.nc.publish(self.subjects.device_seen, json.dumps(event).encode())  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - NATS down: the next event says the same
                m.ERRORS.labels("gateway", "seen_publish").inc()
                log.debug("device-seen event not published: %s", exc)

        self._background(send())

    def _firmware_version(self, ws: ServerConnection, device_id: str, client_id: str) -> str | None:
        """What the device runs, until its MCP serverInfo says: the handshake's ``User-Agent:
        <board>/<version>`` when it sends one, else what its last OTA request here named."""
        agent = (ws.request.headers.get("User-Agent") or "") if ws.request else ""
        found = FIRMWARE_AGENT.fullmatch(agent.strip())
        if found:
            return found["version"]
        return (self._ota_info.get(f"{device_id.lower()}|{client_id}") or {}).get("firmware_version")

    async def _session_open(self, device_id: str, session_id: str) -> bool:
        """Whether the device's session is open here or on another gateway replica (asked as the
        manager asks who is online: only gateways holding the device answer). No answer within
        0.5 s (none has it, or NATS is down): not open, so its vision token is refused."""
        device = device_id.lower()
        if any(s.session_id == session_id and s.device_id.lower() == device for s in list(self.sessions)):
            return True
        if self.nc is None or self.nc.is_closed:
            return False
        try:
            reply = await self.nc.request(self.subjects.online, json.dumps({"device_ids": [device]}).encode(), timeout=0.5)
            found = json.loads(reply.data).get("online") or []
        except Exception:  # noqa: BLE001 - no gateway has it, or NATS does not answer
            return False
        return any(isinstance(f, dict) and f.get("session_id") == session_id and f.get("device_id") == device for f in found)

    async def _on_online(self, msg: Msg) -> None:
        """``{"device_ids": [...]}``: answer with those that have a session here (if any)."""
        try:
            wanted = {str(d).lower() for d in json.loads(msg.data)["device_ids"]}
        except (ValueError, KeyError, TypeError):
            m.DROPPED.labels("gateway", "bad_online_request").inc()
            return
        if not msg.reply:
            return
        found = [
            {"device_id": s.device_id.lower(), "session_id": s.session_id, "since": s.connected_at}
            for s in list(self.sessions)
            if s.device_id.lower() in wanted
        ]
        if found:
            await msg.respond(json.dumps({"online": found}).encode())

    async def _on_command(self, msg: Msg) -> None:
        """``{"device_id", "command": "notice", "status", "message", "emotion"}`` or ``{"device_id",
        "command": "reboot"}`` from the manager: sent to the device's newest session here, answered
        ``{"delivered": true, "device_id", "session_id"}``. A gateway without a session of the
        device stays silent (the manager's request times out: offline)."""
        try:
            request = json.loads(msg.data)
            device_id, command = request["device_id"], request["command"]
            if not isinstance(device_id, str) or not 0 < len(device_id) <= 200 or command not in ("notice", "reboot"):
                raise TypeError("device_id or command")
            fields: dict[str, str] = {}
            if command == "notice":
                fields = {k: request[k] for k in ("status", "message", "emotion")}
                if not all(isinstance(v, str) and 0 < len(v) <= 1000 for v in fields.values()):
                    raise TypeError("notice fields")
        except (ValueError, KeyError, TypeError, AttributeError):
            m.DROPPED.labels("gateway", "bad_command_request").inc()
            return
        held = [s for s in list(self.sessions) if s.device_id.lower() == device_id.lower() and s.ready]
        if not held or not msg.reply:
            return
        session = max(held, key=lambda s: s.connected_at)
        try:
            # Bounded: a device that stopped reading must not hold up the commands for the others.
            await asyncio.wait_for(session.send_command(command, fields), 2.0)
        except Exception as exc:  # noqa: BLE001 - the socket went away meanwhile: offline after all
            m.DEVICE_COMMANDS.labels(command, "failed").inc()
            log.info("owner's command not sent: %s", type(exc).__name__, extra={"fields": {"device_id": device_id, "session_id": session.session_id, "command": command}})
            return
        m.DEVICE_COMMANDS.labels(command, "delivered").inc()
        await msg.respond(json.dumps({"delivered": True, "device_id": device_id.lower(), "session_id": session.session_id}).encode())

    async def _open_bindings(self, nc: NATS) -> None:
        """The shared binding store: its buckets made where missing (where this NATS user may;
        ``xiaozhi nats-setup`` makes them otherwise), and a binding file of an earlier version
        (``gateway.binding_db``, SQLite, per gateway) imported once."""
        self.bindings = BindingStore(nc, self.settings.nats.prefix, self.gw.code_ttl_s, self.gw.max_pending_codes)
        try:
            await asyncio.wait_for(
                binding_store.ensure_buckets(nc, self.settings.nats.prefix, self.gw.code_ttl_s, self.gw.max_pending_codes, self.settings.work.replicas), 3.0
            )
        except Exception as exc:  # noqa: BLE001 - not this user's to make: nats-setup's
            log.warning("binding buckets not made or checked here (run `xiaozhi nats-setup`): %s", type(exc).__name__)
        legacy = Path(self.gw.binding_db) if self.gw.binding_db else None
        if legacy is not None and legacy.is_file():
            try:
                imported = await self.bindings.import_legacy(str(legacy))
                legacy.rename(legacy.with_name(legacy.name + ".imported"))
                log.info("bindings imported into the shared store", extra={"fields": {"file": str(legacy), "records": imported}})
            except Exception as exc:  # noqa: BLE001 - keep the file; try again at the next start
                m.ERRORS.labels("gateway", "binding_import").inc()
                log.error("bindings file not imported, kept for the next start: %s", exc, extra={"fields": {"file": str(legacy)}})

    async def _on_bind(self, msg: Msg) -> None:
        """``{"code", "owner", "owner_id"?, "commit"?}``: the pair waiting with that code,
        bound to the owner when ``commit`` (default true; the manager asks first without, checks
        its own records, then commits). Answers ``{"device_id", "client_id", "board",
        "firmware_version", "committed"}``, ``{"device_id", "conflict": true}``, ``{"found":
        false}`` or ``{"error": "unavailable"}``."""
        try:
            request = json.loads(msg.data)
            code, owner = str(request["code"]).strip(), str(request["owner"])
            owner_id = request.get("owner_id")
            if owner_id is not None and (isinstance(owner_id, bool) or not isinstance(owner_id, int)):
                raise TypeError("owner_id")
            commit = request.get("commit", True) is not False
        except (ValueError, KeyError, TypeError, AttributeError):
            m.DROPPED.labels("gateway", "bad_bind_request").inc()
            return
        if self.bindings is None or not msg.reply:
            return
        try:
            result = await self.bindings.bind(code, owner, owner_id, commit=commit)
        except StoreUnavailable as exc:
            m.ERRORS.labels("gateway", "binding_store").inc()
            log.warning("bind failed: the binding store is unavailable: %s", exc)
            await msg.respond(json.dumps({"error": "unavailable"}).encode())
            return
        if result is None:
            await msg.respond(json.dumps({"found": False}).encode())
            return
        if result.conflict:
            # The MAC is bound to another owner's pair: nothing changed (the manager says 409).
            m.DROPPED.labels("gateway", "bind_conflict").inc()
            log.warning("bind refused: the device is bound to another owner", extra={"fields": {"device_id": result.device_id, "owner": owner}})
            await msg.respond(json.dumps({"device_id": result.device_id, "conflict": True}).encode())
            return
        if result.committed:
            log.info("device bound", extra={"fields": {"device_id": result.device_id, "client_id": result.client_id, "owner": owner, "replaced": result.replaced}})
            if result.replaced:
                # The owner's device came back with a new Client-Id: the old pair's sessions
                # end here now (other gateways find out at their next check, or by the event).
                await self._close_sessions(result.device_id, keep_client=result.client_id)
                await self.nc.publish(self.subjects.gateway_unbind, json.dumps({"device_id": result.device_id, "stored": True, "keep_client": result.client_id}).encode())  # type: ignore[union-attr]
        info = self._ota_info.get(f"{result.device_id}|{result.client_id}", {})
        await msg.respond(json.dumps({"device_id": result.device_id, "client_id": result.client_id, "committed": result.committed, **info}).encode())

    async def _close_sessions(self, device_id: str, keep_client: str | None = None) -> int:
        """Close the device's sessions here (but those of pair ``keep_client``)."""
        device_id = device_id.lower()
        doomed = [s for s in list(self.sessions) if s.device_id.lower() == device_id and (keep_client is None or s.client_id != keep_client)]
        await asyncio.gather(*(s.close_for_unbind() for s in doomed), return_exceptions=True)
        return len(doomed)

    async def _revoke(self, device_id: str, keep_client: str | None = None) -> int:
        """Refuse the device's tokens issued until now and close its sessions here."""
        device_id = device_id.lower()
        if keep_client is None:
            self._not_before[device_id] = max(self._not_before.get(device_id, 0.0), time.time())
            while len(self._not_before) > 100_000:
                self._not_before.pop(next(iter(self._not_before)))
        return await self._close_sessions(device_id, keep_client)

    async def _on_unbind(self, msg: Msg) -> None:
        """``{"device_id", "stored"?}`` (the manager unbound it): revoke its tokens, close its
        sessions, and -- unless the sender has already written the shared store (``stored``)
        -- unbind it there; answer when asked."""
        try:
            request = json.loads(msg.data)
            device_id = request["device_id"]
            if not isinstance(device_id, str) or not 0 < len(device_id) <= 200:
                raise TypeError("device_id")
            keep_client = request.get("keep_client")
            if keep_client is not None and not isinstance(keep_client, str):
                raise TypeError("keep_client")
            stored = request.get("stored") is True
        except (ValueError, KeyError, TypeError, AttributeError):
            m.DROPPED.labels("gateway", "bad_unbind_request").inc()
            return
        removed = False
        if self.bindings is not None and not stored:
            try:
                removed = await self.bindings.unbind(device_id)
            except StoreUnavailable as exc:
                m.ERRORS.labels("gateway", "binding_store").inc()
                log.warning("unbind not stored: the binding store is unavailable: %s", exc, extra={"fields": {"device_id": device_id}})
        closed = await self._revoke(device_id, keep_client)
        fields = {"device_id": device_id, "sessions_closed": closed, "store": "written by the sender" if stored else ("unbound" if removed else "was not bound")}
        if keep_client is not None:
            fields["replaced_by"] = keep_client
        log.info("device unbound", extra={"fields": fields})
        if msg.reply:
            await msg.respond(json.dumps({"device_id": device_id.lower(), "unbound": removed, "sessions_closed": closed}).encode())

    async def _announce_opened(self, device_id: str, session_id: str, at: float) -> None:
        try:
            await self.nc.publish(self.subjects.gateway_opened, json.dumps({"device_id": device_id.lower(), "session_id": session_id, "at": at}).encode())  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - NATS away: the stale socket times out by itself
            log.debug("session-opened event not published: %s", exc)

    async def _on_opened(self, msg: Msg) -> None:
        """``{"device_id", "session_id", "at"}``: a proved session of the device opened on some
        gateway; close this gateway's older sessions of it (4002)."""
        try:
            event = json.loads(msg.data)
            device_id, session_id, at = str(event["device_id"]).lower(), str(event["session_id"]), float(event["at"])
        except (ValueError, KeyError, TypeError, AttributeError):
            m.DROPPED.labels("gateway", "bad_opened_event").inc()
            return
        older = [s for s in list(self.sessions) if s.device_id.lower() == device_id and s.session_id != session_id and s.connected_at < at]
        if older:
            log.info("the device opened a session on another gateway: closing the older one", extra={"fields": {"device_id": device_id, "closed": len(older), "by_session": session_id}})
            for old in older:
                self._background(old.close_replaced())

    async def _recheck_sessions(self) -> None:
        """Every ``gateway.binding_recheck_s``, and at once when NATS is back after an outage:
        each session is checked against the shared store, and closed when its MAC was unbound
        since it began, or is now bound to another pair, or its pair is no longer bound. An
        unbind this gateway did not hear of (it was away) is so repaired."""
        reconnects = self.nc.stats.get("reconnects", 0) if self.nc is not None else 0
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if self.nc is None or not self.nc.is_connected or self.bindings is None:
                continue
            now_reconnects = self.nc.stats.get("reconnects", 0)
            if now_reconnects == reconnects and time.monotonic() - last < self.gw.binding_recheck_s:
                continue
            reconnects, last = now_reconnects, time.monotonic()
            try:
                closed = await self._recheck_once()
            except Exception as exc:  # noqa: BLE001 - NATS went again: next round
                log.info("binding re-check not finished: %s", type(exc).__name__)
                continue
            if closed:
                log.info("sessions closed by the binding re-check", extra={"fields": {"closed": closed}})

    async def _recheck_once(self) -> int:
        assert self.bindings is not None
        checked = [(s, a) for s, a in list(self._session_admissions.items()) if s in self.sessions]
        closed = 0
        for start in range(0, len(checked), 64):
            chunk = checked[start : start + 64]
            lookups = await asyncio.gather(*(self.bindings.lookup(s.device_id, s.client_id) for s, _ in chunk))
            for (session, (admission, admitted_at)), found in zip(chunk, lookups):
                stale = found.state == OTHER or (admission.bound and found.state != BOUND) or found.not_before > admitted_at
                if stale:
                    m.DROPPED.labels("gateway", "session_unbound").inc()
                    log.info("session closed: its binding changed", extra={"fields": {"device_id": session.device_id, "session_id": session.session_id, "state": found.state}})
                    self._background(session.close_for_unbind())
                    closed += 1
        return closed

    async def _on_vad_alive(self, msg: Msg) -> None:
        try:
            beat = json.loads(msg.data)
            worker = str(beat["worker_id"])
        except Exception:  # noqa: BLE001
            m.DROPPED.labels("gateway", "bad_heartbeat").inc()
            return
        if beat.get("leaving"):
            self._vad_seen.pop(worker, None)
            for session in list(self.sessions):
                if session.vad_owner == worker:
                    self._background(session.reclaim_vad("leaving"))
            return
        self._vad_seen[worker] = time.monotonic()

    async def _watch_vad(self) -> None:
        """Every second: sessions whose VAD worker went silent are claimed again."""
        nats_back_at: float | None = None
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            # Judge no worker while NATS is away, nor until heartbeats had time to come back
            # after it returns: a NATS restart is not the death of every VAD.
            if self.nc is None or not self.nc.is_connected:
                nats_back_at = None
                continue
            if nats_back_at is None:
                nats_back_at = now
            if now - nats_back_at < self.gw.vad_dead_after_s + 1:
                continue
            for worker in [w for w, seen in self._vad_seen.items() if now - seen > 60]:
                del self._vad_seen[worker]
            for session in list(self.sessions):
                if session.needs_vad(now, self._vad_seen, self.gw.vad_dead_after_s):
                    self._background(session.reclaim_vad("dead"))

    async def stop(self) -> None:
        """Drain: refuse new devices, let each session finish the reply it is playing (to its
        `tts stop`), then close it with 1001; after ``drain_s`` close whatever is left, a reply
        still playing ended with `tts stop` first. A WebSocket device does not reconnect by itself:
        it goes idle, and its next wake word connects, through the load balancer, elsewhere."""
        self._draining = True
        started = time.monotonic()
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        log.info("draining", extra={"fields": {"sessions": len(self.sessions), "deadline_s": self.gw.drain_s}})
        while self.sessions and time.monotonic() - started < self.gw.drain_s:
            for session in [s for s in list(self.sessions) if not s.busy]:
                self._background(session.close_for_restart())
            await asyncio.sleep(0.2)
        left = list(self.sessions)
        if left:
            log.warning("drain deadline passed, closing sessions", extra={"fields": {"sessions": len(left)}})
        await asyncio.gather(*(s.close_for_restart() for s in left), return_exceptions=True)
        if self._vad_watch is not None:
            self._vad_watch.cancel()
        if self._recheck is not None:
            self._recheck.cancel()
        if self._ws_server is not None:
            try:
                await asyncio.wait_for(self._ws_server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        if self._http_server is not None:
            self._http_server.close()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        log.info("drained", extra={"fields": {"seconds": round(time.monotonic() - started, 2)}})

    def health(self) -> dict[str, Any]:
        # Draining: not ready, so the load balancer sends new devices elsewhere.
        return {
            "ok": self._ws_server is not None and not self._draining,
            "sessions": len(self.sessions),
            "draining": self._draining,
            "tasks": len(asyncio.all_tasks()),
        }

    def admit_turn(self, device_id: str, ip: str) -> bool:
        """A user turn is starting: within this device's and this address's turn limits?"""
        now = time.monotonic()
        device_ok = self._turn_device.allow(device_id, now)
        ip_ok = self._turn_ip.allow(ip, now)
        return device_ok and ip_ok

    def queue_depths(self) -> dict[str, int]:
        """In-process queues, summed over sessions (sampled into ``xz_queue_depth``)."""
        sessions = list(self.sessions)
        return {
            "uplink": sum(s.uplink_pending for s in sessions),
            "downlink": sum(s.downlink.pending for s in sessions),
        }

    def _auth_failed(self, connection: ServerConnection, ip: str, device_id: str, reason: str, text: str) -> Response:
        """A failed authentication: 401, counted against the address; 429 once the address has
        failed too often this minute."""
        m.AUTH_FAILURES.labels(reason).inc()
        now = time.monotonic()
        if self._auth_fail_ip.exhausted(ip, now):
            m.REJECTED.labels("auth_failures").inc()
            log.info("address refused after failed authentications", extra={"fields": {"device_id": device_id[:80], "ip": ip, "reason": reason}})
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many failed authentications, slow down\n")
        self._auth_fail_ip.allow(ip, now)
        log.info("handshake rejected", extra={"fields": {"device_id": device_id[:80], "ip": ip, "reason": reason}})
        return connection.respond(HTTPStatus.UNAUTHORIZED, f"unauthorized: {text}\n")

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP on the WebSocket port; reject bad handshakes with an HTTP status.

        Order matters: the device's own connection limit is taken only once the handshake proved
        it may speak for that device, so nobody can use it up with the device's id (issue 14,
        vuln 10). An address that failed authentication too often this minute gets 429 for
        every handshake that fails again; one that authenticates is still admitted, so devices
        sharing an address with an attacker (a home NAT, an ingress) stay online."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(HTTPStatus.OK, "Server is running\n")
        found = device_headers(request)
        if self._draining:
            m.REJECTED.labels("draining").inc()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server restarting, reconnect\n")
        if len(self.sessions) >= self.gw.max_sessions:
            # Admission control: this replica is full; the device retries (elsewhere, behind a
            # load balancer).
            m.REJECTED.labels("full").inc()
            log.warning("session limit reached, connection refused", extra={"fields": {"max_sessions": self.gw.max_sessions}})
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server full, try again later\n")
        now = time.monotonic()
        ip = self._client_address(peer_ip(connection), request.headers.get("X-Forwarded-For"))
        try:
            protocol.parse_protocol_version(found["protocol-version"] or None)
        except protocol.ProtocolError:
            m.DROPPED.labels("gateway", "bad_protocol_version").inc()
            return connection.respond(HTTPStatus.BAD_REQUEST, "unsupported Protocol-Version\n")
        device_id = found["device-id"]
        client_id = found["client-id"] or device_id
        if device_id:
            problem = ota.device_id_problem(device_id, for_ota=False)
            if problem is not None or (found["client-id"] and not ota.CLIENT_ID.fullmatch(found["client-id"])):
                m.DROPPED.labels("gateway", problem or "bad_client_id").inc()
                return connection.respond(HTTPStatus.BAD_REQUEST, "bad Device-Id or Client-Id\n")
        found_binding = None
        if self.bindings is not None and device_id:
            try:
                found_binding = await self.bindings.lookup(device_id, client_id)
            except StoreUnavailable as exc:
                # Fail closed: whether this pair may speak for the device cannot be told.
                m.REJECTED.labels("binding_store").inc()
                log.warning("handshake refused: the binding store is unavailable: %s", exc, extra={"fields": {"device_id": device_id[:80]}})
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server busy, try again later\n")
        proved = False
        if self.gw.auth.enabled:
            revoked = self._not_before.get(device_id.lower())
            if found_binding is not None and found_binding.not_before:
                revoked = max(revoked or 0.0, found_binding.not_before)
            result = auth.verify_device(
                self.auth_key,
                found["authorization"],
                client_id,
                device_id,
                int(time.time()),
                self.gw.auth.expire_seconds,
                frozenset(self.gw.auth.allowed_devices),
                not_before=revoked,
            )
            if not result.ok:
                # Rejected in the handshake: the firmware reports it at once (protocol.md §2.4).
                return self._auth_failed(connection, ip, device_id, result.reason, result.reason)
            # An allow-listed id needs no token, so it proves nothing about who connects.
            proved = result.reason != "allow-listed"
        if found_binding is not None:
            if found_binding.state == OTHER:
                # The MAC is bound to another Client-Id: whoever this is, it is not the device
                # its owner bound, and must not get its agent, memory or tools.
                return self._auth_failed(connection, ip, device_id, "bound to another client", "this device is bound to another Client-Id")
            proved = proved or found_binding.state == BOUND
        # The address's connection budget is paid only by handshakes that prove nothing (failed
        # ones pay the auth-failure budget above): someone behind the device's own NAT cannot use
        # it up to keep the proved device out. A proved device is limited per device below.
        if not proved and not self._conn_ip.allow(ip, now):
            m.REJECTED.labels("rate_limited").inc()
            log.info("connection rate limited", extra={"fields": {"device_id": device_id[:80], "ip": ip, "by": "ip"}})
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections, slow down\n")
        if not self._conn_device.allow(f"{device_id.lower()}|{client_id}" if device_id else ip, now):
            m.REJECTED.labels("rate_limited").inc()
            log.info("connection rate limited", extra={"fields": {"device_id": device_id[:80], "ip": ip, "by": "device"}})
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections, slow down\n")
        # Without auth and binding nothing can be checked: events are passed on as before.
        bound = found_binding is not None and found_binding.state == BOUND
        self._admitted[connection] = Admission(ip, proved, proved or (not self.gw.auth.enabled and self.bindings is None), bound, time.time())
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        found = device_headers(ws.request)  # type: ignore[arg-type]
        device_id = found["device-id"]
        if not device_id:
            # protocol.md §2.3: no identity at all: say so and close.
            await ws.send("No Device-Id: send the Device-Id header or ?device-id= in the URL")
            await ws.close(1008, "missing device id")
            return
        admission = self._admitted.pop(ws, None) or Admission(peer_ip(ws), False, False)
        version = protocol.parse_protocol_version(found["protocol-version"] or None)
        assert self.nc is not None
        session = DeviceSession(
            ws, self.nc, self.gw, self.subjects, device_id, found["client-id"] or device_id, version,
            auth_key=self.auth_key, vision_url=ota.vision_url(self.gw, self.http_port, ws.request.headers.get("Host")), work=self.settings.work,  # type: ignore[union-attr]
            admit_turn=lambda: self.admit_turn(device_id, admission.ip),
            agents=self.agents, firmware_version=self._firmware_version(ws, device_id, found["client-id"] or device_id),
        )
        # One session per device: a proved session (valid token, or the bound pair) closes the
        # device's older ones. A device that lost power or Wi-Fi leaves a socket the server
        # notices only after its ping timeout, and its reconnect must not be refused; an
        # impersonator cannot prove itself to use this. Unproved sessions (no auth, no binding)
        # close nobody: anyone could claim the id.
        older = [s for s in list(self.sessions) if s.device_id.lower() == device_id.lower()] if admission.proved else []
        self.sessions.add(session)
        if self.bindings is not None:
            self._session_admissions[session] = (admission, admission.at or time.time())
        if older:
            log.info("new session for the device: closing the older one", extra={"fields": {"device_id": device_id, "closed": len(older)}})
            for old in older:
                self._background(old.close_replaced())
        if admission.proved:
            # ... and on the other replicas (the device's stale socket may be held by another).
            self._background(self._announce_opened(device_id, session.session_id, session.connected_at))
        self._publish_seen({"device_id": device_id, "event": "connected"}, admission.trusted)
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - one bad session must not take others down
            log.exception("session failed")
            m.ERRORS.labels("gateway", "session_crash").inc()
        finally:
            self.sessions.discard(session)
            self._session_admissions.pop(session, None)
            self._publish_seen({"device_id": device_id, "event": "disconnected"}, admission.trusted)
