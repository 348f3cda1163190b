"""The device's WebSocket connection: text frames that are not valid UTF-8 are read anyway.

The firmware builds its JSON with cJSON, which escapes only `"`, `\\` and control bytes: bytes
>= 0x80 pass through raw. A Wi-Fi name in GBK inside the `self.get_device_status` result thus
reaches the server as a text frame that is not UTF-8. The `websockets` protocol layer does not
check text payloads; only the asyncio reader's final ``bytes.decode()`` does, and then it fails
the connection with 1007, ending the session over one odd SSID. Here such a message is decoded
with the invalid sequences replaced (U+FFFD), counted, and the session carries on.
"""

from __future__ import annotations

import logging

from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import ServerConnection

from gateway import metrics as m

log = logging.getLogger("gateway.session")


class TolerantAssembler(Assembler):
    """Messages as the library assembles them; a text message that does not decode as UTF-8
    comes back decoded with replacements instead of raising (which would close with 1007)."""

    async def get(self, decode: bool | None = None):  # type: ignore[override]
        try:
            return await super().get(decode)
        except UnicodeDecodeError as exc:
            # The frames are consumed by now; the error holds the whole message's bytes.
            raw = exc.object if isinstance(exc.object, bytes) else bytes(exc.object)
            m.INVALID_UTF8.inc()
            log.info("text frame is not valid UTF-8, read with replacements", extra={"fields": {"bytes": len(raw), "position": exc.start}})
            return raw.decode("utf-8", errors="replace")


class DeviceConnection(ServerConnection):
    """A server connection whose text messages never fail on invalid UTF-8 (see above)."""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        # Same queue, limits and flow control as the library's own: only get() differs.
        self.recv_messages.__class__ = TolerantAssembler
