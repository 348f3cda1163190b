"""A deadline for HTTP request heads: slowloris protection for the OTA/vision port.

aiohttp waits for a request's headers as long as the client keeps the connection open, so a
client that sends them a byte at a time holds a connection (and its memory) for ever. This
wrapper around aiohttp's protocol factory closes a connection whose first request head
(everything up to the blank line) is not complete within ``timeout_s``. Idle keep-alive
connections are aiohttp's ``keepalive_timeout``'s job.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger("gateway.httpguard")

_HEAD_END = b"\r\n\r\n"


class _HeadDeadline(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, timeout_s: float, on_cut: Callable[[], None]) -> None:
        self._inner = inner
        self._timeout_s = timeout_s
        self._on_cut = on_cut
        self._seen = b""
        self._done = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._done:
            self._seen = (self._seen + data)[-8192:]
            if _HEAD_END in self._seen:
                self._done = True
                self._seen = b""
                if self._timer is not None:
                    self._timer.cancel()
        self._inner.data_received(data)

    def _expire(self) -> None:
        if not self._done and self._transport is not None and not self._transport.is_closing():
            self._on_cut()
            self._transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def guarded(factory: Callable[[], asyncio.Protocol], timeout_s: float, on_cut: Callable[[], None]) -> Callable[[], asyncio.Protocol]:
    """``factory`` with a ``timeout_s`` deadline on each connection's first request head."""

    def make() -> asyncio.Protocol:
        return _HeadDeadline(factory(), timeout_s, on_cut)

    return make
