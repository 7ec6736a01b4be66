"""Nothing lost: under a mixed load with upstream faults and clients that leave, every
request has exactly one ledger row and every account's totals equal the sum of its rows;
after SIGKILL and a restart, only rows of the last second may be missing.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import sqlite3
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from fakeupstream import Behaviour, FakeUpstream, rate_limited, server_error

ADMIN = "admin-nothing-lost-0123456789"
KEY_A = "sk-lost-a-000000000000000000"
KEY_B = "sk-lost-b-000000000000000000"
ACCOUNTS = {
    "alice": "sk-alice-lost-0123456789abcdef",
    "bob": "sk-bob-lost-0123456789abcdef0",
    "carol": "sk-carol-lost-0123456789abcdef",
}

CONFIG = f"""
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{ADMIN}"}}
pool: {{cooldown: 1, max_cooldown: 2, queue_timeout: 2}}
access_log: {{enabled: false}}
upstreams:
  - name: fake
    base_url: "URL"
    timeouts: {{connect: 1, first_byte: 2, idle: 2}}
    keys:
      - {{id: key-a, key: "{KEY_A}"}}
      - {{id: key-b, key: "{KEY_B}"}}
accounts:
  - {{name: alice, key: "{ACCOUNTS["alice"]}"}}
  - {{name: bob, key: "{ACCOUNTS["bob"]}", models: ["gpt-4o-mini", "text-embedding-3-small"]}}
  - {{name: carol, key: "{ACCOUNTS["carol"]}"}}
"""


def faults(rng: random.Random, n: int) -> list[Behaviour]:
    """A script for the flaky key: mostly fine, with every kind of upstream fault."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.10:
            out.append(server_error(500))
        elif r < 0.17:
            out.append(Behaviour(close_before_headers=True))
        elif r < 0.22:
            out.append(rate_limited(retry_after=0.2))
        elif r < 0.30:
            out.append(Behaviour(drop_after_events=1))  # cut after the first byte
        else:
            out.append(Behaviour())
    return out


def one_request(port: int, rng: random.Random, request_id: str) -> dict[str, Any]:
    """Send one request of a random kind; return what happened."""
    account = rng.choice(list(ACCOUNTS))
    kind = rng.choices(["chat", "stream", "embed", "denied"], [50, 35, 10, 5])[0]
    leave = rng.random() < 0.08
    headers = {
        "Authorization": f"Bearer {ACCOUNTS[account]}",
        "Content-Type": "application/json",
        "X-Request-Id": request_id,
        "x-fake-events": str(rng.randint(1, 8)),
    }
    if kind == "embed":
        path, doc = "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x" * 40}
    else:
        model = "gpt-4o" if kind == "denied" else "gpt-4o-mini"
        if kind == "denied":
            account = "bob"
            headers["Authorization"] = f"Bearer {ACCOUNTS['bob']}"
        doc = {
            "model": model,
            "messages": [{"role": "user", "content": "n" * rng.randint(1, 200)}],
            "stream": kind == "stream",
        }
        path = "/v1/chat/completions"
    if leave:
        headers["x-fake-delay" if kind != "stream" else "x-fake-interval"] = "0.2"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(doc), headers)
        if leave:
            if kind == "stream":
                resp = conn.getresponse()
                resp.readline()
            else:
                time.sleep(0.05)
            conn.sock.shutdown(socket.SHUT_RDWR)
            return {"id": request_id, "account": account, "status": None}
        resp = conn.getresponse()
        try:
            resp.read()
        except http.client.IncompleteRead:
            pass  # the upstream broke off a non-streamed body after its first byte
        return {"id": request_id, "account": account, "status": resp.status}
    finally:
        conn.close()


def ledger(d: Daemon) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{Path(d.workdir) / 'yugongd.db'}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ledger")]
    finally:
        conn.close()


def account_ids(d: Daemon) -> dict[str, str]:
    status, _, body = d.get("/admin/accounts", token=ADMIN)
    assert status == 200
    return {a["name"]: a["id"] for a in json.loads(body)["data"]}


def check_totals(d: Daemon, rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each account's totals (admin API, in memory) equal the sum of its ledger rows."""
    sums: dict[str, dict[str, float]] = defaultdict(
        lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    )
    for r in rows:
        s = sums[r["account_id"]]
        s["requests"] += 1
        s["prompt_tokens"] += r["prompt_tokens"]
        s["completion_tokens"] += r["completion_tokens"]
        s["cost_usd"] += r["cost_usd"]
    for name, account_id in account_ids(d).items():
        status, _, body = d.get(f"/admin/accounts/{account_id}", token=ADMIN)
        assert status == 200
        doc = json.loads(body)
        want = sums[account_id]
        assert doc["usage"] == {
            "requests": want["requests"],
            "prompt_tokens": want["prompt_tokens"],
            "completion_tokens": want["completion_tokens"],
        }, name
        assert doc["used_usd"] == pytest.approx(want["cost_usd"], rel=1e-9, abs=1e-12), name
    status, _, body = d.get("/admin/usage", token=ADMIN)
    assert status == 200
    per_account: dict[str, int] = defaultdict(int)
    for line in json.loads(body)["data"]:
        per_account[line["account"]] += line["requests"]
    assert per_account == {a: int(s["requests"]) for a, s in sums.items() if s["requests"]}
    return sums


def wait_idle(d: Daemon, timeout: float = 10) -> None:
    """No request in flight and the ledger written (it flushes every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = d.get("/metrics", token=ADMIN)
        text = body.decode()
        if "yugongd_requests_in_flight 0" in text and "yugongd_ledger_pending_rows 0" in text:
            return
        time.sleep(0.1)
    raise AssertionError("requests still in flight or ledger rows pending")


@pytest.fixture
def daemon(upstream: FakeUpstream, daemon_factory: Any) -> Daemon:
    return daemon_factory(CONFIG.replace("URL", upstream.url))


def test_mixed_load_with_faults_loses_no_row(upstream, daemon):
    rng = random.Random(7)
    upstream.script(KEY_B, *faults(rng, 400))
    upstream.script(KEY_A, *faults(random.Random(8), 60))
    n = 300
    seeds = [rng.randrange(1 << 30) for _ in range(n)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: one_request(daemon.port, random.Random(seeds[i]), f"lost-{i}"), range(n)
            )
        )
    took = time.monotonic() - started
    assert took < 30
    wait_idle(daemon)
    rows = ledger(daemon)
    # every request the clients sent has exactly one row, and no row is for anything else
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {r["id"] for r in results}
    statuses = {r["status"] for r in rows}
    assert {200, 403, 499} <= statuses  # served, denied, and clients that left
    assert any(r["attempts"] > 1 for r in rows)  # failovers happened
    assert any(r["estimated"] for r in rows)  # streams cut short were estimated
    sums = check_totals(daemon, rows)
    assert sum(s["requests"] for s in sums.values()) == n
    # and the same after a clean restart (totals restored from the store)
    daemon.stop()
    daemon.start()
    check_totals(daemon, ledger(daemon))


def test_after_sigkill_only_the_last_second_is_missing(upstream, daemon):
    upstream.script(KEY_B, *faults(random.Random(11), 400))
    done: list[tuple[str, float]] = []
    sent: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w: int) -> None:
        rng = random.Random(100 + w)
        i = 0
        while not stop.is_set():
            rid = f"kill-{w}-{i}"
            i += 1
            with lock:
                sent.append(rid)
            try:
                result = one_request(daemon.port, rng, rid)
            except (OSError, http.client.HTTPException):
                continue  # the daemon was killed under it
            with lock:
                done.append((result["id"], time.monotonic()))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stop.set()
    for t in threads:
        t.join(30)
    daemon.proc.wait(10)
    daemon.log.close()
    daemon.start()
    rows = ledger(daemon)
    ids = {r["request_id"] for r in rows}
    assert len(ids) == len(rows)  # no request counted twice
    assert ids <= set(sent)  # no row for anything that was not sent
    completed = {rid: at for rid, at in done if at <= killed_at}
    missing = {rid: killed_at - at for rid, at in completed.items() if rid not in ids}
    assert len(completed) > 100
    # the writer flushes every second: only the rows of the last second (plus the time
    # one flush takes) may be lost
    assert all(age <= 1.5 for age in missing.values()), sorted(missing.values())[-5:]
    # after the restart the totals are those of the rows that survived, not more
    check_totals(daemon, rows)
    print(
        f"\nSIGKILL: {len(completed)} requests completed, {len(rows)} rows kept, "
        f"{len(missing)} missing (oldest {max(missing.values(), default=0):.2f} s before the kill)"
    )
