"""``GET /metrics`` after a known sequence of requests, driven in memory through the real
Site (fake upstream Agent, fake clock): exact counter values, bounded labels, the
scrape-time gauges, and the admin token."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_proxy_memory import Client as MemoryClient
from test_proxy_memory import FakeAgent, respond
from test_proxy_memory import make_gateway as memory_gateway

from yugongd.config import (
    AccountConfig,
    AdminConfig,
    Price,
)
from yugongd.gateway import Gateway
from yugongd.metrics import failure_reason
from yugongd.model import AttemptFailure

ADMIN = "admin-s3cret"
ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"


def make_gateway(token: str | None = ADMIN, keys: int = 2):
    return memory_gateway(
        keys,
        settings={
            "admin": AdminConfig(token=token),
            "prices": {"gpt-4o-mini": Price(input=0.15, output=0.60)},
            "accounts": (
                AccountConfig(name="alice", key=ALICE),
                AccountConfig(name="bob", key=BOB, models=("gpt-4o-mini",)),
            ),
        },
    )


class Client(MemoryClient):
    """One HTTP/1.1 connection to the gateway's Site, in memory, with any method."""

    def send(self, method: str, path: str, doc: dict | None = None, token: str | None = None):
        body = json.dumps(doc).encode() if doc is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n"
        if doc is not None:
            head += "Content-Type: application/json\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        self.proto.dataReceived(head.encode() + b"\r\n" + body)
        return self


def chat(model: str = "gpt-4o-mini") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


OK = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()


def scrape(gw: Gateway) -> dict[tuple[str, frozenset], float]:
    status, headers, body = Client(gw).send("GET", "/metrics", token=ADMIN).response()
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def key_id(gw: Gateway, agent: FakeAgent, i: int) -> str:
    secret = agent.key_of(i).decode()
    return next(k.id for k in gw.pool.keys.values() if k.secret == secret)


def test_counters_after_a_known_sequence():
    gw, clock, agent = make_gateway()
    # 1. alice, failover: the first key answers 500, the second 200 after 0.25 s
    c1 = Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    clock.advance(0.5)
    respond(agent.calls[0][4], 500, b'{"error": {"message": "boom", "code": null}}')
    failed, served = key_id(gw, agent, 0), key_id(gw, agent, 1)
    clock.advance(0.25)
    respond(agent.calls[1][4], 200, OK)
    assert c1.response()[0] == 200
    # 2. alice, a model nobody configured, the upstream says 404: passed through, "other"
    c2 = Client(gw).send("POST", "/v1/chat/completions", chat("no-such-model-1"), ALICE)
    respond(agent.calls[2][4], 404, b'{"error": {"code": "model_not_found"}}')
    assert c2.response()[0] == 404
    # 3. bob asks for a model outside his allowlist: 403, never reaches an upstream
    c3 = Client(gw).send("POST", "/v1/chat/completions", chat("made-up-model"), BOB)
    assert c3.response()[0] == 403
    # 4. no key at all: 401, no account
    c4 = Client(gw).send("POST", "/v1/chat/completions", chat(), None)
    assert c4.response()[0] == 401
    # 5. bob, a success on the first attempt; the first key is cooling: it is the other one
    c5 = Client(gw).send("POST", "/v1/chat/completions", chat(), BOB)
    assert key_id(gw, agent, 3) == served
    respond(agent.calls[3][4], 200, OK)
    assert c5.response()[0] == 200
    # 6. a 429 on the served key; the failed key is still cooling (until 1.5 s): the request
    #    waits in the queue for it, then succeeds there
    c6 = Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    respond(agent.calls[4][4], 429, b'{"error": {"code": "rate_limit_exceeded"}}')
    assert len(agent.calls) == 5 and len(gw.queue) == 1
    clock.advance(0.75)
    assert key_id(gw, agent, 5) == failed
    clock.advance(0.25)
    respond(agent.calls[5][4], 200, OK)
    assert c6.response()[0] == 200

    m = scrape(gw)
    requests = {
        (dict(labels)["status"], dict(labels)["model"], dict(labels)["account"]): v
        for (name, labels), v in m.items()
        if name == "yugongd_requests_total"
    }
    assert requests == {
        ("200", "gpt-4o-mini", "alice"): 2,
        ("404", "other", "alice"): 1,
        ("403", "other", "bob"): 1,
        ("401", "gpt-4o-mini", "none"): 1,
        ("200", "gpt-4o-mini", "bob"): 1,
    }
    errors = {dict(lb)["code"]: v for (n, lb), v in m.items() if n == "yugongd_errors_total"}
    assert errors == {
        "model_not_allowed": 1,
        "invalid_api_key": 1,
    }
    attempts = {
        dict(lb)["key"]: v for (n, lb), v in m.items() if n == "yugongd_upstream_attempts_total"
    }
    assert attempts == {failed: 2, served: 4}
    failures = {
        (dict(lb)["key"], dict(lb)["reason"]): v
        for (n, lb), v in m.items()
        if n == "yugongd_upstream_failures_total"
    }
    assert failures == {(failed, "server_error"): 1, (served, "rate_limited"): 1}
    # tokens and cost: the three successes (the 404 used nothing)
    tokens = {
        (dict(lb)["account"], dict(lb)["model"], dict(lb)["kind"]): v
        for (n, lb), v in m.items()
        if n == "yugongd_tokens_total"
    }
    assert tokens == {
        ("alice", "gpt-4o-mini", "prompt"): 6,
        ("alice", "gpt-4o-mini", "completion"): 8,
        ("bob", "gpt-4o-mini", "prompt"): 3,
        ("bob", "gpt-4o-mini", "completion"): 4,
    }
    cost = value(m, "yugongd_cost_usd_total", account="alice", model="gpt-4o-mini")
    assert cost == pytest.approx(2 * (3 * 0.15 + 4 * 0.60) / 1e6)
    # latency histograms: the whole time of every request (request 1: 0.75 s, request 6:
    # 1 s, the others none on the fake clock) ...
    assert value(m, "yugongd_request_duration_seconds_count") == 6
    assert value(m, "yugongd_request_duration_seconds_sum") == pytest.approx(1.75)
    assert value(m, "yugongd_request_duration_seconds_bucket", le="0.5") == 4
    assert value(m, "yugongd_request_duration_seconds_bucket", le="1.0") == 6
    # ... yugongd's own time for the four that reached an upstream: request 6 waited
    # 0.75 s in the queue, the rest was upstream time
    assert value(m, "yugongd_added_latency_seconds_count") == 4
    assert value(m, "yugongd_added_latency_seconds_sum") == pytest.approx(0.75)
    # ... and the first answered attempt's headers (request 1: the 500 after 0.5 s)
    assert value(m, "yugongd_upstream_first_byte_seconds_count") == 4
    assert value(m, "yugongd_upstream_first_byte_seconds_sum") == pytest.approx(0.5)
    # no created series, no request ids, no paths
    assert not any(name.endswith("_created") for name, _ in m)
    for _, labels in m:
        for k, v in labels:
            assert "req_" not in v and "/" not in v, (k, v)


def test_key_state_and_scrape_time_gauges():
    gw, clock, agent = make_gateway(keys=3)
    gw.pool.disable(gw.pool.keys["k0"], "HTTP 401")
    gw.pool.cool_down(gw.pool.keys["k1"], 30, "test")
    pending = Client(gw).send("POST", "/v1/chat/completions", {**chat(), "stream": True}, ALICE)
    m = scrape(gw)
    assert value(m, "yugongd_keys", state="active") == 1
    assert value(m, "yugongd_keys", state="cooling") == 1
    assert value(m, "yugongd_keys", state="disabled") == 1
    assert value(m, "yugongd_key_state", key="k0", upstream="up", state="disabled") == 1
    assert value(m, "yugongd_key_state", key="k0", upstream="up", state="active") == 0
    assert value(m, "yugongd_key_state", key="k1", upstream="up", state="cooling") == 1
    assert value(m, "yugongd_key_state", key="k2", upstream="up", state="active") == 1
    assert value(m, "yugongd_key_inflight", key="k2") == 1
    assert value(m, "yugongd_requests_in_flight") == 1
    assert value(m, "yugongd_streams_open") == 1
    assert value(m, "yugongd_queue_waiting") == 0
    assert value(m, "yugongd_ledger_pending_rows") == 0
    assert value(m, "yugongd_accounts") == 2
    respond(agent.calls[0][4], 200, OK)
    assert pending.response()[0] == 200
    m = scrape(gw)
    assert value(m, "yugongd_requests_in_flight") == 0
    assert value(m, "yugongd_streams_open") == 0
    # a removed key leaves the state gauges at once
    gw.pool.remove_key("k0")
    m = scrape(gw)
    assert value(m, "yugongd_key_state", key="k0", upstream="up", state="disabled") is None
    assert value(m, "yugongd_keys", state="disabled") == 0


def test_queue_gauge():
    gw, clock, agent = make_gateway(keys=1)
    gw.pool.cool_down(gw.pool.keys["k0"], 3, "test")
    Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    assert value(scrape(gw), "yugongd_queue_waiting") == 1


def test_learned_model_names_are_bounded(monkeypatch):
    from yugongd import metrics

    monkeypatch.setattr(metrics, "MAX_MODELS", 2)
    gw, clock, agent = make_gateway(keys=1)
    for i in range(4):
        c = Client(gw).send("POST", "/v1/chat/completions", chat(f"fine-tune-{i}"), ALICE)
        respond(agent.calls[-1][4], 200, OK)
        assert c.response()[0] == 200
    m = scrape(gw)
    models = {dict(lb)["model"]: v for (n, lb), v in m.items() if n == "yugongd_requests_total"}
    assert models == {"fine-tune-0": 1, "fine-tune-1": 1, "other": 2}


def test_metrics_needs_the_admin_token():
    gw, clock, agent = make_gateway()
    status, _, body = Client(gw).send("GET", "/metrics").response()
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_admin_token"
    status, _, _ = Client(gw).send("GET", "/metrics", token="wrong").response()
    assert status == 401
    status, _, _ = Client(gw).send("POST", "/metrics", {}, token=ADMIN).response()
    assert status == 405


def test_metrics_without_an_admin_token_is_404():
    gw, clock, agent = make_gateway(token=None)
    status, _, body = Client(gw).send("GET", "/metrics", token="anything").response()
    assert status == 404
    assert json.loads(body)["error"]["code"] == "unknown_url"


def test_each_gateway_has_its_own_registry():
    gw1, _, agent1 = make_gateway()
    gw2, _, _ = make_gateway()
    c = Client(gw1).send("POST", "/v1/chat/completions", chat(), ALICE)
    respond(agent1.calls[0][4], 200, OK)
    assert c.response()[0] == 200
    assert (
        value(
            scrape(gw1),
            "yugongd_requests_total",
            status="200",
            model="gpt-4o-mini",
            account="alice",
        )
        == 1
    )
    assert (
        value(
            scrape(gw2),
            "yugongd_requests_total",
            status="200",
            model="gpt-4o-mini",
            account="alice",
        )
        is None
    )


def test_the_metrics_plugin_can_be_disabled():
    gw, clock, agent = make_gateway()
    gw.pm.set_blocked("metrics")
    c = Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    respond(agent.calls[0][4], 200, OK)
    assert c.response()[0] == 200
    m = scrape(gw)
    assert not any(n == "yugongd_requests_total" for n, _ in m)
    assert value(m, "yugongd_keys", state="active") == 2


@pytest.mark.parametrize(
    "failure, reason",
    [
        (AttemptFailure("status", status=429, code="rate_limit_exceeded"), "rate_limited"),
        (AttemptFailure("status", status=429), "rate_limited"),
        (AttemptFailure("status", status=429, code="insufficient_quota"), "insufficient_quota"),
        (AttemptFailure("status", status=401), "unauthorized"),
        (AttemptFailure("status", status=403), "forbidden"),
        (AttemptFailure("status", status=408), "timeout"),
        (AttemptFailure("status", status=502), "server_error"),
        (AttemptFailure("connect"), "connect"),
        (AttemptFailure("reset"), "reset"),
        (AttemptFailure("timeout"), "timeout"),
    ],
)
def test_failure_reasons(failure, reason):
    assert failure_reason(failure) == reason
