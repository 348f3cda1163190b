"""The gateway service: WebSocket for devices on :8000, HTTP (OTA) on :8003."""

from __future__ import annotations

import logging
import secrets
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from nats.aio.client import Client as NATS
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from gateway import metrics as m
from gateway import auth, ota, protocol
from gateway.bindings import SqliteBindingStore
from gateway.session import DeviceSession
from shared.settings import Settings
from shared.subjects import Subjects

log = logging.getLogger("gateway.server")


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


class Gateway:
    """Accepts devices, and bridges each connection to the NATS pipeline."""

    name = "gateway"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gw = settings.gateway
        self.subjects = Subjects(settings.nats.prefix)
        self.nc: NATS | None = None
        self._ws_server: Server | None = None
        self._http_runner: web.AppRunner | None = None
        self.sessions: set[DeviceSession] = set()
        self.ws_port: int | None = None
        self.http_port: int | None = None
        self.auth_key = self.gw.auth.key or secrets.token_hex(16)
        if not self.gw.auth.key:
            log.warning("no auth key configured: using a random one, tokens will not survive a restart")

    async def start(self, nc: NATS) -> None:
        self.nc = nc
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
        )
        self.ws_port = self._ws_server.sockets[0].getsockname()[1] if self._ws_server.sockets else self.gw.ws_port
        self.bindings = SqliteBindingStore(self.gw.binding_db) if self.gw.binding else None
        app = ota.make_app(self.gw, self.auth_key, self.bindings)
        self._http_runner = web.AppRunner(app, access_log=None)
        await self._http_runner.setup()
        site = web.TCPSite(self._http_runner, self.gw.host, self.gw.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info(
            "listening",
            extra={"fields": {"ws": f"{self.gw.host}:{self.ws_port}", "http": f"{self.gw.host}:{self.http_port}", "websocket_url": ota.websocket_url(self.gw)}},
        )

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        if self._http_runner is not None:
            await self._http_runner.cleanup()

    def health(self) -> dict[str, Any]:
        return {"ok": self._ws_server is not None, "sessions": len(self.sessions)}

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP on the WebSocket port; reject bad handshakes with an HTTP status."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(HTTPStatus.OK, "Server is running\n")
        found = device_headers(request)
        try:
            protocol.parse_protocol_version(found["protocol-version"] or None)
        except protocol.ProtocolError:
            m.DROPPED.labels("gateway", "bad_protocol_version").inc()
            return connection.respond(HTTPStatus.BAD_REQUEST, "unsupported Protocol-Version\n")
        if self.gw.auth.enabled:
            result = auth.verify_device(
                self.auth_key,
                found["authorization"],
                found["client-id"] or found["device-id"],
                found["device-id"],
                int(time.time()),
                self.gw.auth.expire_seconds,
                frozenset(self.gw.auth.allowed_devices),
            )
            if not result.ok:
                # Rejected in the handshake: the firmware reports it at once (protocol.md §2.4).
                m.AUTH_FAILURES.labels(result.reason).inc()
                log.info("handshake rejected", extra={"fields": {"device_id": found["device-id"], "reason": result.reason}})
                return connection.respond(HTTPStatus.UNAUTHORIZED, f"unauthorized: {result.reason}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        found = device_headers(ws.request)  # type: ignore[arg-type]
        device_id = found["device-id"]
        if not device_id:
            # protocol.md §2.3: no identity at all: say so and close.
            await ws.send("No Device-Id: send the Device-Id header or ?device-id= in the URL")
            await ws.close(1008, "missing device id")
            return
        version = protocol.parse_protocol_version(found["protocol-version"] or None)
        assert self.nc is not None
        session = DeviceSession(
            ws, self.nc, self.gw, self.subjects, device_id, found["client-id"] or device_id, version,
            auth_key=self.auth_key, vision_url=ota.vision_url(self.gw, self.http_port),
        )
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - one bad session must not take others down
            log.exception("session failed")
            m.ERRORS.labels("gateway", "session_crash").inc()
        finally:
            self.sessions.discard(session)
