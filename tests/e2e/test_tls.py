"""Optional TLS: wss:// and https:// on the gateway, tls:// to NATS. Certificates are made
here (a throwaway CA and a server certificate for 127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import start_gateway
from xiaozhi.sim import SimDevice
from xiaozhi.stack import Stack, free_port, nats_server_binary, wait_tcp

pytestmark = pytest.mark.e2e


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xiaozhi test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


async def test_device_talks_over_https_and_wss(pipeline, tmp_path):
    ca, cert, key = make_certs(tmp_path)
    gateway = start_gateway(pipeline.stack, tls_cert_file=str(cert), tls_key_file=str(key))
    trust = ssl.create_default_context(cafile=str(ca))
    try:
        async with SimDevice(ota_url=f"https://127.0.0.1:{gateway.http_port}/xiaozhi/ota/", ssl_context=trust) as device:
            assert device.ws_url.startswith("wss://127.0.0.1:"), device.ws_url
            report = await device.type_text("What time is it?")
            assert report.error is None and report.frames > 0, report
        # Plain ws:// to the TLS port does not get a session.
        with pytest.raises(Exception):
            async with SimDevice(ws_url=f"ws://127.0.0.1:{gateway.ws_port}/xiaozhi/v1/"):
                pass
    finally:
        gateway.stop()


def test_services_connect_to_nats_over_tls(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream: {{ store_dir: "{tmp_path / "js"}" }}\ntls: {{ cert_file: "{cert}", key_file: "{key}" }}\n')
    nats = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    stack = Stack(env={"XZ_LOG_JSON": "true"}, log_dir=tmp_path / "logs")
    try:
        assert wait_tcp("127.0.0.1", port, 10)
        stack.nats_url = f"tls://127.0.0.1:{port}"
        trusted = stack.start_service("tools", free_port(), {"XZ_NATS__TLS_CA_FILE": str(ca)})
        stack.wait_healthy([trusted], timeout=60)
        # Without the CA the certificate is not trusted: the service never reaches NATS.
        untrusted = stack.start_service("tools", free_port(), {})
        time.sleep(4)
        with pytest.raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{untrusted.metrics_port}/healthz", timeout=2)
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "logs" / "tools.log").read_text()
    finally:
        stack.stop()
        nats.terminate()
        nats.wait(10)
