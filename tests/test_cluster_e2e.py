"""Cluster mode end to end: a real redis-server, two or three real ``twistd -n yugongd``
processes sharing it, one fake upstream, and real clients.

Each test checks one promise of issue 8 / DESIGN §8: an account's limits and credit hold
across processes, a key cooled down by one process is avoided by the others, the ledger
is one ledger (also across a Redis crash), and SQLite state migrates into Redis."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

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


def config(upstream, state: str, instance: str, outage: str = "local") -> str:
    return CONFIG.format(
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
    status, doc = admin(daemon, "GET", "/admin/usage")
    assert status == 200, doc
    return int(doc["total"]["requests"])


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
    # every process tells who it is in /metrics
    for i, d in enumerate(daemons):
        status, _, raw = d.request("GET", "/metrics", token=ADMIN)
        assert f'yugongd_instance_info{{boot="p{i}.' in raw.decode()
        assert "yugongd_redis_up 1.0" in raw.decode()


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
