"""End to end: sub-accounts, limits, credit, exact usage, billing endpoints and durable
accounting through the real daemon, the ``openai`` SDK and the fake upstream."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fakeupstream import chat_usage

ADMIN = "admin-0123456789abcdef"
ALICE = "sk-alice-0123456789abcdef"
LIMITED = "sk-limited-0123456789abcd"
BROKE = "sk-broke-0123456789abcdef"
EXPIRED = "sk-expired-0123456789abcd"
DISABLED = "sk-disabled-0123456789abc"
NETONLY = "sk-netonly-0123456789abcd"
BOB = "sk-bob-0123456789abcdef00"

#: USD per token: 1000 and 2000 per 1M
IN, OUT = 0.001, 0.002

CONFIG = """
listen: "tcp:{port}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {token: "ADMIN"}
upstreams:
  - name: fake
    base_url: "URL"
    timeouts: {connect: 2, first_byte: 5, idle: 5}
    keys:
      - {id: fake-a, key: "sk-pool-aaaaaaaaaaaaaaaa1111"}
prices:
  gpt-4o-mini: {input: 1000, output: 2000}
accounts:
  - {name: alice, key: "ALICE"}
  - {name: limited, key: "LIMITED", rpm: 2, tpm: 100000}
  - {name: broke, key: "BROKE", credit_usd: 0}
  - {name: expired, key: "EXPIRED", expires: "2020-01-01T00:00:00Z"}
  - {name: disabled, key: "DISABLED", enabled: false}
  - {name: netonly, key: "NETONLY", ip_allow: ["10.0.0.0/8"]}
  - {name: bob, key: "BOB", models: ["gpt-4o-mini"]}
"""


def config(upstream) -> str:
    text = CONFIG.replace("URL", upstream.url).replace("ADMIN", ADMIN)
    for name in ("ALICE", "LIMITED", "BROKE", "EXPIRED", "DISABLED", "NETONLY", "BOB"):
        text = text.replace(f'"{name}"', f'"{globals()[name]}"')
    return text


@pytest.fixture
def gateway(upstream, daemon_factory):
    return daemon_factory(config(upstream))


def sdk(daemon, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0)


def chat(daemon, key=ALICE, content="hello", **kw):
    return sdk(daemon, key).chat.completions.create(
        model=kw.pop("model", "gpt-4o-mini"),
        messages=[{"role": "user", "content": content}],
        **kw,
    )


def admin(daemon, method, path, body=None):
    status, _, raw = daemon.request(method, path, body, token=ADMIN)
    return status, (json.loads(raw) if raw else None)


def cost(usage) -> float:
    return usage["prompt_tokens"] * IN + usage["completion_tokens"] * OUT


def test_each_error_code(upstream, gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(gateway, key="sk-unknown-0000000000000")
    assert e.value.code == "invalid_api_key"
    for key in (DISABLED, EXPIRED):
        with pytest.raises(openai.AuthenticationError) as e:
            chat(gateway, key=key)
        assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(gateway, key=BOB, model="gpt-4o")
    assert e.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(gateway, key=NETONLY)
    assert e.value.code == "ip_not_allowed"
    with pytest.raises(openai.RateLimitError) as e:
        chat(gateway, key=BROKE)
    assert e.value.code == "insufficient_quota"

    client = sdk(gateway, LIMITED)
    for left in ("1", "0"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == left
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
    with pytest.raises(openai.RateLimitError) as e:
        chat(gateway, key=LIMITED)
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    # only the requests that were let through reached the upstream
    assert len(upstream.requests_for("/v1/chat/completions")) == 2


def test_exact_usage_billing_and_admin_numbers(upstream, gateway):
    status, doc = admin(gateway, "POST", "/admin/accounts", {"name": "carol", "credit_usd": 10})
    assert status == 201
    carol, key = doc["id"], doc["key"]
    messages = [{"role": "user", "content": "count these tokens exactly"}]
    client = sdk(gateway, key)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    expected = [chat_usage(messages)]
    assert reply.usage.prompt_tokens == expected[0]["prompt_tokens"]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        stream=True,
        extra_headers={"x-fake-events": "7"},
    )
    chunks = list(stream)
    assert all(c.choices for c in chunks)  # the usage chunk was stripped
    expected.append(chat_usage(messages, 7))

    status, doc = admin(gateway, "GET", f"/admin/accounts/{carol}")
    assert doc["usage"] == {
        "requests": 2,
        "prompt_tokens": sum(u["prompt_tokens"] for u in expected),
        "completion_tokens": sum(u["completion_tokens"] for u in expected),
    }
    spent = sum(cost(u) for u in expected)
    assert doc["used_usd"] == pytest.approx(spent)
    assert doc["remaining_usd"] == pytest.approx(10 - spent)
    assert doc["reserved_usd"] == 0 and "key" not in doc

    status, usage = admin(gateway, "GET", f"/admin/usage?account={carol}")
    assert [(d["model"], d["requests"]) for d in usage["data"]] == [("gpt-4o-mini", 2)]
    assert usage["data"][0]["cost_usd"] == pytest.approx(spent)

    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    status, _, raw = gateway.request(
        "GET",
        f"/v1/dashboard/billing/usage?start_date={today}&end_date={tomorrow}",
        token=key,
    )
    bill = json.loads(raw)
    assert status == 200 and bill["object"] == "list"
    assert bill["total_usage"] == pytest.approx(spent * 100)
    [day] = bill["daily_costs"]
    assert day["line_items"] == [{"name": "gpt-4o-mini", "cost": pytest.approx(spent * 100)}]
    status, _, raw = gateway.request("GET", "/dashboard/billing/subscription", token=key)
    sub = json.loads(raw)
    assert (sub["hard_limit_usd"], sub["access_until"]) == (10, 0)


def test_fifty_concurrent_requests_cannot_overspend(upstream, gateway):
    # each request costs 1 prompt + 5 completion tokens = $0.011, and reserves more
    one = cost(chat_usage([{"content": "hi"}]))
    credit = 3 * one
    status, doc = admin(gateway, "POST", "/admin/accounts", {"name": "few", "credit_usd": credit})
    key, account = doc["key"], doc["id"]
    client = sdk(gateway, key)

    def attempt(_: int) -> str:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
                extra_headers={"x-fake-delay": "0.3"},
            )
            return "ok"
        except openai.RateLimitError as e:
            return e.code or "?"

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(attempt, range(50)))
    assert set(results) <= {"ok", "insufficient_quota"}
    assert 1 <= results.count("ok") <= 4
    # spend the rest one by one until refused: never more than one request beyond
    for _ in range(10):
        if attempt(0) != "ok":
            break
    status, doc = admin(gateway, "GET", f"/admin/accounts/{account}")
    assert credit <= doc["used_usd"] <= credit + one + 1e-9
    assert doc["reserved_usd"] == 0 and doc["inflight"] == 0
    assert attempt(0) == "insufficient_quota"


def test_sigterm_restart_keeps_used_usd_and_api_accounts(upstream, gateway):
    status, doc = admin(gateway, "POST", "/admin/accounts", {"name": "dave", "credit_usd": 5})
    dave, key = doc["id"], doc["key"]
    chat(gateway, key=key)
    chat(gateway, key=ALICE)
    before = admin(gateway, "GET", f"/admin/accounts/{dave}")[1]
    listed = admin(gateway, "GET", "/admin/accounts")[1]["data"]
    alice = next(a for a in listed if a["name"] == "alice")
    assert before["used_usd"] > 0 and alice["used_usd"] > 0
    assert gateway.stop() in (0, -signal.SIGTERM)
    gateway.start()
    after = admin(gateway, "GET", f"/admin/accounts/{dave}")[1]
    assert after["used_usd"] == pytest.approx(before["used_usd"])
    assert after["usage"] == before["usage"]
    alice_after = admin(gateway, "GET", f"/admin/accounts/{alice['id']}")[1]
    assert alice_after["used_usd"] == pytest.approx(alice["used_usd"])
    # the API-created account and its key survived the restart
    assert chat(gateway, key=key).choices


def test_sigkill_two_seconds_after_the_last_request_keeps_every_row(upstream, gateway):
    for i in range(5):
        chat(gateway, content=f"row {i}")
    with pytest.raises(openai.AuthenticationError):
        chat(gateway, key=DISABLED)
    time.sleep(2)
    gateway.signal(signal.SIGKILL)
    gateway.proc.wait(10)
    db = sqlite3.connect(gateway.workdir / "yugongd.db")
    rows = db.execute("SELECT status, cost_usd FROM ledger ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [200] * 5 + [401]
    totals = db.execute("SELECT SUM(requests) FROM account_totals").fetchone()[0]
    assert totals == 6


def test_sighup_adds_an_account_while_a_slow_stream_stays_open(upstream, gateway):
    got: list[str] = []

    def slow() -> None:
        stream = sdk(gateway).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "slowly now"}],
            stream=True,
            extra_headers={"x-fake-events": "8", "x-fake-interval": "0.3"},
        )
        for c in stream:
            got.extend(c.choices[0].delta.content or "" for _ in [0] if c.choices)

    reader = threading.Thread(target=slow)
    reader.start()
    newkey = "sk-erin-0123456789abcdef00"
    with pytest.raises(openai.AuthenticationError):
        chat(gateway, key=newkey)
    text = gateway.config_path.read_text()
    gateway.config_path.write_text(text + f'  - {{name: erin, key: "{newkey}"}}\n')
    gateway.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        try:
            chat(gateway, key=newkey)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the reload did not add the account"
            time.sleep(0.1)
    assert reader.is_alive(), "the slow stream should still be open"
    reader.join(10)
    assert "".join(got) == "echo: slowly now"
