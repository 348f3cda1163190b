"""The ``xiaozhi`` command.

    xiaozhi up                 start NATS (embedded) and every service; print the device URLs
    xiaozhi run <service>      run one service (gateway, vad, asr, llm, tts, tools)
    xiaozhi sim --wav F        talk to a server as a simulated device
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path

from xiaozhi.stack import MODULES, NATS_AUTH_DIR, SERVICES, GaveUp, Stack, free_port, pick_port


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run" and len(argv) > 1 and argv[1] in MODULES:
        return run_service(argv[1], argv[2:])
    parser = argparse.ArgumentParser(prog="xiaozhi", description="xiaozhi voice backend over NATS")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole local stack (what `make run` does)")
    up.add_argument("--nats", help="use this NATS URL instead of starting an embedded nats-server")
    up.add_argument("--nats-host", default="127.0.0.1", help="address the embedded nats-server binds (default 127.0.0.1)")
    up.add_argument("--nats-port", type=int, default=4222, help="preferred port of the embedded nats-server (a free one if taken)")
    up.add_argument("--config", help="YAML settings file for every service")
    up.add_argument("--data-dir", default=".run", help="JetStream storage and logs (default .run)")
    up.add_argument("--json-logs", action="store_true", help="JSON log lines instead of readable text")
    up.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the services' /metrics and /healthz bind (default 127.0.0.1: this machine only; 0.0.0.0 for a Prometheus elsewhere)",
    )
    up.add_argument(
        "--nats-no-auth",
        action="store_true",
        help="run the embedded nats-server without users (any local process could then read memories and recordings, and inject turns)",
    )
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="run N processes of a worker stage (vad, asr, llm, tts, tools), e.g. --replicas llm=2 (repeatable)",
    )

    run = sub.add_parser("run", help="run one service")
    run.add_argument("service", choices=sorted(MODULES))

    sim = sub.add_parser("sim", help="talk to a server as a simulated device")
    target = sim.add_mutually_exclusive_group()
    target.add_argument("--ota", help="OTA URL (default http://127.0.0.1:8003/xiaozhi/ota/)")
    target.add_argument("--ws", help="WebSocket URL (skips OTA)")
    sim.add_argument("--wav", action="append", default=[], help="speech to send, 16-bit WAV (repeat for several turns)")
    sim.add_argument("--text", action="append", default=[], help="typed text to send with `listen detect` (repeatable)")
    sim.add_argument("--mode", choices=["auto", "manual", "realtime"], default="auto")
    sim.add_argument("--protocol-version", type=int, choices=[1, 2, 3], default=1)
    sim.add_argument("--device-id", help="MAC-style device id (default random)")
    sim.add_argument("--token", help="token for the Authorization header (default: from OTA)")
    sim.add_argument("--frame-ms", type=int, choices=[20, 40, 60, 120], default=60, help="uplink packet duration (firmware: 60)")
    sim.add_argument("--wake-word", help="start like an on-device wake word: pre-roll audio, `listen detect` with this text")
    sim.add_argument("--wake-wav", help="the wake word's audio sent as the pre-roll (default: the checkout's 你好小智 recording, tests/fixtures/audio/zh_wake.wav, if there; else none)")
    sim.add_argument("--abort-after", type=float, help="press the button (abort) this many seconds into each reply")
    sim.add_argument("--no-mcp", action="store_true", help="do not announce MCP in hello (older firmware)")
    sim.add_argument("--mcp-tools", help="JSON file with the MCP tools the device offers (default: the firmware's built-ins)")
    sim.add_argument("--firmware-version", default="2.4.2", help="firmware the device behaves as (< 2.4.0 drops queued audio at tts stop)")
    sim.add_argument("--jitter", help="downlink delays and stalls: wifi, 4g, or delay=MS,jitter=MS,stall_every=S,stall=MS")
    sim.add_argument("--out", default="reply.wav", help="where to write the reply audio (default reply.wav)")
    sim.add_argument("--timeout", type=float, default=60, help="seconds to wait for each reply")
    sim.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    sim.add_argument("--activation-timeout", type=float, default=300.0, help="how long to wait for the owner to enter the activation code (binding on), seconds")

    bench = sub.add_parser("bench", help="many simulated devices at once: latency, smoothness, failures")
    bench_target = bench.add_mutually_exclusive_group()
    bench_target.add_argument("--ota", help="OTA URL of the server to measure (default http://127.0.0.1:8003/xiaozhi/ota/)")
    bench_target.add_argument("--ws", help="WebSocket URL (skips OTA)")
    bench.add_argument("--devices", type=int, default=4)
    bench.add_argument("--ramp-up", type=float, default=2.0, help="seconds over which devices connect")
    bench.add_argument("--turns", type=int, default=3, help="turns per device")
    bench.add_argument("--wav", action="append", default=[], help="fixture WAVs to speak (repeatable; default en_what_time and en_joke)")
    bench.add_argument("--mode", choices=["auto", "manual", "realtime"], default="auto")
    bench.add_argument("--protocol-version", type=int, choices=[1, 2, 3], default=1)
    bench.add_argument("--think", type=float, default=1.0, help="mean think time between turns, seconds")
    bench.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    bench.add_argument("--json", dest="json_path", default="bench.json", help="where to write the JSON results")
    bench.add_argument("--jitter", help="downlink delays and stalls as on a real link: wifi, 4g, or delay=MS,jitter=MS,stall_every=S,stall=MS")

    bind = sub.add_parser("bind", help="bind the device that is showing this activation code")
    bind.add_argument("code", help="the 6-digit code the device speaks")
    bind.add_argument("--owner", default="admin", help="who the device belongs to (default admin)")
    bind.add_argument("--config", help="YAML settings file")
    bind.add_argument("--data-dir", default=".run", help="the data folder of a running `xiaozhi up` (its NATS URL and users; default .run)")

    natsauth = sub.add_parser("nats-auth", help="print a nats-server users config: one user per service, each limited to its own subjects, and the admin user of nats-setup")
    natsauth.add_argument("--prefix", default="xz", help="subject prefix (default xz)")
    natsauth.add_argument(
        "--secrets-dir",
        help="write DIR/auth.conf (the block, for nats-server's `include`) and DIR/<service>.password (for XZ_NATS__PASSWORD_FILE) instead of printing",
    )
    natsauth.add_argument(
        "--per-service-dirs",
        action="store_true",
        help="with --secrets-dir: one folder per container, each mountable alone (compose's volume subpath): DIR/<user>/<user>.password, DIR/nats/auth.conf",
    )
    natsauth.add_argument(
        "--if-missing",
        action="store_true",
        help="with --secrets-dir: keep the passwords already there (with --per-service-dirs also those of the flat layout, moved into the folders) and write auth.conf anew from them (idempotent start-up)",
    )

    natssetup = sub.add_parser("nats-setup", help="create every stream, KV bucket and object store the stack uses (as the NATS admin user)")
    natssetup.add_argument("--config", help="YAML settings file (the work queues' limits, replicas)")
    natssetup.add_argument("--nats", help="NATS URL (default: the nats.url setting)")
    natssetup.add_argument("--timeout", type=float, default=120.0, help="seconds to keep trying while NATS or JetStream is not ready (default 120)")

    args = parser.parse_args(argv)
    if args.command == "nats-auth":
        return nats_auth_command(args)
    if args.command == "nats-setup":
        return nats_setup_command(args)
    if args.command == "bind":
        return bind_command(args)
    if args.command == "bench":
        from xiaozhi.bench import BenchConfig, run_bench

        fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
        wavs = args.wav or [str(fixtures / "en_what_time.wav"), str(fixtures / "en_joke.wav")]
        ota = args.ota or (None if args.ws else "http://127.0.0.1:8003/xiaozhi/ota/")
        config = BenchConfig(ota, args.ws, args.devices, args.ramp_up, args.turns, wavs, args.mode, args.protocol_version, args.think, args.timeout, args.jitter)
        return asyncio.run(run_bench(config, args.json_path))
    if args.command == "up":
        return up_command(args)
    if args.command == "sim":
        return asyncio.run(sim_command(args))
    return run_service(args.service, [])


def run_service(name: str, argv: list[str]) -> int:
    """Run one service in this process (same as ``python -m <module>``)."""
    from shared.service import run

    if name == "gateway":
        from gateway.server import Gateway as factory
    elif name == "vad":
        from vad_svc.service import VadWorker as factory
    elif name == "asr":
        from asr_svc.service import AsrWorker as factory
    elif name == "llm":
        from llm_svc.service import LlmWorker as factory
    elif name == "tts":
        from tts_svc.service import TtsWorker as factory
    elif name == "manager":
        from manager.service import ManagerService as factory
    else:
        from tools_svc.service import ToolsWorker as factory
    return run(name, factory, lambda s: getattr(s, name).metrics_port, argv)


def bind_command(args: argparse.Namespace) -> int:
    """Bind a device by the code it speaks during activation (protocol.md §1.5).

    The request goes to the running gateways over NATS (``<prefix>.gateway.bind``, as the
    manager's console does): one of them binds it in the shared store (NATS KV)."""
    from shared.settings import load_settings

    settings = load_settings(args.config)
    answer = asyncio.run(_bind_over_nats(settings, args.code, args.owner, args.data_dir))
    if answer is not None and answer.get("error"):
        print("the gateways cannot reach the binding store (NATS JetStream); try again", file=sys.stderr)
        return 1
    if answer is None:
        print(f"no device is waiting with code {args.code}", file=sys.stderr)
        return 1
    if answer.get("conflict"):
        print(f"device {answer['device_id']} is bound to another owner; it must be unbound first", file=sys.stderr)
        return 1
    print(f"bound device {answer['device_id']} to {args.owner}")
    return 0


async def _bind_over_nats(settings, code: str, owner: str, data_dir: str = ".run") -> dict | None:
    from shared import bus
    from shared.subjects import Subjects
    from xiaozhi.stack import local_nats

    # A one-shot client: its own connection closing is no news ("nats disconnected").
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    # Against `make run`: its embedded NATS and the manager user's generated password (.run/).
    nc = await bus.connect(local_nats(settings, data_dir), "xiaozhi-bind", retry_first=False)
    try:
        reply = await nc.request(Subjects(settings.nats.prefix).gateway_bind, json.dumps({"code": code, "owner": owner}).encode(), timeout=3)
    except Exception:  # noqa: BLE001 - no gateway with binding on (timeout, no responders)
        return None
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    return None if answer.get("found") is False else answer


def nats_auth_command(args: argparse.Namespace) -> int:
    """The authorization block and the passwords: on stdout and stderr, or as files in a folder.

    With ``--secrets-dir`` the folder gets ``auth.conf`` (include it from nats-server's config)
    and one ``<user>.password`` file per service and the admin, all mode 0600: flat (``kubectl
    create secret --from-file`` takes this layout), or with ``--per-service-dirs`` in a folder
    per container (``<user>/<user>.password``, ``nats/auth.conf``; compose mounts each container
    only its own). ``--if-missing`` keeps the passwords there (and renders auth.conf from them
    again, so the permissions are this version's); if any is missing all are made anew.
    """
    from shared import natsauth

    if (args.if_missing or args.per_service_dirs) and not args.secrets_dir:
        print("xiaozhi nats-auth: --if-missing and --per-service-dirs need --secrets-dir", file=sys.stderr)
        return 2
    if args.secrets_dir:
        folder = Path(args.secrets_dir)
        split = args.per_service_dirs
        passwords = None
        if args.if_missing:
            passwords = natsauth.read_passwords(folder, split)
            if passwords is not None:
                print(f"{folder}: kept the passwords; auth.conf written again from them", file=sys.stderr)
            elif split and (passwords := natsauth.read_passwords(folder)) is not None:
                print(f"{folder}: moved the passwords of the flat layout (auth.conf, <user>.password) into one folder per container", file=sys.stderr)
            elif natsauth.secret_paths(folder, split)[0].is_file():
                print(f"{folder}: auth.conf exists but not every user has a password file; writing new ones for every user", file=sys.stderr)
        # Written whole, then renamed: a reader never sees half a file.
        conf, _files = natsauth.write_secrets(folder, args.prefix, per_service_dirs=split, passwords=passwords)
        where = f"{folder}/<user>/<user>.password" if split else f"{folder}/<user>.password"
        print(
            f"wrote {conf} and {where}; give each service XZ_NATS__USER=<service> and XZ_NATS__PASSWORD_FILE, "
            "and `xiaozhi nats-setup` XZ_NATS__USER=admin",
            file=sys.stderr,
        )
        return 0
    config, passwords = natsauth.generate(args.prefix)
    print(config, end="")
    for service, password in passwords.items():
        print(f"{service}: XZ_NATS__USER={service} XZ_NATS__PASSWORD={password}", file=sys.stderr)
    return 0


def nats_setup_command(args: argparse.Namespace) -> int:
    """Make the streams, buckets and object stores, with the user of ``XZ_NATS__USER`` (admin)."""
    from shared.natssetup import setup_until_done
    from shared.service import cli_settings

    settings = cli_settings("nats-setup", args.config, args.nats)
    if settings is None:
        return 2
    try:
        names = asyncio.run(setup_until_done(settings, args.timeout))
    except Exception as exc:  # noqa: BLE001
        print(f"xiaozhi nats-setup failed (as NATS user {settings.nats.user or '(none)'}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"NATS set up: {', '.join(names)}", file=sys.stderr)
    return 0


def parse_replicas(values: list[str]) -> dict[str, int]:
    """``["llm=2", "tts=3"]`` -> ``{"llm": 2, "tts": 3}``; only worker stages scale here."""
    result: dict[str, int] = {}
    for value in values:
        stage, sep, count = value.partition("=")
        if not sep or stage not in SERVICES or stage == "gateway":
            raise ValueError(f"bad --replicas {value!r}: use STAGE=N with STAGE one of {', '.join(s for s in SERVICES if s != 'gateway')}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"bad --replicas {value!r}: N must be a number") from None
        if not 1 <= n <= 16:
            raise ValueError(f"bad --replicas {value!r}: N must be 1 to 16")
        result[stage] = n
    return result


def up_command(args: argparse.Namespace) -> int:
    """Start NATS (unless given) and every service; print URLs; stop all on Ctrl-C."""
    from gateway.ota import lan_ip
    from shared.logging import redact_url
    from shared.settings import load_settings

    settings = load_settings(args.config)
    try:
        replicas = parse_replicas(args.replicas)
    except ValueError as exc:
        print(f"xiaozhi up: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data_dir)
    env = {"XZ_LOG_JSON": "true" if args.json_logs else "false", "PYTHONUNBUFFERED": "1", "XZ_METRICS_HOST": args.metrics_host}
    if args.config:
        env["XZ_CONFIG"] = str(Path(args.config).resolve())
    stack = Stack(env=env)
    stop = {"now": False}

    def on_signal(_signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.nats:
            stack.nats_url = args.nats
            (data / NATS_AUTH_DIR / "url").unlink(missing_ok=True)  # no embedded server to find
            print(f"Using NATS at {redact_url(args.nats)}")
        else:
            port = pick_port(args.nats_port, args.nats_host)
            if port != args.nats_port:
                print(f"Port {args.nats_port} is taken (another NATS?); embedded nats-server uses {port}")
            # Users per service and an admin, fresh passwords at each start (data/nats-auth/,
            # mode 0600): no other local process gets into NATS.
            auth_dir = None if args.nats_no_auth else data / NATS_AUTH_DIR
            url = stack.start_nats(port, args.nats_host, str(data / "nats"), log_file=str(data / "nats.log"), auth_dir=auth_dir, prefix=settings.nats.prefix)
            (data / NATS_AUTH_DIR).mkdir(parents=True, exist_ok=True)
            (data / NATS_AUTH_DIR / "url").write_text(url + "\n")
            print(f"Embedded nats-server (JetStream) at {url}, log in {data / 'nats.log'}")
            if auth_dir is not None:
                print(f"  NATS users: one per service and admin, passwords in {auth_dir}/<user>.password")
                stack.setup_nats(str(Path(args.config).resolve()) if args.config else None)
        ws_port = pick_port(settings.gateway.ws_port, settings.gateway.host)
        http_port = pick_port(settings.gateway.http_port, settings.gateway.host)
        for wanted, got, what in ((settings.gateway.ws_port, ws_port, "WebSocket"), (settings.gateway.http_port, http_port, "HTTP")):
            if wanted != got:
                print(f"Port {wanted} is taken; the gateway's {what} port is {got}")
        gateway_env = {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(http_port)}
        procs = []
        print("Loading models and starting services (first start takes a few seconds)...")
        for name in SERVICES:
            for replica in range(replicas.get(name, 1)):
                preferred = getattr(settings, name).metrics_port
                metrics_port = pick_port(preferred, args.metrics_host) if replica == 0 else free_port()
                procs.append(stack.start_service(name, metrics_port, gateway_env if name == "gateway" else None))
        # The manager (admin API): its database and first password under the data folder
        # unless configured otherwise.
        manager_port = pick_port(settings.manager.port, settings.manager.host)
        # The console's Talk page connects the browser to the gateway: the manager must know its port.
        manager_env = {"XZ_MANAGER__PORT": str(manager_port), **gateway_env}
        defaults = type(settings.manager)()
        if settings.manager.database_url == defaults.database_url:
            manager_env["XZ_MANAGER__DATABASE_URL"] = f"sqlite:///{(data / 'manager.db').resolve()}"
        if settings.manager.admin_password_out == defaults.admin_password_out:
            manager_env["XZ_MANAGER__ADMIN_PASSWORD_OUT"] = str((data / "manager-admin-password").resolve())
        if manager_port != settings.manager.port:
            print(f"Port {settings.manager.port} is taken; the manager's port is {manager_port}")
        procs.append(stack.start_service("manager", pick_port(settings.manager.metrics_port, args.metrics_host), manager_env))
        stack.wait_healthy(procs, timeout=300)
        host = settings.gateway.public_host or lan_ip()
        ws_url = settings.gateway.websocket_url or f"ws://{host}:{ws_port}{settings.gateway.ws_path}"
        print()
        print("xiaozhi backend is running.")
        print(f"  OTA URL (give this to the device):  http://{host}:{http_port}/xiaozhi/ota/")
        print(f"  WebSocket URL:                      {ws_url}")
        password_file = Path(manager_env.get("XZ_MANAGER__ADMIN_PASSWORD_OUT", settings.manager.admin_password_out))
        first = f" (first sign-in: {settings.manager.admin_user}, password in {password_file})" if password_file.is_file() else ""
        print(f"  Manager (web console):              http://{host}:{manager_port}/{first}")
        metrics_host = "127.0.0.1" if args.metrics_host in ("0.0.0.0", "::") else args.metrics_host
        print("  Metrics:                            " + ", ".join(f"{p.name} http://{metrics_host}:{p.metrics_port}/metrics" for p in procs))
        print(f"  Try it:  .venv/bin/xiaozhi sim --ota http://127.0.0.1:{http_port}/xiaozhi/ota/ --wav tests/fixtures/audio/en_what_time.wav")
        print("Press Ctrl-C to stop.")
        sys.stdout.flush()
        # A service that dies is started again (with backoff); one that keeps dying at once
        # (a bad setting, a missing model) stops the whole stack with its log's tail.
        def say(text: str) -> None:
            print(text, file=sys.stderr, flush=True)

        on_nats_restart = (lambda: stack.setup_nats(str(Path(args.config).resolve()) if args.config else None)) if stack.nats_users else None
        while not stop["now"]:
            try:
                stack.supervise(say, on_nats_restart=on_nats_restart)
            except GaveUp as exc:
                print(f"xiaozhi up: {exc}\nStopping everything.", file=sys.stderr)
                return 1
            time.sleep(0.3)
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"xiaozhi up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("Stopping...")
        stack.stop()
        if not args.nats:
            (data / NATS_AUTH_DIR / "url").unlink(missing_ok=True)
        print("Stopped.")


async def sim_command(args: argparse.Namespace) -> int:
    import numpy as np

    from xiaozhi.sim import SimDevice, read_wav, write_wav

    ota = args.ota or (None if args.ws else "http://127.0.0.1:8003/xiaozhi/ota/")
    if not args.wav and not args.text:
        print("nothing to say: give --wav FILE or --text TEXT", file=sys.stderr)
        return 2
    tools = json.loads(Path(args.mcp_tools).read_text()) if args.mcp_tools else None
    device = SimDevice(ota_url=ota, ws_url=args.ws, device_id=args.device_id, protocol_version=args.protocol_version, token=args.token, mcp_tools=tools, frame_ms=args.frame_ms,
                       firmware_version=args.firmware_version, jitter=args.jitter)
    reports = []
    say = lambda *a: None if args.json else print(*a)  # noqa: E731
    try:
        if ota and not await _activated(device, args.activation_timeout, say):
            print(f"not activated within {args.activation_timeout:.0f} s: nobody entered the code", file=sys.stderr)
            return 1
        await device.connect(features={} if args.no_mcp else {"mcp": True})
    except Exception as exc:  # noqa: BLE001
        print(f"could not connect: {exc}", file=sys.stderr)
        return 1
    say(f"device {device.device_id} connected to {device.ws_url}, session {device.session_id}")
    try:
        if args.wake_word:
            mark = len(device.received)
            await device.wake_word(args.wake_word, preroll=_wake_preroll(args.wake_wav), mode=args.mode)
            if args.mode != "manual":
                # As the firmware: the microphone streams (silence here) while the greeting comes.
                started = lambda: any(r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "start" for r in device.received[mark:])  # noqa: E731
                await device.stream_pcm(np.zeros(0, dtype=np.int16), until=started, max_s=args.timeout)
            greeting = await device.collect_turn(mark, time.monotonic(), timeout=args.timeout)
            say(f"> wake word {args.wake_word!r}: {' -> '.join(_compact(greeting.events)) or 'no greeting'}")
            for sentence in greeting.sentences:
                say(f"  sentence:  {sentence}")
        turns = [("wav", w) for w in args.wav] + [("text", t) for t in args.text]
        for kind, what in turns:
            if device.closed:
                say("the server closed the connection")
                break
            aborter = asyncio.create_task(_abort_after(device, args.abort_after)) if args.abort_after else None
            if kind == "wav":
                say(f"> speaking {what} ({args.mode} mode)")
                report = await device.speak(read_wav(what), mode=args.mode, reply_timeout=args.timeout)
            else:
                say(f"> typing {what!r}")
                report = await device.type_text(what, reply_timeout=args.timeout)
            if aborter:
                aborter.cancel()
            reports.append(report)
            say(f"  events:    {' -> '.join(_compact(report.events))}")
            say(f"  stt:       {report.stt!r}")
            say(f"  emotion:   {report.emotion}")
            for sentence in report.sentences:
                say(f"  sentence:  {sentence}")
            say(f"  audio:     {report.frames} frames, {report.audio_s:.2f} s")
            latency = report.latency_s
            say(f"  latency:   {latency * 1000:.0f} ms (end of speech to first reply audio)" if latency is not None else "  latency:   n/a (no audio)")
            if report.error:
                say(f"  error:     {report.error}")
            if device.drops or report.underruns:
                drops = device.fw.drops
                say(f"  device:    {report.underruns} underruns, dropped {dict(drops.not_speaking) or 0} outside speaking, {drops.queue_full} to a full queue, {drops.flushed} flushed")
    finally:
        await device.close()
    pcm = device.reply_audio()
    if len(pcm):
        write_wav(args.out, pcm, device.downlink_rate)
        say(f"reply audio written to {args.out} ({len(pcm) / device.downlink_rate:.2f} s at {device.downlink_rate} Hz)")
    if args.json:
        print(json.dumps([{**r.__dict__, "latency_s": r.latency_s} for r in reports], indent=2, default=str))
    return 0 if reports and all(r.stopped for r in reports) else 1


async def _activated(device, timeout_s: float, say) -> bool:
    """What the firmware does before it opens a connection (protocol.md §1.5): while the OTA
    answer carries ``activation``, show and speak the code, poll ``activate``, ask OTA again;
    only an answer without it lets the device connect."""
    deadline = time.monotonic() + timeout_s
    await device.ota()
    shown = None
    while (device.ota_response or {}).get("activation"):
        code = device.ota_response["activation"].get("code")
        if code != shown:
            say(f"activation: device {device.device_id} speaks code {code}; bind it in the manager console (Devices) or with: xiaozhi bind {code}")
            shown = code
        if time.monotonic() > deadline:
            return False
        # The firmware polls up to 10 times, 3 s apart; no further than the deadline here.
        if not await device.activate(polls=max(1, min(10, int((deadline - time.monotonic()) / 3) + 1))):
            await asyncio.sleep(1.0)
            await device.ota()
    return True


WAKE_WAV = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio" / "zh_wake.wav"


def _wake_preroll(path: str | None):
    """The wake word's audio, as the firmware buffers it (at most 2 s, the end kept): the given
    WAV, else the checkout's 你好小智 recording cut where the word ends, else none (then the
    gateway greets at once: a `detect` without a pre-roll)."""
    from xiaozhi.sim import read_wav

    if path:
        return read_wav(path)[-2 * 16000:]
    if WAKE_WAV.exists():
        return read_wav(WAKE_WAV)[: 16 * 960]  # speech ends at 0.96 s
    return None


async def _abort_after(device, seconds: float) -> None:
    """Press the button `seconds` after the reply's first audio frame (protocol.md §6.4 b)."""
    mark = len(device.received)
    first = await device.wait_for(lambda r: r.kind == "audio", timeout=120, start_index=mark)
    if first is None:
        return
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - first.at)))
    await device.abort()


def _compact(events: list[str]) -> list[str]:
    """Collapse runs of the same event: tts.sentence_start x3."""
    out: list[str] = []
    for event in events:
        if out and out[-1].split(" x")[0] == event:
            count = int(out[-1].split(" x")[1]) + 1 if " x" in out[-1] else 2
            out[-1] = f"{event} x{count}"
        else:
            out.append(event)
    return out


if __name__ == "__main__":
    sys.exit(main())
