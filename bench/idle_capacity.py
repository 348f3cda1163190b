"""Idle capacity of one gateway process: K devices connect, say hello and stay idle.

Starts its own nats-server, one VAD worker and one gateway (no models needed for idle
sessions), connects firmware-faithful simulated devices in batches, then reports the memory each
idle session costs the gateway and the VAD worker, and the CPU it takes to keep them (WebSocket
pings every 20 s included), and whether the memory comes back when they leave.

    .venv/bin/python bench/idle_capacity.py --devices 500 1000 2000 --json idle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xiaozhi.procstat import cpu_seconds, rss_bytes, threads  # noqa: E402
from xiaozhi.sim import SimDevice  # noqa: E402
from xiaozhi.stack import Stack, free_port  # noqa: E402


async def connect_all(url: str, n: int, batch: int = 100) -> list[SimDevice]:
    devices: list[SimDevice] = []
    for start in range(0, n, batch):
        group = [SimDevice(ws_url=url) for _ in range(min(batch, n - start))]
        await asyncio.gather(*(d.connect() for d in group))
        devices += group
    return devices


async def measure(url: str, pids: dict[str, int], n: int, idle_s: float) -> dict:
    before = {name: rss_bytes(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    devices = await connect_all(url, n)
    connect_s = time.monotonic() - t0
    await asyncio.sleep(2)  # let MCP initialize/tools-list settle
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(idle_s)
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    during = {name: rss_bytes(pid) for name, pid in pids.items()}
    held = sum(1 for d in devices if not d.closed)
    await asyncio.gather(*(d.close() for d in devices))
    await asyncio.sleep(3)
    after = {name: rss_bytes(pid) for name, pid in pids.items()}
    return {
        "devices": n,
        "held": held,
        "connect_s": round(connect_s, 2),
        "services": {
            name: {
                "rss_before_mb": round(before[name] / 1e6, 1),
                "rss_idle_mb": round(during[name] / 1e6, 1),
                "rss_after_close_mb": round(after[name] / 1e6, 1),
                "bytes_per_idle_session": int((during[name] - before[name]) / n),
                "cpu_percent_idle": round(100 * (cpu1[name] - cpu0[name]) / idle_s, 2),
            }
            for name in pids
        },
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--idle", type=float, default=25.0, help="seconds to hold the sessions idle (>= one 20 s ping)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xz-idle-"))
    stack = Stack(env={"XZ_LOG_LEVEL": "WARNING", "XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__RATE_LIMITS__CONNECTIONS_PER_MINUTE_PER_IP": "0", "XZ_GATEWAY__RATE_LIMITS__TURNS_PER_MINUTE_PER_IP": "0"}, log_dir=tmp / "logs")
    try:
        stack.start_nats(free_port(), "127.0.0.1", str(tmp / "js"))
        ws_port = free_port()
        vad = stack.start_service("vad", free_port())
        gateway = stack.start_service("gateway", free_port(), {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())})
        stack.wait_healthy([vad, gateway])
        url = f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/"
        pids = {"gateway": gateway.popen.pid, "vad": vad.popen.pid}
        warm = await connect_all(url, 5)
        await asyncio.gather(*(d.close() for d in warm))
        await asyncio.sleep(1)
        results = []
        for n in args.devices:
            result = await measure(url, pids, n, args.idle)
            result["gateway_threads"] = threads(pids["gateway"])
            results.append(result)
            g, v = result["services"]["gateway"], result["services"]["vad"]
            print(
                f"{n:>6} idle devices: {result['held']} held, connected in {result['connect_s']} s | "
                f"gateway {g['bytes_per_idle_session'] / 1024:.1f} KiB/session, {g['cpu_percent_idle']}% CPU, "
                f"RSS {g['rss_before_mb']} -> {g['rss_idle_mb']} -> {g['rss_after_close_mb']} MB | "
                f"vad {v['bytes_per_idle_session'] / 1024:.1f} KiB/session, {v['cpu_percent_idle']}% CPU"
            )
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
