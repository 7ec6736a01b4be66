"""Cluster mode (plugin name ``cluster``, registered only with ``state: "redis://…"``).

Keeps this process's in-memory view — the pool's key states and learned limits, the
accounts, the runtime keys, the account totals — in step with the other processes that
share the Redis database:

- a cooldown, disable or enable made here (failover, the prober, the admin API) is
  written to Redis and announced; one announced by another process is applied to the
  local key at once (pub/sub: a few milliseconds);
- limits learned from the upstream's rate-limit headers are announced, at most ten times
  a second per organisation;
- accounts and runtime keys created, changed or deleted through any process's admin API
  are applied here;
- the account totals (``used_usd`` in the admin API, the credit view used while Redis is
  unreachable) are refreshed from Redis every second;
- after (re)connecting, the key states, accounts and keys are read again in full, for
  what was announced while this process was not listening.

``/metrics`` gains ``yugongd_instance_info{instance=…}`` and ``yugongd_redis_up``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from yugongd._markers import hookimpl
from yugongd.pool import KeyPool

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from yugongd.config import Config
    from yugongd.gateway import Gateway
    from yugongd.model import Account
    from yugongd.ratelimit import Bucket, Budget
    from yugongd.redisstate import RedisState
    from yugongd.state import StoredKey

log = Logger()

#: seconds between two announcements of one organisation's learned limits
BUDGET_INTERVAL = 0.1
#: seconds between two refreshes of the account totals from Redis
TOTALS_INTERVAL = 1.0


def _bucket_data(bucket: Bucket, now: float) -> list[Any]:
    return [bucket.capacity, bucket.level(now), bucket.rate, bucket.learned]


def _apply_bucket(bucket: Bucket, data: list[Any], now: float) -> None:
    capacity, level, rate, learned = data
    if not learned:
        return
    bucket.capacity = None if capacity is None else float(capacity)
    bucket._level = float(level)
    bucket._at = now
    bucket.rate = float(rate)
    bucket.learned = True


class _InstanceCollector:
    """``yugongd_instance_info`` and ``yugongd_redis_up`` for ``/metrics``."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            "yugongd_instance_info",
            "This process in a cluster: its instance name and state backend.",
            labels=["instance", "boot"],
        )
        info.add_metric([self.state.instance, self.state.boot], 1)
        yield info
        up = GaugeMetricFamily("yugongd_redis_up", "1 when this process is connected to Redis.")
        up.add_metric([], 1 if self.state.up else 0)
        yield up
        pending = GaugeMetricFamily(
            "yugongd_ledger_pending",
            "Ledger rows and settlements not yet in Redis (queued or spooled).",
        )
        pending.add_metric([], self.state.pending())
        yield pending


class ClusterPlugin:
    """Mirrors the shared state into this process; announces this process's changes."""

    def __init__(self, gateway: Gateway, state: RedisState) -> None:
        self.gateway = gateway
        self.state = state
        state.listener = self
        gateway.pool.listener = self
        self._budget_sent: dict[str, float] = {}
        self._budget_due: dict[str, IDelayedCall] = {}
        self._refresher: task.LoopingCall | None = None
        self._collector: _InstanceCollector | None = None

    @hookimpl(trylast=True)
    def yugongd_configure(self, config: Config, gateway: Gateway) -> None:
        if self._collector is None and getattr(gateway, "metrics", None) is not None:
            self._collector = _InstanceCollector(self.state)
            gateway.metrics.registry.register(self._collector)
        if self._refresher is None:
            self._refresher = task.LoopingCall(self.refresh_totals)
            self._refresher.clock = gateway.reactor
            self._refresher.start(TOTALS_INTERVAL, now=False)

    # -- this process's changes ------------------------------------------------------------

    def key_changed(self, key: Any) -> None:
        self.state.publish_key_state(key.id, KeyPool.key_state(key))

    def budget_learned(self, budget: Budget) -> None:
        now = self.gateway.clock.seconds()
        last = self._budget_sent.get(budget.name, 0.0)
        if now - last >= BUDGET_INTERVAL:
            self._send_budget(budget)
        elif budget.name not in self._budget_due:
            self._budget_due[budget.name] = self.gateway.reactor.callLater(
                last + BUDGET_INTERVAL - now, self._send_budget, budget
            )

    def _send_budget(self, budget: Budget) -> None:
        self._budget_due.pop(budget.name, None)
        now = self.gateway.clock.seconds()
        self._budget_sent[budget.name] = now
        self.state.publish_budget(
            budget.name,
            {"r": _bucket_data(budget.requests, now), "k": _bucket_data(budget.tokens, now)},
        )

    # -- the others' changes ---------------------------------------------------------------

    def account_event(self, account_id: str, account: Account | None) -> None:
        accounts = self.gateway.accounts
        if account is None:
            local = accounts.by_id.get(account_id)
            # a config account's override was dropped: the config file governs it here
            if local is not None and local.source != "config":
                accounts.remove(account_id)
        else:
            self._take_account(account)

    def _take_account(self, account: Account) -> None:
        """Put an account from Redis; a stored override of a config account only while
        this process's config entry is the one the override was made for."""
        accounts = self.gateway.accounts
        if account.source == "config":
            local = accounts.by_id.get(account.id)
            if local is None or local.config_hash != account.config_hash:
                return
        accounts.put(account)

    def key_event(self, key_id: str, stored: StoredKey | None) -> None:
        pool = self.gateway.pool
        if stored is None:
            key = pool.keys.get(key_id)
            if key is not None and key.source != "config":
                pool.remove_key(key_id)
            return
        if stored.upstream not in pool.upstreams:
            return
        local = pool.keys.get(key_id)
        if local is not None and local.source == "config":
            return
        pool.add_key(stored.upstream, stored.key_config(), source="api")

    def key_state_event(self, key_id: str, state: dict[str, Any]) -> None:
        self.gateway.pool.apply_key_state(key_id, state)

    def budget_event(self, name: str, data: dict[str, Any]) -> None:
        budget = self.gateway.pool.budgets.get(name)
        if budget is None:
            return
        now = self.gateway.clock.seconds()
        _apply_bucket(budget.requests, data["r"], now)
        _apply_bucket(budget.tokens, data["k"], now)

    @defer.inlineCallbacks
    def resync(self) -> Any:
        """Read the shared state in full (at start and after every reconnection)."""
        try:
            states = yield self.state.key_states()
            for key_id, state in states.items():
                self.gateway.pool.apply_key_state(key_id, state)
            redis = self.state.redis
            raw_accounts = yield self.state._call(redis.hgetall(self.state_key("accounts")))
            raw_keys = yield self.state._call(redis.hgetall(self.state_key("keys")))
        except Exception:
            log.failure("cluster: could not read the shared state")
            return
        from yugongd.redisstate import account_from_json, key_from_json

        accounts = self.gateway.accounts
        seen = set()
        for text in raw_accounts.values():
            account = account_from_json(text)
            seen.add(account.id)
            self._take_account(account)
        for account in list(accounts.by_id.values()):
            if account.source == "api" and account.id not in seen:
                accounts.remove(account.id)
        pool = self.gateway.pool
        stored_ids = set()
        for text in raw_keys.values():
            stored = key_from_json(text)
            stored_ids.add(stored.id)
            self.key_event(stored.id, stored)
        for key in list(pool.keys.values()):
            if key.source == "api" and key.id not in stored_ids:
                pool.remove_key(key.id)

    @staticmethod
    def state_key(name: str) -> str:
        from yugongd.redisstate import PREFIX

        return PREFIX + name

    def refresh_totals(self) -> None:
        if not self.state.up:
            return

        def got(totals: Any) -> None:
            self.gateway.ledger.restore(totals)

        d = self.state.fetch_totals()
        d.addCallbacks(got, lambda f: None)
