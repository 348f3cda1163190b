"""Issue 14: NATS credentials inside ``XZ_NATS__URL`` (nats://user:password@host) were logged
in clear at every connect and reconnect. A real service connects with such a URL to a real
nats-server with users (first while the server is down, then after a restart of it): its log
must carry the URL without the password."""

from __future__ import annotations

import time

from tests.conftest import log_records
from xiaozhi.stack import Stack, free_port, healthy, wait_tcp


def test_the_password_in_the_nats_url_never_reaches_the_log(tmp_path):
    port = free_port()
    stack = Stack(env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}, log_dir=tmp_path / "logs")
    try:
        stack.start_nats(port, "127.0.0.1", str(tmp_path / "js"), log_file=str(tmp_path / "nats.log"), auth_dir=tmp_path / "auth")
        password = stack.nats_users["tools"].read_text().strip()
        url = f"nats://tools:{password}@127.0.0.1:{port}"
        server = next(p for p in stack.procs if p.name == "nats")
        server.popen.terminate()
        server.popen.wait(10)
        # Started while NATS is down: its first connects fail (and are logged).
        service = stack.start_service("tools", free_port(), {"XZ_NATS__URL": url})
        deadline = time.monotonic() + 120
        while '"nats error: ' not in ((tmp_path / "logs/tools.log").read_text() if (tmp_path / "logs/tools.log").exists() else ""):
            assert service.alive() and time.monotonic() < deadline
            time.sleep(0.3)
        stack.restart(server)
        assert wait_tcp("127.0.0.1", port, 10)
        deadline = time.monotonic() + 120
        while not healthy(service.metrics_port):  # type: ignore[arg-type]
            assert service.alive() and time.monotonic() < deadline, (tmp_path / "logs/tools.log").read_text()[-3000:]
            time.sleep(0.3)
        # NATS restarts (same users): the service reconnects and logs that too.
        server.popen.terminate()
        server.popen.wait(10)
        time.sleep(1)
        stack.restart(server)
        assert wait_tcp("127.0.0.1", port, 10)
        deadline = time.monotonic() + 60
        text = ""
        while not log_records(text, "nats reconnected"):
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.3)
            text = (tmp_path / "logs/tools.log").read_text()
    finally:
        stack.stop()
    text = (tmp_path / "logs/tools.log").read_text()
    assert password not in text
    connected = log_records(text, "nats connected")
    assert connected and connected[0]["url"] == f"nats://tools:[redacted]@127.0.0.1:{port}", connected
    assert log_records(text, "nats reconnected")[0]["url"].startswith("nats://tools:[redacted]@127.0.0.1")
