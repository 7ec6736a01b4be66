"""Hostile input through the real daemon: encoded path tricks against the admin routes,
oversized heads, bad config files, and no key material in any log line of a busy run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import TWISTD, Daemon, free_port
from fakeupstream import Behaviour, FakeUpstream, error_envelope, rate_limited, server_error

POOL_A = "sk-pool-hostile-aaaaaaaaaaaaaaaa"
POOL_B = "sk-pool-hostile-bbbbbbbbbbbbbbbb"
POOL_DEAD = "sk-pool-hostile-dddddddddddddddd"
ALICE = "sk-alice-hostile-0123456789abcdef"
BOB = "sk-bob-hostile-fedcba9876543210"
ADMIN = "admin-hostile-token-0123456789abcdef"

CONFIG = """
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{admin}"}}
pool: {{cooldown: 30, queue_timeout: 0}}
access_log: {{format: json}}
upstreams:
  - name: dead
    base_url: "http://127.0.0.1:{dead}/v1"
    timeouts: {{connect: 1, first_byte: 2, idle: 2}}
    keys:
      - {{id: key-dead, key: "{dead_key}"}}
  - name: fake
    base_url: "{url}"
    timeouts: {{connect: 1, first_byte: 2, idle: 2}}
    keys:
      - {{id: key-a, key: "{a}"}}
      - {{id: key-b, key: "{b}"}}
accounts:
  - {{name: alice, key: "{alice}"}}
  - {{name: bob, key: "{bob}", models: ["gpt-4o"]}}
"""


def config(upstream) -> str:
    return CONFIG.format(
        url=upstream.url,
        dead=free_port(),
        dead_key=POOL_DEAD,
        a=POOL_A,
        b=POOL_B,
        alice=ALICE,
        bob=BOB,
        admin=ADMIN,
    )


@pytest.fixture(scope="module")
def shared(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("hostile"), config(fake))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/%2e%2e/admin/keys",
        b"/v1/%2E%2E/admin/keys",
        b"/v1/..%2Fadmin/keys",
        b"/v1/..%2fadmin%2fkeys",
        b"/v1%2F..%2Fadmin%2Fkeys",
        b"/v1/%2e%2e%2fadmin/keys",
        b"/v1/.%2e/admin/keys",
        b"/v1/..%5Cadmin/keys",
        b"/admin%2Fkeys",
        b"/admin/keys%2F..%2F..%2Fv1",
        b"/v1/../admin/keys",
        b"/v1/./../admin/keys",
        b"//admin/keys",
        b"/v1//../admin/keys",
        b"/%61dmin/keys",
    ],
)
def test_encoded_path_tricks_never_reach_the_admin_api(fake, shared, path):
    d = shared
    answer = raw_request(
        d.port,
        b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"Authorization: Bearer " + ALICE.encode() + b"\r\n\r\n",
    )
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), answer[:300]
    assert b"key_hint" not in answer and b"key-a" not in answer
    assert not [r for r in fake.received if "admin" in r.path]


def test_oversized_heads_through_the_daemon(fake, shared):
    d = shared
    fake.clear()
    long_url = b"GET /v1/models?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
    assert raw_request(d.port, long_url).startswith(b"HTTP/1.1 414 ")
    long_header = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_request(d.port, long_header).startswith(b"HTTP/1.1 431 ")
    many = b"GET /v1/models HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n"
    assert raw_request(d.port, many).startswith(b"HTTP/1.1 400 ")
    assert d.get("/healthz")[0] == 200
    assert not fake.received


def test_no_key_material_in_the_log_of_a_busy_run(upstream, daemon_factory):
    """Failovers, upstream errors, refused clients, admin calls (good and wrong tokens,
    keys and accounts created and rotated), a reload refused for a bad file: then the
    whole log is searched for every secret the daemon ever held."""
    d = daemon_factory(config(upstream))
    secrets = [POOL_A, POOL_B, POOL_DEAD, ALICE, BOB, ADMIN]
    upstream.script(POOL_A, server_error(500), rate_limited(retry_after=1))
    upstream.script(POOL_B, Behaviour(close_before_headers=True))
    alice = openai.OpenAI(base_url=d.url + "/v1", api_key=ALICE, max_retries=0)
    for _ in range(6):
        try:
            alice.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        except openai.APIError:
            pass
    for _ in alice.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "s"}], stream=True
    ):
        pass
    # refused clients: a near miss of a real key, a key of another account's model, junk
    for key in (ALICE[:-1] + "X", ALICE + "0", BOB, "sk-" + "z" * 40):
        client = openai.OpenAI(base_url=d.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    # the admin API, with wrong tokens too
    assert d.get("/admin/keys", token=ADMIN[:-1])[0] == 401
    assert d.get("/admin/keys", token=POOL_A)[0] == 401
    new_pool = "sk-pool-hostile-cccccccccccccccc"
    secrets.append(new_pool)
    status, _, body = d.request(
        "POST", "/admin/keys", {"upstream": "fake", "key": new_pool, "id": "key-c"}, token=ADMIN
    )
    assert status == 201 and new_pool.encode() not in body
    # revoked, and the upstream's 401 echoes the key (some providers do)
    echo = Behaviour(
        status=401,
        body=error_envelope(f"Incorrect API key provided: {new_pool}.", code="invalid_api_key"),
    )
    upstream.set_default(new_pool, echo)
    status, _, body = d.request("POST", "/admin/accounts", {"name": "carol"}, token=ADMIN)
    assert status == 201
    created = json.loads(body)
    secrets.append(created["key"])
    status, _, body = d.request("POST", f"/admin/accounts/{created['id']}/rotate", token=ADMIN)
    assert status == 200
    secrets.append(json.loads(body)["key"])
    carol = openai.OpenAI(base_url=d.url + "/v1", api_key=secrets[-1], max_retries=0)
    for _ in range(4):
        try:
            carol.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "c"}]
            )
        except openai.APIError:
            pass
    # only the revoked key left: its 401 is what the client gets, without the key in it
    for key_id, enabled in (
        ("key-a", False),
        ("key-b", False),
        ("key-dead", False),
        ("key-c", True),
    ):
        status, _, _ = d.request(
            "PATCH", f"/admin/keys/{key_id}", {"enabled": enabled}, token=ADMIN
        )
        assert status == 200
    with pytest.raises(openai.AuthenticationError) as e:
        alice.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert "Incorrect API key provided: sk-…cccc" in e.value.response.text
    for path in ("/admin/keys", "/admin/accounts", "/admin/usage", "/metrics"):
        status, _, body = d.get(path, token=ADMIN)
        assert status == 200
        for secret in secrets:
            assert secret.encode() not in body
    # a reload with a broken file (duplicate keys) is refused and logged
    d.config_path.write_text(
        config(upstream)
        .replace("{port}", str(d.port))
        .replace(f'{{name: bob, key: "{BOB}"', f'{{name: bob, key: "{ALICE}"')
    )
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in d.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    d.stop()
    out = d.output()
    assert "accounts[1].key: same key as accounts[0].key" in out
    assert "key-a" in out and "yugongd.access" in out and "Server Shut Down" in out
    for secret in secrets:
        assert secret not in out, secret
        # nor a recognisable part of it (a prefix long enough to be the key, not its hint)
        assert secret[:-4] not in out, secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstreams: [\n  - name: x\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        (
            "upstreams:\n  - {name: u, base_url: 'http://127.0.0.1:1/v1', "
            "keys: [{key: 'sk-secret-in-bad-config-000', rpm: 'fast'}]}\n",
            "upstreams[0].keys[0].rpm: expected an integer",
        ),
        (
            "upstreams:\n  - {name: u, base_url: 'http://127.0.0.1:1/v1'}\n"
            "limits: {header_timeout: 'soon'}\n",
            "limits.header_timeout: expected a number",
        ),
        (
            "upstreams:\n  - {name: u, base_url: 'http://127.0.0.1:1/v1'}\n"
            "accounts:\n  - {name: a, key: 'sk-secret-in-bad-config-000'}\n"
            "  - {name: b, key: 'sk-secret-in-bad-config-000'}\n",
            "accounts[1].key: same key as accounts[0].key",
        ),
        ("\x00\x01\x02 binary", "not valid YAML"),
    ],
    ids=["truncated", "list", "wrong-type", "limits-type", "duplicate-key", "binary"],
)
def test_a_bad_config_file_stops_the_daemon_with_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "yugongd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "sk-secret-in-bad-config" not in lines[0]
