"""TLS on the client side, end to end: an ``ssl:`` listener of the real daemon, a stdlib
HTTPS client that verifies the certificate, keep-alive and a stream over one connection
(the httptools channel under a TLS transport: writes go through TLS, never straight to the
socket)."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl

from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_e2e import ALICE, config


def self_signed(directory) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "yugongd test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def test_tls_listener_keep_alive_and_a_stream(upstream, daemon_factory, tmp_path):
    key, cert = self_signed(tmp_path)
    tls_port = free_port()
    text = config(upstream).replace(
        'listen: "tcp:{port}:interface=127.0.0.1"',
        f'listen:\n  - "tcp:{{port}}:interface=127.0.0.1"\n'
        f'  - "ssl:{tls_port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"',
    )
    daemon_factory(text)
    context = ssl.create_default_context(cafile=cert)
    conn = http.client.HTTPSConnection("127.0.0.1", tls_port, context=context, timeout=10)
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "over tls"}]}
    try:
        for _ in range(2):  # two requests on one TLS connection
            conn.request("POST", "/v1/chat/completions", json.dumps(chat), headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200
            assert body["choices"][0]["message"]["content"] == "echo: over tls"
        sock = conn.sock
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**chat, "stream": True}),
            {**headers, "x-fake-events": "20"},
        )
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        text = r.read().decode()
        assert conn.sock is sock  # still the same connection
        events = [line for line in text.split("\n") if line.startswith("data: {")]
        assert len(events) >= 20 and text.rstrip().endswith("data: [DONE]")
        assert '"choices": []' not in text and '"choices":[]' not in text  # usage stripped
    finally:
        conn.close()
