"""Firmware images and per-device upgrade flags kept in NATS by the manager.

The manager uploads images into the object store ``xz_firmware`` (``<board>_<version>.bin``) and
writes each bound device's ``auto_upgrade`` into the KV bucket ``xz_devices``. Every gateway's
OTA offers the newest image for a device's board from there (and from its own firmware folder,
whichever is newer) unless the device's owner switched auto-upgrade off, and serves the image
from the object store. The list of images is cached for ``ttl_s``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gateway import firmware
from gateway import metrics as m
from shared.agents import kv_key

log = logging.getLogger("gateway.fwstore")


class FirmwareCatalog:
    def __init__(self, nc: Any, bucket: str, flags_bucket: str, ttl_s: float = 10.0) -> None:
        self.nc = nc
        self.bucket = bucket
        self.flags_bucket = flags_bucket
        self.ttl_s = ttl_s
        self._names: list[str] = []
        self._listed_at = float("-inf")
        self._obs: Any = None
        self._flags: Any = None

    async def _store(self) -> Any:
        if self._obs is None:
            self._obs = await self.nc.jetstream().object_store(self.bucket)
        return self._obs

    async def names(self) -> list[str]:
        if time.monotonic() - self._listed_at < self.ttl_s:
            return self._names
        self._listed_at = time.monotonic()
        try:
            store = await self._store()
            entries = await store.list(ignore_deletes=True)
            self._names = [e.name for e in entries if e.name and not getattr(e, "deleted", False)]
        except Exception as exc:  # noqa: BLE001 - no bucket yet / empty / NATS down: no images
            if "no objects" not in str(exc).lower() and "not found" not in str(exc).lower():
                log.debug("firmware list unavailable: %s", exc)
            self._names = []
        return self._names

    async def newest(self, board: str) -> firmware.Image | None:
        return firmware.newest_of(await self.names(), board)

    async def read(self, name: str) -> bytes | None:
        if name not in await self.names():
            return None
        try:
            result = await (await self._store()).get(name)
            return result.data
        except Exception as exc:  # noqa: BLE001
            m.ERRORS.labels("gateway", "firmware_read").inc()
            log.warning("firmware %s not readable from the store: %s", name, exc)
            return None

    async def auto_upgrade(self, device_id: str) -> bool:
        """The owner's switch; on when the device is unknown to the manager."""
        try:
            if self._flags is None:
                self._flags = await self.nc.jetstream().key_value(self.flags_bucket)
            entry = await self._flags.get(kv_key(device_id))
            return bool(json.loads(entry.value).get("auto_upgrade", True)) if entry and entry.value else True
        except Exception:  # noqa: BLE001 - no bucket or no entry
            return True
