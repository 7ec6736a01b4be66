"""The key pool, the default balancer and failover decisions, with a fake clock."""

from collections import Counter

from twisted.internet.task import Clock

from yugongd.builtin.balancer import BalancerPlugin
from yugongd.builtin.failover import FailoverPlugin
from yugongd.config import Config, KeyConfig, PoolConfig, UpstreamConfig
from yugongd.model import AttemptFailure, Call
from yugongd.pool import KeyPool, key_hint


def make_pool(clock, keys, models=("*",)):
    pool = KeyPool(clock)
    pool.configure(
        [UpstreamConfig(name="up", base_url="http://u/v1", models=models, keys=tuple(keys))]
    )
    return pool


class FakeGateway:
    def __init__(self, strategy="least-loaded", clock=None, **pool):
        self.config = Config(source="<test>", pool=PoolConfig(strategy=strategy, **pool))
        self.clock = clock or Clock()


def call():
    return Call(
        request_id="r",
        endpoint="/chat/completions",
        method="POST",
        client_ip="127.0.0.1",
        started=0,
    )


def test_key_hint_never_shows_the_key():
    assert key_hint("sk-abcdefghijklmnop1234") == "sk-…1234"
    assert key_hint("short") == "…"


def test_candidates_follow_state_models_and_tried():
    clock = Clock()
    pool = make_pool(
        clock,
        [
            KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa", models=("gpt-4o*",)),
            KeyConfig(id="b", key="sk-bbbbbbbbbbbbbbbbbb"),
            KeyConfig(id="c", key="sk-cccccccccccccccccc"),
        ],
    )
    ids = lambda keys: [k.id for k in keys]  # noqa: E731
    assert ids(pool.candidates("gpt-4o-mini", set())) == ["a", "b", "c"]
    assert ids(pool.candidates("o3", set())) == ["b", "c"]
    assert ids(pool.candidates("gpt-4o", {"a"})) == ["b", "c"]
    pool.cool_down(pool.keys["b"], 10, "429")
    assert pool.keys["b"].state == "cooling"
    assert ids(pool.candidates("o3", set())) == ["c"]
    assert pool.soonest_free("o3", {"c"}) == 10
    clock.advance(10)
    assert pool.keys["b"].state == "active"
    pool.disable(pool.keys["c"], "HTTP 401")
    assert ids(pool.candidates("o3", set())) == ["b"]
    assert pool.counts() == {"active": 2, "cooling": 0, "disabled": 1}
    pool.enable(pool.keys["c"])
    assert pool.keys["c"].disabled_reason is None


def test_upstream_models_restrict_every_key():
    pool = make_pool(
        Clock(), [KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa")], models=("whisper-*",)
    )
    assert pool.candidates("gpt-4o", set()) == []
    assert len(pool.candidates("whisper-1", set())) == 1
    assert len(pool.candidates(None, set())) == 1


def test_reload_keeps_runtime_state_of_known_keys():
    clock = Clock()
    pool = make_pool(clock, [KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa")])
    pool.disable(pool.keys["a"], "HTTP 401")
    pool.keys["a"].requests = 7
    pool.configure(
        [
            UpstreamConfig(
                name="up",
                base_url="http://u/v1",
                keys=(
                    KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa"),
                    KeyConfig(id="b", key="sk-bbbbbbbbbbbbbbbbbb"),
                ),
            )
        ]
    )
    assert pool.keys["a"].state == "disabled" and pool.keys["a"].requests == 7
    assert pool.keys["b"].state == "active"


def spread(strategy, weights, n=600, inflight=None):
    pool = make_pool(
        Clock(),
        [KeyConfig(id=f"k{i}", key=f"sk-{i:020d}", weight=w) for i, w in enumerate(weights)],
    )
    plugin = BalancerPlugin(FakeGateway(strategy))
    counts = Counter()
    for _ in range(n):
        key = plugin.yugongd_select_key(call(), pool.candidates(None, set()))
        counts[key.id] += 1
    return counts


def test_round_robin_is_even():
    assert spread("round-robin", [1, 1, 1]) == {"k0": 200, "k1": 200, "k2": 200}


def test_weighted_follows_weights_exactly():
    assert spread("weighted", [1, 2, 3]) == {"k0": 100, "k1": 200, "k2": 300}


def test_random_roughly_follows_weights():
    counts = spread("random", [1, 3], n=4000)
    assert 0.2 < counts["k0"] / 4000 < 0.3


def test_least_loaded_prefers_idle_keys_relative_to_weight():
    pool = make_pool(
        Clock(),
        [
            KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa", weight=1),
            KeyConfig(id="b", key="sk-bbbbbbbbbbbbbbbbbb", weight=2),
        ],
    )
    plugin = BalancerPlugin(FakeGateway())
    chosen = Counter()
    for _ in range(30):
        key = plugin.yugongd_select_key(call(), pool.candidates(None, set()))
        key.inflight += 1
        chosen[key.id] += 1
    assert chosen == {"a": 10, "b": 20}


def test_least_loaded_spreads_idle_load_evenly():
    assert spread("least-loaded", [1, 1, 1]) == {"k0": 200, "k1": 200, "k2": 200}


def failover(**pool):
    gw = FakeGateway(**pool)
    key = make_pool(Clock(), [KeyConfig(id="a", key="sk-aaaaaaaaaaaaaaaaaa")]).keys["a"]
    return FailoverPlugin(gw), key


def test_429_cools_for_retry_after_or_doubling_cooldown():
    plugin, key = failover(cooldown=20, max_cooldown=70)
    d = plugin.yugongd_upstream_failure(
        call(), key, AttemptFailure("status", 429, "rate_limit_exceeded", 3.0)
    )
    assert (d.retry, d.cooldown, d.disable) == (True, 3.0, None)
    waits = [
        plugin.yugongd_upstream_failure(call(), key, AttemptFailure("status", 429)).cooldown
        for _ in range(3)
    ]
    assert waits == [40, 70, 70]


def test_revoked_and_quota_keys_are_disabled():
    plugin, key = failover()
    assert (
        plugin.yugongd_upstream_failure(
            call(), key, AttemptFailure("status", 401, "invalid_api_key")
        ).disable
        == "HTTP 401 invalid_api_key"
    )
    assert (
        plugin.yugongd_upstream_failure(
            call(), key, AttemptFailure("status", 429, "insufficient_quota")
        ).disable
        == "insufficient_quota"
    )


def test_5xx_and_connection_errors_short_cooldown_then_disable():
    plugin, key = failover(cooldown=20)
    waits = [
        plugin.yugongd_upstream_failure(
            call(), key, AttemptFailure("connect", message="refused")
        ).cooldown
        for _ in range(4)
    ]
    assert waits == [1, 2, 4, 8]
    d = plugin.yugongd_upstream_failure(call(), key, AttemptFailure("status", 503))
    assert d.retry and d.disable and "repeated" in d.disable
