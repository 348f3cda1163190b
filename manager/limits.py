"""Request bodies are bounded before they are read (a pure ASGI middleware).

- ``Content-Length`` over the route's bound: 413 at once, nothing read.
- A body on an authenticated route (every ``/api/`` route but sign-in): the bearer token (and
  for the firmware upload the admin role) is checked first; 401/403 before a byte is read.
- The bytes actually received are counted, so a chunked body (no ``Content-Length``) is cut
  off at the bound too (413), and the whole body must arrive within ``timeout_s`` (408).

The connection is closed after such an answer (uvicorn does, the rest of the body unread), and
uvicorn reads a body only as the application asks for it, so the process never holds more
than the bound plus uvicorn's small read buffer, and nothing is spooled to disk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import DROPPED


class BodyRejected(HTTPException):
    """Raised from ``receive``: FastAPI passes an HTTPException raised while reading on as it is."""


class BodyLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limit_for: Callable[[Scope], int],
        authorize: Callable[[Scope], Awaitable[tuple[int, str] | None]],
        timeout_s: float,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.authorize = authorize
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.limit_for(scope)
        length_header = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = 0
        if length_header is not None:
            try:
                length = int(length_header)
                if length < 0:
                    raise ValueError
            except ValueError:
                await _answer(send, 400, "bad Content-Length")
                return
            if length > limit:
                DROPPED.labels("manager", "body_too_large").inc()
                await _answer(send, 413, f"the body is larger than this route takes ({limit} bytes)")
                return
        if not (chunked or length > 0):
            await self.app(scope, receive, send)
            return
        denied = await self.authorize(scope)
        if denied is not None:
            status, detail = denied
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await _answer(send, status, detail, extra)
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        complete = False
        rejected: list[BodyRejected] = []
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()  # after the body: http.disconnect, unbounded in time
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                DROPPED.labels("manager", "body_timeout").inc()
                rejected.append(BodyRejected(408, f"the body did not arrive within {self.timeout_s:g} s"))
                raise rejected[-1] from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    DROPPED.labels("manager", "body_too_large").inc()
                    rejected.append(BodyRejected(413, f"the body is larger than this route takes ({limit} bytes)"))
                    raise rejected[-1]
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected and not started:
                # Whatever the application made of the failed read (FastAPI may call it a 400),
                # the answer is the reason the body was refused.
                started = True
                await _answer(send, rejected[-1].status_code, str(rejected[-1].detail))
                return
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyRejected as exc:
            if not started:
                started = True
                await _answer(send, exc.status_code, str(exc.detail))


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None

