"""Upstream faults through the real daemon: each fault is scripted on the fake upstream for
keys that serve one model of their own, so one daemon serves every scenario.

For each fault the test checks what the client gets (failover before the first byte, a
final SSE ``data: {"error": …}`` event after it, an OpenAI error envelope), the key's state
afterwards (``GET /admin/keys``) and the request's ledger row (the SQLite file).
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, free_port
from fakeupstream import Behaviour, FakeUpstream

ALICE = "sk-alice-faults-0123456789abcdef"
ADMIN = "admin-faults-0123456789abcdef"

#: scenario -> ((key id, behaviour or None for a healthy key), ...); every scenario gets its
#: own model ``m-<scenario>`` served only by its keys
SCENARIOS: dict[str, tuple[tuple[str, Behaviour | None], ...]] = {
    "reset-head": (
        ("reset-head", Behaviour(close_before_headers=True)),
        ("reset-head-ok", None),
    ),
    "hang-head": (
        ("hang-head", Behaviour(hang_before_headers=30)),
        ("hang-head-ok", None),
    ),
    "all-hang": (
        ("all-hang-1", Behaviour(hang_before_headers=30)),
        ("all-hang-2", Behaviour(hang_before_headers=30)),
    ),
    "reset-body": (("reset-body", Behaviour(drop_after_events=2)),),
    "hang-mid": (("hang-mid", Behaviour(hang_after_events=2)),),
    "trickle": (("trickle", Behaviour(trickle=0.25)),),
    "trickle-slow": (("trickle-slow", Behaviour(trickle=2.0)),),
    "bad-sse": (
        (
            "bad-sse",
            Behaviour(
                raw=b'data: {"choices": [{"delta": {"content": "hel'
                b"\n\ndata: {{{ not json\n\n"
                b": a comment\n\n"
                b"event: odd\ndata: [1, 2\n\n"
                b'data: {"usage": "not an object", "choices": []}\n\n'
                b"data: " + b"[" * 5_000 + b'"usage"' + b"]" * 5_000 + b"\n\n"
                b"data: [DONE]",
                content_type="text/event-stream",
                chunked=True,
            ),
        ),
    ),
    "not-json": (
        (
            "not-json",
            Behaviour(raw=b"<html>502 Bad Gateway</html>", content_type="application/json"),
        ),
    ),
    "deep-json": (
        (
            "deep-json",
            Behaviour(raw=b"[" * 5_000 + b"]" * 5_000, content_type="application/json"),
        ),
    ),
    "huge-headers": (
        ("huge-headers", Behaviour(header_bytes=1 << 20)),
        ("huge-headers-ok", None),
    ),
    "long-header": (
        ("long-header", Behaviour(headers={"x-long": "a" * 70_000})),
        ("long-header-ok", None),
    ),
    "big-body": (("big-body", None),),
}


def secret(key_id: str) -> str:
    return "sk-flt-" + key_id.ljust(24, "0")


def model(scenario: str) -> str:
    return f"m-{scenario}"


def make_config(upstream_url: str, dead_port: int) -> str:
    keys = []
    for scenario, entries in SCENARIOS.items():
        for key_id, _ in entries:
            keys.append(
                f'      - {{id: {key_id}, key: "{secret(key_id)}", models: ["{model(scenario)}"]}}'
            )
    return f"""
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{ADMIN}"}}
pool: {{cooldown: 30, queue_timeout: 0, probe_interval: 600}}
failover: {{attempts: 3}}
access_log: {{enabled: true}}
upstreams:
  - name: dead
    base_url: "http://127.0.0.1:{dead_port}/v1"
    timeouts: {{connect: 1, first_byte: 1, idle: 1}}
    keys:
      - {{id: refused, key: "{secret("refused")}", models: ["m-refused"]}}
  - name: fake
    base_url: "{upstream_url}"
    timeouts: {{connect: 1, first_byte: 1, idle: 1}}
    keys:
      - {{id: refused-ok, key: "{secret("refused-ok")}", models: ["m-refused"]}}
{chr(10).join(keys)}
accounts:
  - name: alice
    key: "{ALICE}"
"""


@pytest.fixture(scope="module")
def gw(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("faults")
    d = Daemon(workdir, make_config(fake.url, free_port()))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(autouse=True)
def scripted(fake: FakeUpstream) -> Iterator[None]:
    fake.clear()
    for entries in SCENARIOS.values():
        for key_id, behaviour in entries:
            fake.set_default(secret(key_id), behaviour)
    yield


# -- helpers ----------------------------------------------------------------------------


def keys(d: Daemon) -> dict[str, dict[str, Any]]:
    status, _, body = d.get("/admin/keys", token=ADMIN)
    assert status == 200
    return {k["id"]: k for k in json.loads(body)["data"]}


def ledger_row(d: Daemon, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The request's row in the SQLite ledger (written within about a second)."""
    deadline = time.monotonic() + timeout
    db = Path(d.workdir) / "yugongd.db"
    while True:
        if db.exists():
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute(
                    "SELECT * FROM ledger WHERE request_id = ?", (request_id,)
                ).fetchall()
            except sqlite3.OperationalError:
                rows = []
            finally:
                conn.close()
            if rows:
                assert len(rows) == 1, f"{len(rows)} rows for {request_id}"
                return dict(rows[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for {request_id}")
        time.sleep(0.1)


def send(
    d: Daemon,
    scenario: str,
    request_id: str,
    *,
    stream: bool = False,
    path: str = "/v1/chat/completions",
    doc: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    body = doc or {
        "model": model(scenario),
        "messages": [{"role": "user", "content": "fault " + scenario}],
        "stream": stream,
    }
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
    conn.request(
        "POST",
        path,
        json.dumps(body),
        {
            "Authorization": f"Bearer {ALICE}",
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            **(headers or {}),
        },
    )
    return conn, conn.getresponse()


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def still_serving(d: Daemon) -> None:
    """The daemon answers other requests normally (and quickly) after the fault."""
    conn, resp = send(d, "big-body", f"after-{time.monotonic_ns()}", headers={"x-fake-events": "2"})
    assert resp.status == 200, resp.read()
    assert json.loads(resp.read())["choices"][0]["message"]["content"].startswith("echo: ")
    conn.close()


def rss_kb(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- before the first byte: failover ----------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "bad", "good", "error_part"),
    [
        ("refused", "refused", "refused-ok", "connect failed"),
        ("reset-head", "reset-head", "reset-head-ok", "connection failed"),
        ("hang-head", "hang-head", "hang-head-ok", "no response within 1s"),
        ("huge-headers", "huge-headers", "huge-headers-ok", "connection failed"),
        ("long-header", "long-header", "long-header-ok", "connection failed"),
    ],
)
def test_a_fault_before_the_first_byte_fails_over(fake, gw, scenario, bad, good, error_part):
    # least-loaded rotates between the two idle keys: within two requests the bad one is tried
    for i in range(2):
        conn, resp = send(gw, scenario, f"{scenario}-{i}")
        body = resp.read()
        assert resp.status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == f"echo: fault {scenario}"
        conn.close()
    # a connection failure cools the key for 1 s (doubling on repeats): look at once
    info = keys(gw)
    assert info[bad]["state"] == "cooling", info[bad]
    assert error_part in info[bad]["last_error"], info[bad]
    assert info[bad]["failures"] == 1 and info[good]["state"] == "active"
    rows = [ledger_row(gw, f"{scenario}-{i}") for i in range(2)]
    failed_over = [r for r in rows if r["attempts"] == 2]
    assert len(failed_over) == 1, rows
    row = failed_over[0]
    assert (row["status"], row["key_id"], row["estimated"]) == (200, good, 0)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 5
    if scenario == "hang-head":
        # the attempt that timed out was aborted: the upstream saw the connection close
        assert fake.wait_for(
            lambda u: "hang-head-0" in u.disconnects or "hang-head-1" in u.disconnects
        )
    still_serving(gw)


def test_every_key_hanging_is_504_upstream_timeout(fake, gw):
    conn, resp = send(gw, "all-hang", "all-hang")
    body = json.loads(resp.read())
    assert resp.status == 504
    assert body["error"]["code"] == "upstream_timeout" and body["error"]["param"] is None
    assert "1s" in body["error"]["message"]
    info = keys(gw)
    for key_id in ("all-hang-1", "all-hang-2"):
        assert info[key_id]["failures"] == 1
        assert "no response within 1s" in info[key_id]["last_error"]
    # the key tried last still cools (the first one's 1 s has run out meanwhile)
    assert "cooling" in (info["all-hang-1"]["state"], info["all-hang-2"]["state"]), info
    row = ledger_row(gw, "all-hang")
    assert (row["status"], row["attempts"], row["prompt_tokens"], row["cost_usd"]) == (504, 2, 0, 0)
    # both hung attempts were cut when their first-byte timeout fired
    assert fake.wait_for(lambda u: u.disconnects.count("all-hang") == 2)


# -- after the first byte: never a silent cut -------------------------------------------


def test_reset_mid_stream_ends_with_an_sse_error_event(fake, gw):
    conn, resp = send(gw, "reset-body", "reset-stream", stream=True)
    assert resp.status == 200
    events = sse_events(resp.read())
    assert len([e for e in events if b'"delta": {"content"' in e]) == 2
    last = json.loads(events[-1][len(b"data: ") :])
    assert last["error"]["code"] == "upstream_unavailable"
    assert b"[DONE]" not in b"".join(events)
    row = ledger_row(gw, "reset-stream")
    # the partial stream is still accounted, as an estimate
    assert (row["status"], row["estimated"], row["key_id"]) == (200, 1, "reset-body")
    assert row["prompt_tokens"] > 0
    # too late to fail over, but the key that broke off is judged like one that never
    # answered (a short cooldown, 1 s, long over by now that the row is written)
    info = keys(gw)["reset-body"]
    assert info["failures"] == 1 and "after the first byte" in info["last_error"], info
    still_serving(gw)


def wait_active(d: Daemon, key_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while keys(d)[key_id]["state"] != "active":
        assert time.monotonic() < deadline, keys(d)[key_id]
        time.sleep(0.1)


def test_reset_mid_body_cuts_the_connection_never_a_short_whole_body(fake, gw):
    wait_active(gw, "reset-body")  # the short cooldown of the test before
    conn, resp = send(gw, "reset-body", "reset-json")
    assert resp.status == 200
    declared = int(resp.getheader("content-length"))
    with pytest.raises(http.client.IncompleteRead) as e:
        resp.read()
    assert 0 < len(e.value.partial) < declared
    row = ledger_row(gw, "reset-json")
    assert (row["status"], row["key_id"], row["attempts"]) == (200, "reset-body", 1)
    assert keys(gw)["reset-body"]["failures"] == 2
    still_serving(gw)


def test_hang_mid_stream_hits_the_idle_timeout(fake, gw):
    started = time.monotonic()
    conn, resp = send(gw, "hang-mid", "hang-mid", stream=True)
    events = sse_events(resp.read())
    took = time.monotonic() - started
    assert resp.status == 200
    assert len([e for e in events if b'"delta": {"content"' in e]) == 2
    last = json.loads(events[-1][len(b"data: ") :])
    assert last["error"]["code"] == "upstream_timeout"
    assert "idle" in last["error"]["message"]
    assert took < 10  # the fake would hang for 30 s
    # the stalled upstream connection was closed by the gateway
    assert fake.wait_for(lambda u: "hang-mid" in u.disconnects)
    row = ledger_row(gw, "hang-mid")
    assert (row["status"], row["estimated"]) == (200, 1)
    assert row["completion_tokens"] >= 1  # estimated from the text that was relayed


def test_a_trickle_is_relayed_byte_by_byte_and_not_cut_while_bytes_flow(fake, gw):
    conn, resp = send(gw, "trickle", "trickle")
    assert resp.status == 200
    got = b""
    arrivals = []
    # 8 bytes at 0.25 s each: each one reaches the client as the upstream sends it
    while len(got) < 8:
        got += resp.read(1)
        arrivals.append(time.monotonic())
    assert got == b'{"id": "'
    assert arrivals[-1] - arrivals[0] > 1.0  # trickled, not buffered and sent at once
    # meanwhile the daemon serves others
    still_serving(gw)
    conn.close()
    # the client left: the trickling upstream request is aborted, the row written
    assert fake.wait_for(lambda u: "trickle" in u.disconnects, timeout=5)
    row = ledger_row(gw, "trickle")
    assert row["status"] == 200 and row["key_id"] == "trickle"


def test_a_trickle_slower_than_the_idle_timeout_is_cut(fake, gw):
    conn, resp = send(gw, "trickle-slow", "trickle-slow")
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    assert fake.wait_for(lambda u: "trickle-slow" in u.disconnects, timeout=5)
    row = ledger_row(gw, "trickle-slow")
    assert row["status"] == 200


def test_malformed_sse_is_relayed_and_accounted_as_an_estimate(fake, gw):
    conn, resp = send(
        gw,
        "bad-sse",
        "bad-sse",
        doc={
            "model": "m-bad-sse",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status == 200
    raw = resp.read()
    behaviour = SCENARIOS["bad-sse"][0][1]
    assert behaviour is not None and raw == behaviour.raw  # byte for byte, nothing held back
    row = ledger_row(gw, "bad-sse")
    assert (row["status"], row["estimated"]) == (200, 1)
    assert keys(gw)["bad-sse"]["state"] == "active"
    still_serving(gw)


def test_malformed_sse_with_usage_stripping_still_ends(fake, gw):
    # the client did not ask for usage: the gateway parses events to strip the usage chunk
    conn, resp = send(gw, "bad-sse", "bad-sse-strip", stream=True)
    assert resp.status == 200
    raw = resp.read()
    assert raw.endswith(b"data: [DONE]") and b"{{{ not json" in raw
    row = ledger_row(gw, "bad-sse-strip")
    assert (row["status"], row["estimated"]) == (200, 1)


@pytest.mark.parametrize("scenario", ["not-json", "deep-json"])
def test_a_200_whose_body_is_not_json_is_passed_through(fake, gw, scenario):
    conn, resp = send(gw, scenario, scenario)
    assert resp.status == 200
    behaviour = SCENARIOS[scenario][0][1]
    assert behaviour is not None and resp.read() == behaviour.raw
    row = ledger_row(gw, scenario)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 0, 0)
    assert keys(gw)[scenario]["state"] == "active"
    still_serving(gw)


def test_a_response_larger_than_the_client_reads(fake, gw):
    """The client reads 1 MB of 200 MB and leaves: the upstream read stalls meanwhile
    (backpressure, RSS flat), and stops when the client goes."""
    total = 200 << 20
    before = rss_kb(gw)
    conn, resp = send(
        gw,
        "big-body",
        "big-body",
        path="/v1/audio/speech",
        doc={"model": "m-big-body", "input": "x", "voice": "alloy"},
        headers={"x-fake-bytes": str(total)},
    )
    assert resp.status == 200 and int(resp.getheader("content-length")) == total
    assert len(resp.read(1 << 20)) == 1 << 20
    time.sleep(1.0)
    stalled = fake.sent.get("big-body", 0)
    assert 0 < stalled < 40 << 20, stalled
    assert rss_kb(gw) - before < 40_000  # KB: nowhere near the 200 MB body
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert fake.wait_for(lambda u: "big-body" in u.disconnects, timeout=5)
    assert fake.sent["big-body"] < total
    row = ledger_row(gw, "big-body")
    assert row["status"] == 200 and row["key_id"] == "big-body"
    still_serving(gw)
