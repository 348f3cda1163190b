"""The manager as a service: the API on ``manager.port`` (8002), metrics on 9106, NATS for
live configuration (``manager.live``) and for claiming devices by code from the gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import func, select

from manager import auth, events
from manager.app import agent_options, create_app
from manager.db import make_engine, migrate, session_factory
from manager.live import Publisher
from manager.models import User
from shared.bindings import BindingStore, StoreUnavailable
from shared.metrics import DROPPED, ERRORS
from shared.settings import Settings
from shared.subjects import Subjects

log = logging.getLogger("manager.service")


class _Server(uvicorn.Server):
    """uvicorn inside our event loop: signals belong to shared.service, not to uvicorn."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201 - uvicorn >= 0.29
        yield


class NatsBinder:
    """Binds by code through the gateways, and unbinds in the shared binding store (NATS KV),
    from the API's threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Any, subject: str, prefix: str = "xz", timeout_s: float = 3.0) -> None:
        self.loop, self.nc, self.subject, self.timeout_s = loop, nc, subject, timeout_s
        self.store = BindingStore(nc, prefix)

    def bind(self, code: str, owner: str, owner_id: int | None = None, commit: bool = True) -> dict[str, Any] | None:
        """The gateways' answer (``{"device_id", ...}``, ``{"conflict": True}``, ``{"error":
        ...}``), or None when no device waits with the code."""

        async def ask() -> dict[str, Any] | None:
            body = {"code": code, "owner": owner, "owner_id": owner_id, "commit": commit}
            try:
                reply = await self.nc.request(self.subject, json.dumps(body).encode(), timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - no gateway with binding on (timeout, no responders)
                log.info("no gateway answered the bind", extra={"fields": {"why": type(exc).__name__}})
                return {"error": "no gateway"}
            answer = json.loads(reply.data)
            return None if answer.get("found") is False else answer

        return asyncio.run_coroutine_threadsafe(ask(), self.loop).result(timeout=self.timeout_s + 3)

    def unbind(self, device_ids: list[str]) -> bool:
        """Unbind the devices in the shared store before the manager forgets them; False when
        the store cannot be reached (nothing is forgotten then). No bindings bucket at all (no
        gateway ever had binding on) is nothing to unbind."""

        async def run() -> bool:
            try:
                for device_id in device_ids:
                    await self.store.unbind(device_id)
            except StoreUnavailable as exc:
                if _no_bucket(exc):
                    return True
                ERRORS.labels("manager", "binding_store").inc()
                log.warning("unbind not stored: the binding store is unavailable: %s", exc)
                return False
            return True

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=self.timeout_s * (len(device_ids) + 1) + 3)
        except Exception as exc:  # noqa: BLE001
            log.warning("unbind not stored: %s", exc)
            return False


def _no_bucket(exc: StoreUnavailable) -> bool:
    from nats.js.errors import BucketNotFoundError, NotFoundError

    return isinstance(exc.__cause__, (BucketNotFoundError, NotFoundError))


class NatsRegistry:
    """Which devices have a session now: asks every gateway and gathers the answers briefly."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Any, subject: str, wait_s: float = 0.3) -> None:
        self.loop, self.nc, self.subject, self.wait_s = loop, nc, subject, wait_s

    def online(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not device_ids:
            return {}

        async def ask() -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            done = asyncio.Event()
            wanted = {d.lower() for d in device_ids}

            async def on_reply(msg: Any) -> None:
                try:
                    for entry in json.loads(msg.data).get("online", []):
                        found[str(entry["device_id"]).lower()] = entry
                except (ValueError, KeyError, TypeError, AttributeError):
                    return
                if wanted <= set(found):
                    done.set()

            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox, cb=on_reply)
            try:
                await self.nc.publish(self.subject, json.dumps({"device_ids": sorted(wanted)}).encode(), reply=inbox)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), self.wait_s)
            finally:
                await sub.unsubscribe()
            return found

        try:
            return asyncio.run_coroutine_threadsafe(ask(), self.loop).result(timeout=self.wait_s + 3)
        except Exception as exc:  # noqa: BLE001 - NATS down: nobody is known to be online
            log.warning("online status unavailable: %s", exc)
            return {}


class NatsCommander:
    """The owner's notices and reboots: a request to every gateway, answered only by the one
    holding a session of the device."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Any, subject: str, timeout_s: float = 1.0) -> None:
        self.loop, self.nc, self.subject, self.timeout_s = loop, nc, subject, timeout_s

    def command(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``{"delivered": True, "session_id"}``; ``{"delivered": False}``: no gateway holds a
        session of the device; ``{"error": ...}``: NATS cannot be reached."""
        from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

        async def ask() -> dict[str, Any]:
            if not self.nc.is_connected:
                return {"error": "nats disconnected"}
            request = json.dumps({"device_id": device_id, **body}, ensure_ascii=False).encode()
            try:
                reply = await self.nc.request(self.subject, request, timeout=self.timeout_s)
            except (NoRespondersError, NatsTimeout, asyncio.TimeoutError):
                return {"delivered": False}
            answer = json.loads(reply.data)
            return answer if isinstance(answer, dict) and answer.get("delivered") is True else {"delivered": False}

        try:
            answer = asyncio.run_coroutine_threadsafe(ask(), self.loop).result(timeout=self.timeout_s + 3)
        except Exception as exc:  # noqa: BLE001 - NATS away or closed
            ERRORS.labels("manager", "device_command").inc()
            log.warning("device command not sent: %s", type(exc).__name__, extra={"fields": {"device_id": device_id}})
            return {"error": type(exc).__name__}
        fields = {"device_id": device_id, "command": body.get("command"), "delivered": bool(answer.get("delivered")), "session_id": answer.get("session_id")}
        log.info("device command", extra={"fields": {**fields, "error": answer["error"]} if answer.get("error") else fields})
        return answer


def ensure_admin(sessions, settings) -> str | None:  # noqa: ANN001
    """Make the first administrator when there is no user; returns where its password is."""
    m = settings.manager
    with sessions() as db:
        if db.execute(select(func.count()).select_from(User)).scalar_one() > 0:
            return None
        if m.admin_password is not None:
            password, where = m.admin_password.get_secret_value(), "the manager.admin_password setting"
        elif m.admin_password_file:
            password, where = Path(m.admin_password_file).read_text().strip(), m.admin_password_file
        else:
            password = secrets.token_urlsafe(12)
            out = Path(m.admin_password_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(password + "\n")
            out.chmod(0o600)
            where = str(out.resolve())
        db.add(User(username=m.admin_user, password_hash=auth.hash_password(password), role="admin"))
        db.commit()
    log.warning("first administrator created", extra={"fields": {"username": m.admin_user, "password_in": where}})
    return where


class ManagerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.m = settings.manager
        self.subjects = Subjects(settings.nats.prefix)
        self.engine = make_engine(self.m.database_url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        ensure_admin(self.sessions, settings)
        self.server: _Server | None = None
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None

    async def start(self, nc: Any) -> None:
        loop = asyncio.get_running_loop()
        self.publisher = Publisher(loop, nc, self.subjects.kv_agents, self.sessions, self.subjects.kv_devices, self.subjects.obj_firmware, self.settings.work.replicas)
        self.publisher.audio_bucket = self.subjects.obj_audio
        self.publisher.memory_bucket = self.subjects.kv_memory
        self.publisher.unbind_subject = self.subjects.gateway_unbind
        await self.publisher.open()
        binder = NatsBinder(loop, nc, self.subjects.gateway_bind, self.settings.nats.prefix)
        registry = NatsRegistry(loop, nc, self.subjects.online)
        commander = NatsCommander(loop, nc, self.subjects.gateway_command)
        app = create_app(self.m, self.sessions, self.publisher, binder, registry, self.settings.gateway, agent_options(self.settings), commander)
        # Events from the pipeline, shared among manager replicas (queue group).
        self._subs = [
            await nc.subscribe(self.subjects.device_seen, queue="manager", cb=self._on_seen),
            await nc.subscribe(self.subjects.history, queue="manager", cb=self._on_history),
        ]
        # proxy_headers off: uvicorn would believe X-Forwarded-For from loopback; the API decides
        # itself, from manager.trusted_proxies (auth.client_address).
        tls = {"ssl_certfile": self.m.tls_cert_file, "ssl_keyfile": self.m.tls_key_file} if self.m.tls_cert_file else {}
        config = uvicorn.Config(app, host=self.m.host, port=self.m.port, log_config=None, access_log=False, lifespan="off", server_header=False, proxy_headers=False, **tls)
        self.server = _Server(config)
        self._tasks.append(asyncio.create_task(self.server.serve()))
        self._tasks.append(asyncio.create_task(self.publisher.run_resync(self.m.live_resync_s)))
        for _ in range(200):
            if self.server.started:
                break
            if self._tasks[0].done():
                self._tasks[0].result()  # raises: the port is taken, say so
            await asyncio.sleep(0.05)
        sockets = [s for server in getattr(self.server, "servers", []) for s in server.sockets]
        self.port = sockets[0].getsockname()[1] if sockets else self.m.port
        scheme = "https" if self.m.tls_cert_file else "http"
        log.info("manager listening", extra={"fields": {"url": f"{scheme}://{self.m.host}:{self.port}/", "pid": os.getpid()}})

    async def _on_seen(self, msg: Any) -> None:
        try:
            event = json.loads(msg.data)
            device_id = str(event["device_id"]).lower()
        except (ValueError, KeyError, TypeError):
            DROPPED.labels("manager", "bad_seen_event").inc()
            return
        await asyncio.to_thread(events.record_seen, self.sessions, device_id, event)

    async def _on_history(self, msg: Any) -> None:
        try:
            event = json.loads(msg.data)
            device_id = str(event["device_id"]).lower()
        except (ValueError, KeyError, TypeError):
            DROPPED.labels("manager", "bad_history_event").inc()
            return
        await asyncio.to_thread(events.record_history, self.sessions, device_id, event, self.m.history_max_lines)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._tasks[0], 10)
        self.engine.dispose()

    def health(self) -> dict[str, Any]:
        return {"ok": bool(self.server and self.server.started), "port": self.port}
