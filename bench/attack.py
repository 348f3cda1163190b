"""Bad input against a gateway, by hand: every kind of attack in xiaozhi/attack.py, counted.

    .venv/bin/python bench/attack.py --ws ws://127.0.0.1:8000/xiaozhi/v1/ --http http://127.0.0.1:8003 --rounds 50

Point it only at a server you run. It prints what it tried and how the server answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xiaozhi.attack import Attacker  # noqa: E402


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ws", default="ws://127.0.0.1:8000/xiaozhi/v1/")
    parser.add_argument("--http", default="http://127.0.0.1:8003")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--source-ip", help="the attacker's source address for the floods (e.g. 127.0.0.2 against a local gateway)")
    parser.add_argument("--victim", help="JSON {device_id, client_id, token} of the device the handshake-limit attack tries to keep offline")
    args = parser.parse_args()
    victim = json.loads(args.victim) if args.victim else None
    result = await Attacker(args.ws, args.http, args.rounds, source_ip=args.source_ip, victim=victim).run()
    print(json.dumps(result, indent=2))
    return 1 if result["attack_errors"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
