"""Cluster mode end to end: a real redis-server, two or three real ``twistd -n yugongd``
processes sharing it, one fake upstream, and real clients.

Each test checks one promise of issue 8 / DESIGN §8: an account's limits and credit hold
across processes, a key cooled down by one process is avoided by the others, the ledger
is one ledger (also across a Redis crash), and SQLite state migrates into Redis."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Daemon, free_port
from fakeupstream import Behaviour, rate_limited
from redis_fixtures import needs_redis, redis_fixture  # noqa: F401

pytestmark = needs_redis

ADMIN = "admin-0123456789abcdef"
ALICE = "sk-alice-0123456789abcdef"
LIMITED = "sk-limited-0123456789abcd"
POOL_A = "sk-pool-aaaaaaaaaaaaaaaaaaaa"
POOL_B = "sk-pool-bbbbbbbbbbbbbbbbbbbb"

CONFIG = """
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "{state}"
admin: {{token: "{admin}"}}
cluster: {{instance: "{instance}", redis_outage: "{outage}", timeout: 0.5}}
access_log: {{enabled: false}}
pool: {{cooldown: 30, queue_timeout: 0}}
upstreams:
  - name: fake
    base_url: "{url}"
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
    keys:
      - {{id: key-a, key: "{a}"}}
      - {{id: key-b, key: "{b}"}}
prices:
  gpt-4o-mini: {{request: 0.25}}
accounts:
  - {{name: alice, key: "{alice}"}}
  - {{name: limited, key: "{limited}", rpm: 10}}
"""


def config(upstream, state: str, instance: str, outage: str = "local", listen: str = "") -> str:
    text = CONFIG.format(
        state=state,
        admin=ADMIN,
        instance=instance,
        outage=outage,
        url=upstream.url,
        a=POOL_A,
        b=POOL_B,
        alice=ALICE,
        limited=LIMITED,
    )
    if listen:
        text = text.replace(
            'listen: "tcp:{port}:interface=127.0.0.1"',
            f'listen: ["tcp:{{port}}:interface=127.0.0.1", "{listen}"]',
        )
    return text


def ready(daemon) -> None:
    """Wait until the daemon has read its accounts from Redis (billing needs no upstream)."""
    assert wait_until(
        lambda: daemon.get("/v1/dashboard/billing/subscription", token=ALICE)[0] == 200
    ), daemon.output()


def cluster(daemon_factory, upstream, redis, n: int, outage: str = "local") -> list:
    daemons = [daemon_factory(config(upstream, redis.url, f"p{i}", outage)) for i in range(n)]
    for d in daemons:
        ready(d)
    return daemons


def chat(daemon, key: str = ALICE, content: str = "hi", headers: dict | None = None):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    return daemon.request("POST", "/v1/chat/completions", body, token=key, headers=headers)


def admin(daemon, method: str, path: str, body=None):
    status, _, raw = daemon.request(method, path, body, token=ADMIN)
    return status, (json.loads(raw) if raw else None)


def usage_total(daemon) -> int:
    """Requests in the ledger, as ``GET /admin/usage`` counts them (-1: not answered)."""
    status, doc = admin(daemon, "GET", "/admin/usage")
    return int(doc["total"]["requests"]) if status == 200 else -1


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_rpm_holds_across_processes(upstream, daemon_factory, redis):
    daemons = cluster(daemon_factory, upstream, redis, 3)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: chat(daemons[i % 3], LIMITED)[0], range(18)))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 8
    status, headers, raw = chat(daemons[1], LIMITED)
    assert status == 429 and json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # every process tells who it is in /metrics and /healthz
    for i, d in enumerate(daemons):
        status, _, raw = d.request("GET", "/metrics", token=ADMIN)
        assert f'yugongd_instance_info{{boot="p{i}.' in raw.decode()
        assert "yugongd_redis_up 1.0" in raw.decode()
        status, _, raw = d.get("/healthz")
        assert status == 200 and json.loads(raw)["instance"] == f"p{i}"


def test_credit_holds_across_processes_under_concurrency(upstream, daemon_factory, redis):
    daemons = cluster(daemon_factory, upstream, redis, 3)
    # every request costs exactly $0.25 (a per-request price): credit for 5 requests
    status, doc = admin(daemons[0], "POST", "/admin/accounts", {"name": "few", "credit_usd": 1.25})
    assert status == 201
    key, account = doc["key"], doc["id"]
    # the account created through process 0 is known to the others at once
    subscription = "/v1/dashboard/billing/subscription"
    assert wait_until(lambda: all(d.get(subscription, token=key)[0] == 200 for d in daemons), 1)
    assert chat(daemons[1], key)[0] == 200 and chat(daemons[2], key)[0] == 200
    # two spent; three left, for forty concurrent requests through three processes
    slow = {"x-fake-delay": "0.3"}
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: chat(daemons[i % 3], key, headers=slow), range(40)))
    codes = [s if s == 200 else json.loads(raw)["error"]["code"] for s, _, raw in results]
    assert codes.count(200) == 3, codes
    assert set(codes) == {200, "insufficient_quota"}
    for d in daemons:
        status, _, raw = chat(d, key)
        assert status == 429 and json.loads(raw)["error"]["code"] == "insufficient_quota"
    assert len(upstream.requests_for("/v1/chat/completions")) == 5
    status, doc = admin(daemons[2], "GET", f"/admin/accounts/{account}")
    assert wait_until(
        lambda: admin(daemons[2], "GET", f"/admin/accounts/{account}")[1]["used_usd"] == 1.25
    )


def keys(daemon) -> dict[str, dict]:
    status, doc = admin(daemon, "GET", "/admin/keys")
    assert status == 200
    return {k["id"]: k for k in doc["data"]}


def test_key_cooled_down_by_one_process_gets_no_traffic_from_another(
    upstream, daemon_factory, redis
):
    a, b = cluster(daemon_factory, upstream, redis, 2)
    upstream.set_default(POOL_A, rate_limited(retry_after=20))
    learned = {
        "x-ratelimit-limit-requests": "5000",
        "x-ratelimit-remaining-requests": "1234",
        "x-ratelimit-reset-requests": "1m",
    }
    upstream.set_default(POOL_B, Behaviour(headers=learned))
    assert keys(b)["key-b"]["remaining_requests"] is None  # nothing learned yet
    # through A until key-a has met its 429 (A fails over to key-b: the client sees 200)
    for _ in range(4):
        assert chat(a)[0] == 200
        if any(r.key == POOL_A for r in upstream.received):
            break
    assert any(r.key == POOL_A for r in upstream.received)
    time.sleep(0.1)  # the contract: another process knows within 100 ms
    # what A learned of key-b's organisation from the headers, B knows without asking
    assert 1200 <= keys(b)["key-b"]["remaining_requests"] <= 1300
    upstream.clear()
    upstream.set_default(POOL_A, rate_limited(retry_after=20))
    for _ in range(10):
        assert chat(b)[0] == 200
    assert {r.key for r in upstream.received} == {POOL_B}
    info = keys(b)["key-a"]
    assert info["state"] == "cooling"
    assert 15 < info["cooldown_until"] - time.time() <= 20.5
    # an admin enabling it through B gives it back to A too
    assert admin(b, "PATCH", "/admin/keys/key-a", {"enabled": True})[0] == 200
    assert wait_until(lambda: keys(a)["key-a"]["state"] == "active", 1)


def test_ledger_totals_equal_client_requests_across_processes(upstream, daemon_factory, redis):
    daemons = cluster(daemon_factory, upstream, redis, 3)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: chat(daemons[i % 3], (ALICE, LIMITED)[i % 2])[0], range(40))
        )
    # 20 for alice, 20 for limited of which 10 were refused: every request is one row
    assert results.count(200) == 30 and results.count(429) == 10
    for d in daemons:
        assert wait_until(lambda d=d: usage_total(d) == 40, 5)
        status, doc = admin(d, "GET", "/admin/usage")
        by_account = {line["name"]: line for line in doc["data"]}
        assert by_account["alice"]["requests"] == 20
        assert by_account["limited"]["requests"] == 20
    # over whole days the totals come from the per-day sums, over any other period from
    # the rows of the stream: both agree, on every process
    since = time.time() - 3600
    for d in daemons:
        status, doc = admin(d, "GET", f"/admin/usage?since={since}")
        assert status == 200 and doc["total"]["requests"] == 40
        assert doc["total"]["cost_usd"] == pytest.approx(30 * 0.25)
        status, _, raw = d.get("/v1/dashboard/billing/usage", token=ALICE)
        assert status == 200 and json.loads(raw)["total_usage"] == pytest.approx(20 * 25)
    # the running totals every process shows come from the same ledger
    listed = {a["name"]: a for a in admin(daemons[0], "GET", "/admin/accounts")[1]["data"]}
    alice_id = listed["alice"]["id"]
    for d in daemons:
        assert wait_until(
            lambda d=d: (
                admin(d, "GET", f"/admin/accounts/{alice_id}")[1]["usage"]["requests"] == 20
            ),
            3,
        )


def test_redis_killed_and_restarted_loses_no_row_and_counts_none_twice(
    upstream, daemon_factory, redis
):
    local = daemon_factory(config(upstream, redis.url, "local", "local"))
    strict = daemon_factory(config(upstream, redis.url, "strict", "reject"))
    ready(local)
    ready(strict)
    sent = 0
    outage: list[tuple[str, int, str]] = []

    def send(n: int, during_outage: bool = False) -> None:
        nonlocal sent
        for i in range(n):
            d = (local, strict)[i % 2]
            key = (ALICE, LIMITED)[(i // 2) % 2]
            status, _, raw = chat(d, key)
            sent += 1
            if during_outage:
                code = json.loads(raw)["error"]["code"] if status != 200 else ""
                outage.append((d.config_path.parent.name, status, code))

    send(12)
    redis.kill()
    time.sleep(0.3)
    send(16, during_outage=True)
    redis.start()
    send(12)
    # every request of the run is in the ledger once: none lost, none counted twice
    for d in (local, strict):
        assert wait_until(lambda d=d: usage_total(d) == sent, 15), (usage_total(d), sent)
    time.sleep(0.5)
    assert usage_total(local) == sent == 40
    # while Redis was down: the "local" process served everyone on its own limits, the
    # "reject" process refused the account with limits (503) and served the one without
    assert {(s, c) for name, s, c in outage if name == local.config_path.parent.name} == {(200, "")}
    strict_answers = {(s, c) for name, s, c in outage if name == strict.config_path.parent.name}
    assert strict_answers == {(200, ""), (503, "state_unavailable")}
    assert "spooling ledger rows" in local.output()


def test_sqlite_state_migrates_into_redis(upstream, daemon_factory, redis, tmp_path):
    single = daemon_factory(config(upstream, "sqlite:yugongd.db", "single"))
    status, doc = admin(single, "POST", "/admin/accounts", {"name": "carol", "credit_usd": 10})
    carol_key, carol = doc["key"], doc["id"]
    status, _ = admin(
        single,
        "POST",
        "/admin/keys",
        {"upstream": "fake", "key": "sk-pool-cccccccccccc", "id": "c"},
    )
    assert status == 201
    for i in range(7):
        assert chat(single, (ALICE, carol_key)[i % 2])[0] == 200
    assert chat(single, LIMITED)[0] == 200
    assert single.stop() in (0, -signal.SIGTERM)
    db = single.workdir / "yugongd.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT COUNT(*), SUM(cost_usd) FROM ledger").fetchone()
        accounts = {r[0] for r in conn.execute("SELECT id FROM accounts")}
    assert rows[0] == 8

    for _ in range(2):  # a second run copies nothing twice
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "yugongd.cli",
                "migrate",
                "--from",
                f"sqlite:{db}",
                "--to",
                redis.url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
    assert "8 ledger rows (0 new, 8 already there)" in out.stdout

    a, b = cluster(daemon_factory, upstream, redis, 2)
    for d in (a, b):
        listed = {x["id"]: x for x in admin(d, "GET", "/admin/accounts")[1]["data"]}
        assert accounts <= set(listed)
        assert listed[carol]["used_usd"] == 0.75  # three requests at $0.25
        status, doc = admin(d, "GET", "/admin/usage")
        assert doc["total"]["requests"] == rows[0]
        assert doc["total"]["cost_usd"] == pytest.approx(rows[1])
        assert "c" in keys(d)
    for d in (a, b):
        assert chat(d, carol_key)[0] == 200
    # the copied spending counts against the credit across the cluster
    status, doc = admin(a, "GET", f"/admin/accounts/{carol}")
    assert wait_until(lambda: admin(b, "GET", f"/admin/accounts/{carol}")[1]["used_usd"] == 1.25)


def test_processes_share_one_port_with_reuseport(upstream, daemon_factory, redis):
    shared = free_port()
    listen = f"reuseport:{shared}:interface=127.0.0.1"
    daemons = [daemon_factory(config(upstream, redis.url, f"r{i}", listen=listen)) for i in (0, 1)]
    for d in daemons:
        ready(d)
    front = Daemon.__new__(Daemon)
    front.url = f"http://127.0.0.1:{shared}"
    for _ in range(24):
        assert chat(front)[0] == 200
    # the kernel spread the connections over both processes; the ledger is one
    served = [sum(k["requests"] for k in keys(d).values()) for d in daemons]
    assert sum(served) == 24 and min(served) > 0, served
    assert wait_until(lambda: usage_total(daemons[1]) == 24, 5)


def test_rows_spooled_by_a_stopped_process_are_replayed_by_the_next(
    upstream, daemon_factory, redis, tmp_path
):
    # the two processes share a spool directory, as the processes of one host do
    spool = tmp_path / "spool"
    spool.mkdir()

    def cfg(instance: str) -> str:
        text = config(upstream, redis.url, instance)
        return text.replace("timeout: 0.5}", f'timeout: 0.5, spool_dir: "{spool}"}}')

    first = daemon_factory(cfg("first"))
    ready(first)
    assert chat(first)[0] == 200
    redis.kill()
    time.sleep(0.2)
    for _ in range(5):
        assert chat(first)[0] == 200  # served on local state, rows spooled
    assert first.stop() in (0, -signal.SIGTERM)
    assert [p.name.startswith("yugongd-spool-first") for p in spool.iterdir()] == [True]
    redis.start()
    second = daemon_factory(cfg("second"))
    ready(second)
    assert wait_until(lambda: usage_total(second) == 6, 10), usage_total(second)
    assert wait_until(lambda: not list(spool.iterdir()), 5)
