"""The key pool through the real daemon: scripted upstream failures per key, the admin
API for keys, and a third-party key-selection plugin."""

from __future__ import annotations

import json
import time

import openai
import pytest
from fakeupstream import (
    Behaviour,
    insufficient_quota,
    rate_limited,
    server_error,
    unauthorized,
)

POOL_A = "sk-pool-aaaaaaaaaaaaaaaaaaaa"
POOL_B = "sk-pool-bbbbbbbbbbbbbbbbbbbb"
ALICE = "sk-alice-0123456789abcdef"
ADMIN = "admin-token-0123456789"

CONFIG = """
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "memory"
admin: {{token: "{admin}"}}
pool: {{cooldown: 30, queue_timeout: 0, probe_interval: 600}}
upstreams:
  - name: fake
    base_url: "{url}"
    timeouts: {{connect: 2, first_byte: 1, idle: 2}}
    keys:
      - {{id: key-a, key: "{a}"}}
      - {{id: key-b, key: "{b}"}}
accounts:
  - name: alice
    key: "{alice}"
"""


def config(upstream, extra: str = "") -> str:
    return CONFIG.format(url=upstream.url, a=POOL_A, b=POOL_B, alice=ALICE, admin=ADMIN) + extra


@pytest.fixture
def gw(upstream, daemon_factory):
    return daemon_factory(config(upstream))


def chat(d, **kw):
    client = openai.OpenAI(base_url=d.url + "/v1", api_key=ALICE, max_retries=0)
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], **kw
    )


def keys(d) -> dict[str, dict]:
    status, _, body = d.get("/admin/keys", token=ADMIN)
    assert status == 200
    return {k["id"]: k for k in json.loads(body)["data"]}


@pytest.mark.parametrize(
    ("behaviour", "state", "reason"),
    [
        (rate_limited(retry_after=12), "cooling", None),
        (rate_limited(), "cooling", None),
        (server_error(502), "cooling", None),
        (insufficient_quota(), "disabled", "insufficient_quota"),
        (unauthorized(), "disabled", "HTTP 401 invalid_api_key"),
        (Behaviour(delay=1.5), "cooling", None),
        (Behaviour(close_before_headers=True), "cooling", None),
    ],
    ids=["429-retry-after", "429", "502", "insufficient_quota", "401", "slow", "reset"],
)
def test_failure_moves_the_request_to_the_other_key(upstream, gw, behaviour, state, reason):
    upstream.set_default(POOL_A, behaviour)
    answers = [chat(gw).choices[0].message.content for _ in range(3)]
    assert answers == ["echo: x"] * 3
    info = keys(gw)
    assert info["key-a"]["state"] == state
    assert info["key-a"]["disabled_reason"] == reason
    assert info["key-a"]["last_error"]
    assert info["key-b"]["state"] == "active"
    # nothing of a key in the admin view but its hint
    assert POOL_A not in json.dumps(info) and info["key-a"]["key_hint"] == "sk-…aaaa"


def test_429_retry_after_sets_the_cooldown(upstream, gw):
    upstream.set_default(POOL_A, rate_limited(retry_after=12))
    for _ in range(2):
        chat(gw)
    info = keys(gw)["key-a"]
    assert info["state"] == "cooling"
    assert 8 < info["cooldown_until"] - time.time() <= 12.5


def test_drop_mid_stream_ends_with_an_error_event(upstream, gw):
    upstream.set_default(POOL_A, Behaviour(drop_after_events=2))
    upstream.set_default(POOL_B, Behaviour(drop_after_events=2))
    with pytest.raises(openai.APIError) as e:
        for _ in chat(gw, stream=True):
            pass
    assert "upstream" in str(e.value).lower()


def test_every_key_failing_is_the_upstream_error_or_502(upstream, gw):
    upstream.set_default(POOL_A, Behaviour(close_before_headers=True))
    upstream.set_default(POOL_B, Behaviour(close_before_headers=True))
    with pytest.raises(openai.APIStatusError) as e:
        chat(gw)
    assert e.value.status_code == 502
    assert e.value.code == "upstream_unavailable"
    # both keys now cool down: a new request gets 429 pool_exhausted with Retry-After
    with pytest.raises(openai.RateLimitError) as e:
        chat(gw)
    assert e.value.code == "pool_exhausted"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_admin_api_changes_keys_at_runtime(upstream, gw):
    status, _, body = gw.request("PATCH", "/admin/keys/key-a", {"enabled": False}, token=ADMIN)
    assert status == 200 and json.loads(body)["state"] == "disabled"
    upstream.clear()
    for _ in range(3):
        chat(gw)
    assert {r.key for r in upstream.received} == {POOL_B}
    status, _, body = gw.request(
        "POST",
        "/admin/keys",
        {"upstream": "fake", "key": "sk-pool-cccccccccccccccc", "id": "key-c"},
        token=ADMIN,
    )
    assert status == 201
    created = json.loads(body)
    assert created["id"] == "key-c" and "sk-pool-cccc" not in body.decode()
    assert gw.request("DELETE", "/admin/keys/key-b", token=ADMIN)[0] == 204
    upstream.clear()
    for _ in range(2):
        chat(gw)
    assert {r.key for r in upstream.received} == {"sk-pool-cccccccccccccccc"}
    assert gw.request("PATCH", "/admin/keys/key-a", {"enabled": True}, token=ADMIN)[0] == 200
    status, _, body = gw.get("/healthz")
    assert json.loads(body)["keys"] == {"active": 2, "cooling": 0, "disabled": 0}
    assert gw.get("/admin/keys", token="wrong")[0] == 401
    assert gw.request("PATCH", "/admin/keys/nope", {"enabled": True}, token=ADMIN)[0] == 404


def test_admin_api_is_404_without_a_token(upstream, daemon_factory):
    d = daemon_factory(config(upstream).replace(f'admin: {{token: "{ADMIN}"}}', ""))
    assert d.get("/admin/keys", token=ADMIN)[0] == 404


def test_third_party_plugin_overrides_key_selection(upstream, daemon_factory, tmp_path):
    plugins = tmp_path / "myplugins"
    plugins.mkdir()
    (plugins / "pin_key.py").write_text(
        "from yugongd import hookimpl\n\n"
        "@hookimpl\n"
        "def yugongd_select_key(call, candidates):\n"
        "    for key in candidates:\n"
        "        if key.id == 'key-b':\n"
        "            return key\n"
        "    return None\n"
    )
    d = daemon_factory(config(upstream, f'plugins: {{dirs: ["{plugins}"]}}\n'))
    for _ in range(5):
        chat(d)
    assert {r.key for r in upstream.received} == {POOL_B}
    assert "pin_key" in d.output()
