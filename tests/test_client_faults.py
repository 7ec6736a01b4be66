"""Faults from clients, through the real daemon: a client that leaves at every stage, clients
that read nothing, slowloris headers, and more idle keep-alive connections than allowed.

The daemon runs with small bounds (``limits.header_timeout: 1``, ``idle_timeout: 2``,
``max_connections: 40``) so that every bound is reached within a second or two.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon
from fakeupstream import Behaviour, FakeUpstream, rate_limited
from test_faults import ledger_row, rss_kb

ALICE = "sk-alice-clientfaults-0123456789"
ADMIN = "admin-clientfaults-0123456789"
FAST = "sk-cf-fast-000000000000000000"
HANG = "sk-cf-hang-000000000000000000"
QUEUE = "sk-cf-queue-00000000000000000"
MAX_CONNECTIONS = 40

CONFIG = f"""
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{ADMIN}"}}
limits: {{header_timeout: 1, idle_timeout: 2, max_connections: {MAX_CONNECTIONS}}}
pool: {{cooldown: 30, queue_timeout: 10, probe_interval: 600}}
upstreams:
  - name: fake
    base_url: "URL"
    timeouts: {{connect: 1, first_byte: 20, idle: 20}}
    keys:
      - {{id: fast, key: "{FAST}", models: ["gpt-4o-mini", "tts-1"]}}
      - {{id: hang, key: "{HANG}", models: ["m-hang"]}}
      - {{id: queue, key: "{QUEUE}", models: ["m-queue"]}}
accounts:
  - name: alice
    key: "{ALICE}"
"""


@pytest.fixture(scope="module")
def gw(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("clientfaults"), CONFIG.replace("URL", fake.url))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def bounded(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Long idle timeout, so that only ``max_connections`` closes idle connections."""
    config = CONFIG.replace("URL", fake.url).replace("idle_timeout: 2", "idle_timeout: 60")
    d = Daemon(tmp_path_factory.mktemp("bounded"), config)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(autouse=True)
def clean(fake: FakeUpstream) -> None:
    fake.clear()
    fake.set_default(HANG, Behaviour(hang_before_headers=30))


def keys(d: Daemon) -> dict[str, dict]:
    status, _, body = d.get("/admin/keys", token=ADMIN)
    assert status == 200
    return {k["id"]: k for k in json.loads(body)["data"]}


def open_fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def head(
    path: str, body: bytes, request_id: str, extra: str = "", length: int | None = None
) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Type: application/json\r\nX-Request-Id: {request_id}\r\n{extra}"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    ).encode()


def chat_body(model: str = "gpt-4o-mini", stream: bool = False, content: str = "hi") -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    ).encode()


def connect(d: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until EOF or ``seconds``; (whether EOF came, what was read)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    got = b""
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


def request_on(sock: socket.socket, request_id: str) -> int:
    """One keep-alive chat request on an open socket; its status."""
    body = chat_body()
    sock.sendall(head("/v1/chat/completions", body, request_id) + body)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.read()
    return resp.status


# -- a client that leaves -----------------------------------------------------------------


def test_disconnect_during_upload_reaches_no_upstream_and_leaks_nothing(fake, gw):
    body = chat_body(content="x" * 300_000)  # above 100 kB: twisted.web spools it to a file
    before = open_fds(gw)
    for i in range(20):
        sock = connect(gw)
        sock.sendall(head("/v1/chat/completions", body, f"upload-{i}") + body[:150_000])
        sock.close()
    time.sleep(0.5)
    assert open_fds(gw) <= before + 2  # no socket or spool file left behind
    assert not fake.received  # the body never completed: nothing was forwarded
    # the request was never received whole, so it is not billed; the daemon serves on
    sock = connect(gw)
    assert request_on(sock, "after-upload") == 200
    sock.close()
    assert ledger_row(gw, "after-upload")["status"] == 200
    with pytest.raises(AssertionError):
        ledger_row(gw, "upload-0", timeout=0.5)


def test_disconnect_while_waiting_for_the_upstream_aborts_it(fake, gw):
    sock = connect(gw)
    body = chat_body(model="m-hang")
    sock.sendall(head("/v1/chat/completions", body, "waiting") + body)
    assert fake.wait_for(lambda u: len(u.received) == 1)
    assert keys(gw)["hang"]["inflight"] == 1
    sock.close()
    # the gateway cancelled its upstream request: the fake saw the connection close
    assert fake.wait_for(lambda u: "waiting" in u.disconnects, timeout=5)
    row = ledger_row(gw, "waiting")
    assert (row["status"], row["key_id"], row["attempts"]) == (499, "hang", 1)
    info = keys(gw)["hang"]
    assert info["inflight"] == 0 and info["state"] == "active" and info["failures"] == 0


def test_disconnect_mid_stream_aborts_the_upstream_and_writes_the_row(fake, gw):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        chat_body(stream=True, content="a long answer"),
        {
            "Authorization": f"Bearer {ALICE}",
            "Content-Type": "application/json",
            "X-Request-Id": "mid-stream",
            "x-fake-events": "400",
            "x-fake-interval": "0.02",
        },
    )
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert fake.wait_for(lambda u: "mid-stream" in u.disconnects, timeout=5)
    row = ledger_row(gw, "mid-stream")
    assert row["status"] == 200 and row["key_id"] == "fast"
    assert row["estimated"] == 1  # the usage chunk never came: estimated from the relayed text
    assert keys(gw)["fast"]["inflight"] == 0


def test_disconnect_while_queued_for_a_cooling_key(fake, gw):
    fake.script(QUEUE, rate_limited(retry_after=3))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", chat_body(model="m-queue"), headers)
    resp = conn.getresponse()
    assert resp.status == 429  # the only key is cooling for 3 s now
    resp.read()
    conn.close()
    sock = connect(gw)
    body = chat_body(model="m-queue")
    sock.sendall(head("/v1/chat/completions", body, "queued") + body)
    time.sleep(0.3)
    status, _, metrics = gw.get("/metrics", token=ADMIN)
    assert b"yugongd_queue_waiting 1" in metrics
    sock.close()
    row = ledger_row(gw, "queued")
    assert (row["status"], row["attempts"], row["key_id"]) == (499, 0, None)
    status, _, metrics = gw.get("/metrics", token=ADMIN)
    assert b"yugongd_queue_waiting 0" in metrics
    time.sleep(3.2)  # past the cooldown: the request that left is not sent
    assert len(fake.requests_for("/v1/chat/completions")) == 1


# -- clients that read nothing ------------------------------------------------------------


def test_clients_that_read_nothing_do_not_grow_memory(fake, gw):
    """30 streams of 18 MB each to clients that read nothing: the gateway stops reading
    the upstream instead of buffering, so its RSS barely moves."""
    before = rss_kb(gw)
    socks = []
    for i in range(30):
        sock = connect(gw)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        body = chat_body(stream=True, content="slow reader")
        extra = "x-fake-events: 300\r\nx-fake-pad: 60000\r\n"
        sock.sendall(head("/v1/chat/completions", body, f"nonreader-{i}", extra) + body)
        socks.append(sock)
    time.sleep(3.0)
    grown = rss_kb(gw) - before
    offered = 30 * 300 * 60000
    try:
        assert grown < 40_000, f"RSS grew {grown} kB while {offered >> 20} MB were on offer"
        status, _, body = gw.get("/healthz")
        assert status == 200  # and it stays responsive meanwhile
    finally:
        for sock in socks:
            sock.close()
    for i in range(30):
        assert fake.wait_for(lambda u, i=i: f"nonreader-{i}" in u.disconnects, timeout=10)
    assert ledger_row(gw, "nonreader-29")["status"] == 200
    assert keys(gw)["fast"]["inflight"] == 0


# -- slowloris and idle connections -------------------------------------------------------


def test_slowloris_headers_are_timed_out(gw):
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
    started = time.monotonic()
    closed = False
    answer = b""
    # a byte every 0.3 s keeps the idle timeout (2 s) from ever firing
    for _ in range(20):
        try:
            sock.sendall(b"X")
        except OSError:
            closed = True
            break
        done, got = closed_within(sock, 0.3)
        answer += got
        if done:
            closed = True
            break
    took = time.monotonic() - started
    sock.close()
    assert closed, "a client dribbling its headers held the connection for 6 s"
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert took < 3  # limits.header_timeout is 1 s
    time.sleep(0.2)
    assert "request headers not complete within 1s" in Path(gw.log_path).read_text(errors="replace")


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(gw):
    sock = connect(gw)
    assert request_on(sock, "keepalive-idle") == 200
    closed, _ = closed_within(sock, 4)  # limits.idle_timeout is 2 s
    sock.close()
    assert closed


def test_idle_keep_alive_connections_are_bounded(bounded):
    gw = bounded
    baseline = open_fds(gw)
    idle = []
    for i in range(MAX_CONNECTIONS):
        sock = connect(gw)
        assert request_on(sock, f"idle-{i}") == 200
        idle.append(sock)
    fresh = []
    for i in range(20):
        sock = connect(gw)
        assert request_on(sock, f"fresh-{i}") == 200  # served: an idle one made room
        fresh.append(sock)
    time.sleep(0.3)
    evicted = [s for s in idle if closed_within(s, 0.05)[0]]
    assert len(evicted) == 20
    assert evicted == idle[:20]  # the longest idle went first
    assert open_fds(gw) <= baseline + MAX_CONNECTIONS + 2
    for s in idle + fresh:
        s.close()


def test_when_no_connection_is_idle_a_new_one_is_refused(bounded):
    gw = bounded
    held = []
    for _ in range(MAX_CONNECTIONS):
        sock = connect(gw)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")  # headers never finished
        held.append(sock)
    time.sleep(0.2)
    extra = connect(gw)
    closed, got = closed_within(extra, 0.5)
    assert closed and got == b""
    extra.close()
    # the partial requests hit their header timeout; then there is room again
    for sock in held:
        done, got = closed_within(sock, 3)
        assert done and got.startswith(b"HTTP/1.1 408 ")
        sock.close()
    assert gw.get("/healthz")[0] == 200
