"""Accounts: authorization checks, rate limits, credit reservations, config overrides and
the admin API, on a real Gateway with a fake clock and the memory store (no sockets)."""

import datetime
import json

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from yugongd.accounts import config_account_id, hash_key
from yugongd.builtin.accounts import DEFAULT_COMPLETION_TOKENS
from yugongd.config import parse_config
from yugongd.gateway import Gateway
from yugongd.model import Call, Outcome, Usage
from yugongd.site import GatewayResource
from yugongd.state import LedgerRow, MemoryState

ADMIN = "admin-token-0123456789"
ALICE = "sk-alice-0123456789abcdef"
T0 = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.timezone.utc).timestamp()


def make_config(**alice):
    return parse_config(
        {
            "upstreams": [{"name": "up", "base_url": "http://up/v1", "keys": [{"key": "sk-x"}]}],
            "admin": {"token": ADMIN},
            "prices": {"priced": {"input": 1000.0, "output": 2000.0}},
            "accounts": [{"name": "alice", "key": ALICE, **alice}],
        },
        "<test>",
    )


def make_gateway(state=None, **alice):
    reactor = MemoryReactorClock()
    reactor.advance(T0)
    gw = Gateway(make_config(**alice), reactor, state or MemoryState())
    gw.start()
    return gw


def make_call(gw, model="gpt-4o-mini", body=None, tokens=100, ip="10.1.2.3"):
    c = Call(
        request_id="r",
        endpoint="/chat/completions",
        method="POST",
        client_ip=ip,
        started=gw.clock.seconds(),
    )
    c.account = gw.accounts.lookup(ALICE)
    c.model = model
    c.body = body if body is not None else {"model": model}
    c.expected_tokens = tokens
    return c


def authorize(gw, c):
    denials = [d for d in gw.pm.hook.yugongd_authorize(call=c) if d is not None]
    return denials[0] if denials else None


def finish(gw, c, usage=None):
    gw.pm.hook.yugongd_request_finished(call=c, outcome=Outcome(status=200, usage=usage))


def test_disabled_expired_ip_and_model_denials():
    gw = make_gateway(enabled=False)
    d = authorize(gw, make_call(gw))
    assert (d.status, d.code) == (401, "invalid_api_key")
    gw = make_gateway(expires="2026-03-10T12:00:30Z")
    assert authorize(gw, make_call(gw)) is None
    gw.reactor.advance(30)
    d = authorize(gw, make_call(gw))
    assert (d.status, d.code) == (401, "invalid_api_key") and "expired" in d.message
    gw = make_gateway(ip_allow=["10.0.0.0/8"])
    assert authorize(gw, make_call(gw, ip="10.9.9.9")) is None
    d = authorize(gw, make_call(gw, ip="192.168.1.1"))
    assert (d.status, d.code) == (403, "ip_not_allowed")
    gw = make_gateway(models=["gpt-4o-mini"])
    d = authorize(gw, make_call(gw, model="gpt-4o"))
    assert (d.status, d.code) == (403, "model_not_allowed")


def test_rpm_denial_has_retry_after_and_the_account_headers():
    gw = make_gateway(rpm=2)
    for _ in range(2):
        c = make_call(gw)
        assert authorize(gw, c) is None
        assert c.response_headers[b"x-ratelimit-limit-requests"] == b"2"
        finish(gw, c)
        gw.reactor.advance(5)
    c = make_call(gw)
    d = authorize(gw, c)
    assert (d.status, d.code) == (429, "rate_limit_exceeded")
    assert d.retry_after == pytest.approx(50.0)
    assert c.response_headers[b"x-ratelimit-remaining-requests"] == b"0"
    gw.reactor.advance(50)
    assert authorize(gw, make_call(gw)) is None


def test_tpm_is_settled_with_the_real_usage_after_the_request():
    gw = make_gateway(tpm=1000)
    c = make_call(gw, tokens=900)
    assert authorize(gw, c) is None
    assert authorize(gw, make_call(gw, tokens=200)).code == "rate_limit_exceeded"
    finish(gw, c, Usage(prompt_tokens=50, completion_tokens=50, total_tokens=100))
    c2 = make_call(gw, tokens=200)
    assert authorize(gw, c2) is None
    assert c2.response_headers[b"x-ratelimit-remaining-tokens"] == b"700"
    # a request that never reached an upstream gives all its expected tokens back
    finish(gw, c2)
    assert (
        gw.pm.get_plugin("accounts").limiter.headers(c2.account)[b"x-ratelimit-remaining-tokens"]
        == b"900"
    )


def test_credit_reservation_is_released_exactly_once():
    gw = make_gateway(credit_usd=1.0)
    body = {"model": "priced", "max_tokens": 100}
    c = make_call(gw, model="priced", body=body, tokens=300)
    assert authorize(gw, c) is None
    # 200 prompt tokens at $1000/M + 100 completion at $2000/M
    assert gw.accounts.credit.held(c.account.id) == pytest.approx(0.4)
    finish(gw, c)
    finish(gw, c)  # a second call must not release twice
    assert gw.accounts.credit.held(c.account.id) == 0.0
    c = make_call(gw, model="priced", body={"model": "priced"}, tokens=10)
    assert authorize(gw, c) is None
    expected = (10 * 1000 + DEFAULT_COMPLETION_TOKENS * 2000) / 1e6
    assert gw.accounts.credit.held(c.account.id) == pytest.approx(expected)


def test_credit_used_up_is_refused_and_in_flight_requests_count():
    gw = make_gateway(credit_usd=0.5)
    body = {"model": "priced", "max_tokens": 100}
    admitted = []
    for _ in range(50):
        c = make_call(gw, model="priced", body=body, tokens=200)
        d = authorize(gw, c)
        if d is None:
            admitted.append(c)
        else:
            assert (d.status, d.code, d.type) == (429, "insufficient_quota", "insufficient_quota")
            finish(gw, c)
    # each reserves $0.3: the second is admitted at 0.3 < 0.5, the third refused
    assert len(admitted) == 2
    for c in admitted:
        gw.ledger.record(_row(c.account.id, 0.3))
        finish(gw, c)
    assert gw.ledger.used_usd(admitted[0].account.id) == pytest.approx(0.6)
    assert gw.ledger.used_usd(admitted[0].account.id) <= 0.5 + 0.3
    assert authorize(gw, make_call(gw, model="priced", body=body)).code == "insufficient_quota"


def _row(account_id, cost, model="priced", time=T0, prompt=10, completion=5):
    return LedgerRow(
        time=time,
        request_id="x",
        account_id=account_id,
        model=model,
        key_id="k",
        status=200,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
        estimated=False,
        latency=0.1,
        attempts=1,
    )


# -- admin API ------------------------------------------------------------------------


class Admin:
    def __init__(self, gw):
        self.gw = gw
        self.stub = StubTreq(GatewayResource(gw))

    def call(self, method, path, body=None, token=ADMIN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kw = {"data": json.dumps(body).encode()} if body is not None else {}
        d = self.stub.request(method, "http://gw" + path, headers=headers, **kw)
        self.stub.flush()
        response = self._result(d)
        raw = self._result(response.content())
        return response.code, (json.loads(raw) if raw else None), response

    @staticmethod
    def _result(d):
        out = []
        d.addBoth(out.append)
        assert out, "the request did not complete"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]


def test_admin_create_list_show_patch_rotate_delete():
    state = MemoryState()
    gw = make_gateway(state=state)
    admin = Admin(gw)
    status, doc, _ = admin.call(
        "POST",
        "/admin/accounts",
        {"name": "bob", "models": ["gpt-4o-mini"], "rpm": 10, "credit_usd": 2.5},
    )
    assert status == 201
    key = doc["key"]
    assert key.startswith("sk-yg-") and len(key) == 6 + 48
    bob = doc["id"]
    assert gw.accounts.lookup(key).id == bob
    assert state.accounts[bob].key_hash == hash_key(key)
    assert doc["remaining_usd"] == 2.5 and doc["used_usd"] == 0.0

    status, doc, _ = admin.call("GET", "/admin/accounts")
    assert status == 200
    assert {a["name"] for a in doc["data"]} == {"alice", "bob"}
    text = json.dumps(doc)
    assert key not in text and hash_key(key) not in text and hash_key(ALICE) not in text

    gw.ledger.record(_row(bob, 1.0, prompt=7, completion=3))
    status, doc, _ = admin.call("GET", f"/admin/accounts/{bob}")
    assert doc["used_usd"] == 1.0 and doc["remaining_usd"] == 1.5
    assert doc["usage"] == {"requests": 1, "prompt_tokens": 7, "completion_tokens": 3}
    assert "key" not in doc

    status, doc, _ = admin.call(
        "PATCH", f"/admin/accounts/{bob}", {"enabled": False, "add_credit_usd": 1.0, "tpm": 5}
    )
    assert status == 200
    assert (doc["enabled"], doc["credit_usd"], doc["tpm"], doc["rpm"]) == (False, 3.5, 5, 10)
    assert state.accounts[bob].enabled is False

    status, doc, _ = admin.call("POST", f"/admin/accounts/{bob}/rotate")
    assert status == 200
    assert gw.accounts.lookup(key) is None
    assert gw.accounts.lookup(doc["key"]).id == bob

    assert admin.call("DELETE", f"/admin/accounts/{bob}")[0] == 204
    assert bob not in gw.accounts.by_id and bob not in state.accounts
    assert admin.call("GET", f"/admin/accounts/{bob}")[0] == 404


def test_admin_validation_and_auth():
    gw = make_gateway()
    admin = Admin(gw)
    assert admin.call("GET", "/admin/accounts", token="wrong")[0] == 401
    status, doc, _ = admin.call("POST", "/admin/accounts", {"name": "alice"})
    assert (status, doc["error"]["code"]) == (409, "account_exists")
    status, doc, _ = admin.call("POST", "/admin/accounts", {"name": "x", "bogus": 1})
    assert (status, doc["error"]["code"]) == (400, "unknown_field")
    status, doc, _ = admin.call("POST", "/admin/accounts", {"name": "x", "ip_allow": ["nope"]})
    assert (status, doc["error"]["code"]) == (400, "invalid_ip_allow")
    status, doc, _ = admin.call("POST", "/admin/accounts", {"name": "x", "expires": "soon"})
    assert (status, doc["error"]["code"]) == (400, "invalid_expires")
    alice = config_account_id("alice")
    assert admin.call("DELETE", f"/admin/accounts/{alice}")[0] == 409
    assert admin.call("POST", f"/admin/accounts/{alice}/rotate")[0] == 409


def test_patch_of_a_config_account_is_kept_until_its_entry_changes():
    state = MemoryState()
    gw = make_gateway(state=state, rpm=5)
    admin = Admin(gw)
    alice = config_account_id("alice")
    status, doc, _ = admin.call("PATCH", f"/admin/accounts/{alice}", {"rpm": 99})
    assert status == 200 and doc["rpm"] == 99
    assert state.accounts[alice].rpm == 99
    # a reload with the same entry keeps the override
    gw.reload(make_config(rpm=5))
    assert gw.accounts.by_id[alice].rpm == 99
    # and so does a restart (the override comes back from the store)
    gw2 = make_gateway(state=state, rpm=5)
    assert gw2.accounts.by_id[alice].rpm == 99
    # an edited entry wins, and the stored override is dropped
    gw2.reload(make_config(rpm=7))
    assert gw2.accounts.by_id[alice].rpm == 7
    assert alice not in state.accounts


def test_admin_usage_totals_per_account_and_model():
    gw = make_gateway()
    admin = Admin(gw)
    alice = config_account_id("alice")
    gw.ledger.record(_row(alice, 0.5, model="m1", time=T0 - 86400))
    gw.ledger.record(_row(alice, 0.25, model="m1"))
    gw.ledger.record(_row(alice, 0.125, model="m2"))
    gw.ledger.record(_row("acct_other", 1.0, model="m1"))
    status, doc, _ = admin.call("GET", "/admin/usage?account=alice&since=2026-03-10")
    assert status == 200
    assert [(d["model"], d["requests"], d["cost_usd"]) for d in doc["data"]] == [
        ("m1", 1, 0.25),
        ("m2", 1, 0.125),
    ]
    assert doc["total"]["cost_usd"] == 0.375
    status, doc, _ = admin.call("GET", f"/admin/usage?until={int(T0)}")
    assert [(d["account"], d["cost_usd"]) for d in doc["data"]] == [(alice, 0.5)]
    status, doc, _ = admin.call("GET", "/admin/usage")
    assert doc["total"]["requests"] == 4
    assert admin.call("GET", "/admin/usage?since=yesterday")[0] == 400


# -- billing endpoints ----------------------------------------------------------------


def billing(gw, path, key=ALICE):
    stub = StubTreq(GatewayResource(gw))
    d = stub.get("http://gw" + path, headers={"Authorization": f"Bearer {key}"})
    stub.flush()
    response = Admin._result(d)
    return response.code, json.loads(Admin._result(response.content()))


def test_billing_subscription_shape():
    gw = make_gateway(credit_usd=12.5, expires="2027-01-01T00:00:00Z")
    for prefix in ("/v1", ""):
        status, doc = billing(gw, prefix + "/dashboard/billing/subscription")
        assert status == 200
        assert doc == {
            "object": "billing_subscription",
            "has_payment_method": True,
            "hard_limit_usd": 12.5,
            "soft_limit_usd": 12.5,
            "system_hard_limit_usd": 12.5,
            "access_until": 1798761600,
        }
    gw = make_gateway()
    status, doc = billing(gw, "/v1/dashboard/billing/subscription")
    assert (doc["hard_limit_usd"], doc["access_until"]) == (100000000.0, 0)
    status, doc = billing(gw, "/v1/dashboard/billing/subscription", key="sk-nobody-000000")
    assert (status, doc["error"]["code"]) == (401, "invalid_api_key")
    gw = make_gateway(enabled=False)
    assert billing(gw, "/v1/dashboard/billing/subscription")[0] == 401


def test_billing_usage_in_cents_per_day_and_model():
    gw = make_gateway()
    alice = config_account_id("alice")
    day = 1773100800  # 2026-03-10T00:00:00Z
    gw.ledger.record(_row(alice, 0.5, model="m1", time=day - 3600))
    gw.ledger.record(_row(alice, 0.25, model="m1", time=day + 10))
    gw.ledger.record(_row(alice, 0.125, model="m2", time=day + 20))
    gw.ledger.record(_row(alice, 0.25, model="m1", time=day + 30))
    gw.ledger.record(_row("acct_other", 9.0, model="m1", time=day + 10))
    status, doc = billing(
        gw, "/v1/dashboard/billing/usage?start_date=2026-03-09&end_date=2026-03-11"
    )
    assert status == 200
    assert doc == {
        "object": "list",
        "total_usage": 112.5,
        "daily_costs": [
            {"timestamp": day - 86400, "line_items": [{"name": "m1", "cost": 50.0}]},
            {
                "timestamp": day,
                "line_items": [{"name": "m1", "cost": 50.0}, {"name": "m2", "cost": 12.5}],
            },
        ],
    }
    # end_date is exclusive
    status, doc = billing(gw, "/dashboard/billing/usage?start_date=2026-03-01&end_date=2026-03-10")
    assert doc["total_usage"] == 50.0
    status, doc = billing(gw, "/dashboard/billing/usage?start_date=March")
    assert (status, doc["error"]["code"]) == (400, "invalid_date")


def test_a_version_1_database_is_migrated(tmp_path):
    import sqlite3

    from yugongd.sqlite import SCHEMA_VERSION, SQLiteState

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        """CREATE TABLE accounts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, models TEXT NOT NULL,
        rpm INTEGER NOT NULL, tpm INTEGER NOT NULL, credit_usd REAL, expires TEXT,
        ip_allow TEXT NOT NULL, enabled INTEGER NOT NULL, source TEXT NOT NULL)"""
    )
    db.execute(
        "INSERT INTO accounts VALUES ('acct_1', 'old', 'h', '[\"*\"]', 5, 0, 1.5, NULL, '[]', 1, 'api')"
    )
    db.commit()
    db.close()
    state = SQLiteState(str(path), MemoryReactorClock())
    snapshot = state._open()
    [account] = snapshot.accounts
    assert (account.name, account.rpm, account.credit_usd, account.config_hash) == (
        "old",
        5,
        1.5,
        "",
    )
    version = state._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert int(version.fetchone()[0]) == SCHEMA_VERSION
    state._conn.close()
