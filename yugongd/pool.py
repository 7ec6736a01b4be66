"""The pool of upstream keys: which keys exist, what state each is in, which may serve a model.

Choosing among the serving keys is not done here but by the ``yugongd_select_key`` hook
(the default lives in :mod:`yugongd.builtin.balancer`); what a failure does to a key is
decided by ``yugongd_upstream_failure`` and applied through :meth:`KeyPool.cool_down` and
:meth:`KeyPool.disable`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field

from yugongd.ratelimit import Budget

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from yugongd.config import KeyConfig, Timeouts, UpstreamConfig


def key_hint(secret: str) -> str:
    """A recognisable but harmless form of a key, like ``sk-…abcd``."""
    if len(secret) < 12:
        return "…"
    prefix = secret[:3] if secret.startswith("sk-") else ""
    return f"{prefix}…{secret[-4:]}"


def models_match(patterns: tuple[str, ...], model: str | None) -> bool:
    """Whether ``model`` matches any glob in ``patterns``; a request with no model matches."""
    if model is None:
        return True
    return any(p == "*" or fnmatch.fnmatchcase(model, p) for p in patterns)


@define(slots=True, eq=False)
class Upstream:
    """An upstream API (one ``upstreams`` entry): where to send requests and how long to wait."""

    name: str
    base_url: str
    timeouts: Timeouts
    models: tuple[str, ...]


@define(slots=True, eq=False)
class UpstreamKey:
    """One pool key with its runtime state.

    ``secret`` is excluded from ``repr`` so that it never reaches a log line by accident.
    """

    id: str
    upstream: str
    secret: str = field(repr=False)
    clock: IReactorTime = field(repr=False)
    endpoint: Upstream = field(repr=False)
    organization: str | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ("*",)
    source: str = "config"
    enabled: bool = True
    disabled_reason: str | None = None
    cooldown_until: float = 0.0
    #: consecutive failures of the same kind, for doubling cooldowns
    strikes: int = 0
    inflight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    #: whether the prober may re-enable it (disabled for quota or repeated failures)
    probe: bool = False
    disabled_at: float = 0.0
    #: the organisation's requests/tokens budget, shared by the keys of one organisation
    budget: Budget = field(factory=lambda: Budget("?"), repr=False)
    #: the ``Authorization`` (and organisation) headers, built once
    auth_header: bytes = field(default=b"", repr=False)
    org_header: bytes | None = field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self.auth_header = b"Bearer " + self.secret.encode("utf-8")
        self.org_header = self.organization.encode("utf-8") if self.organization else None

    @property
    def hint(self) -> str:
        return key_hint(self.secret)

    @property
    def budget_name(self) -> str:
        return f"org:{self.upstream}:{self.organization}" if self.organization else f"key:{self.id}"

    @property
    def remaining_requests(self) -> int | None:
        bucket = self.budget.requests
        return None if bucket.capacity is None else int(bucket.level(self.clock.seconds()))

    @property
    def remaining_tokens(self) -> int | None:
        bucket = self.budget.tokens
        return None if bucket.capacity is None else int(bucket.level(self.clock.seconds()))

    @property
    def state(self) -> str:
        """``"active"``, ``"cooling"`` or ``"disabled"``."""
        if not self.enabled:
            return "disabled"
        if self.cooldown_until > self.clock.seconds():
            return "cooling"
        return "active"

    def serves(self, model: str | None) -> bool:
        return models_match(self.endpoint.models, model) and models_match(self.models, model)


class PoolListener(Protocol):
    """Told of every change to a key's state made in this process (cluster mode shares
    them with the other processes)."""

    def key_changed(self, key: UpstreamKey) -> None: ...

    def budget_learned(self, budget: Budget) -> None: ...


class KeyPool:
    """All upstream keys, indexed for the per-request questions the proxy asks."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: told of cooldowns, disables, enables and learned limits (cluster mode)
        self.listener: PoolListener | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.keys: dict[str, UpstreamKey] = {}
        self.budgets: dict[str, Budget] = {}
        # model -> keys that serve it regardless of state; cleared when keys change
        self._serving: dict[str | None, tuple[UpstreamKey, ...]] = {}

    # -- building -----------------------------------------------------------------------

    def configure(self, upstreams: Iterable[UpstreamConfig]) -> None:
        """Take the upstreams and keys of a (re)loaded config.

        Keys whose id is already known keep their runtime state (cooldown, disabled,
        counters, learned limits); keys no longer configured are dropped unless they
        were added at runtime.
        """
        new_upstreams: dict[str, Upstream] = {}
        new_keys: dict[str, UpstreamKey] = {}
        for up in upstreams:
            endpoint = Upstream(up.name, up.base_url, up.timeouts, up.models)
            new_upstreams[up.name] = endpoint
            for kc in up.keys:
                new_keys[kc.id] = self._make_key(endpoint, kc, "config")
        for key in self.keys.values():
            if key.source != "config" and key.id not in new_keys:
                kept = new_upstreams.get(key.upstream)
                if kept is not None:
                    key.endpoint = kept
                    new_keys[key.id] = key
        self.upstreams = new_upstreams
        self.keys = new_keys
        self._rebuild_budgets()
        self._serving.clear()

    def _rebuild_budgets(self) -> None:
        """One budget per organisation (or per key without one), keeping what was learned."""
        old = self.budgets
        self.budgets = {}
        for key in self.keys.values():
            name = key.budget_name
            budget = self.budgets.get(name)
            if budget is None:
                budget = old.get(name) or Budget(name)
                budget.configure(key.rpm, key.tpm)
                self.budgets[name] = budget
            else:
                budget.configure(key.rpm, key.tpm)
            key.budget = budget

    def _make_key(self, endpoint: Upstream, kc: KeyConfig, source: str) -> UpstreamKey:
        old = self.keys.get(kc.id)
        key = UpstreamKey(
            id=kc.id,
            upstream=endpoint.name,
            secret=kc.key,
            clock=self.clock,
            endpoint=endpoint,
            organization=kc.organization,
            weight=kc.weight,
            rpm=kc.rpm,
            tpm=kc.tpm,
            models=kc.models,
            source=source,
        )
        if old is not None and old.secret == kc.key:
            for name in (
                "enabled",
                "disabled_reason",
                "cooldown_until",
                "strikes",
                "inflight",
                "requests",
                "failures",
                "last_error",
                "probe",
                "disabled_at",
            ):
                setattr(key, name, getattr(old, name))
        return key

    def add_key(self, upstream: str, kc: KeyConfig, source: str = "api") -> UpstreamKey:
        """Add a key at runtime (admin API); it serves from the next request on."""
        endpoint = self.upstreams[upstream]
        key = self._make_key(endpoint, kc, source)
        self.keys[key.id] = key
        self._rebuild_budgets()
        self._serving.clear()
        return key

    def keys_changed(self) -> None:
        """A key's models or limits changed: forget which keys serve which model."""
        self._rebuild_budgets()
        self._serving.clear()

    def remove_key(self, key_id: str) -> UpstreamKey | None:
        key = self.keys.pop(key_id, None)
        self._rebuild_budgets()
        self._serving.clear()
        return key

    # -- the per-request questions ------------------------------------------------------

    def serving(self, model: str | None) -> tuple[UpstreamKey, ...]:
        """Every key whose globs admit ``model``, whatever its state (cached per model)."""
        keys = self._serving.get(model)
        if keys is None:
            keys = tuple(k for k in self.keys.values() if k.serves(model))
            if len(self._serving) > 4096:
                self._serving.clear()
            self._serving[model] = keys
        return keys

    def candidates(self, model: str | None, tried: set[str], tokens: int = 0) -> list[UpstreamKey]:
        """Keys that may take the next attempt: serving, enabled, not cooling, not tried,
        and with room in their organisation's budget for one request of ``tokens``."""
        now = self.clock.seconds()
        return [
            k
            for k in self.serving(model)
            if k.enabled
            and k.cooldown_until <= now
            and k.id not in tried
            and k.budget.admits(tokens, now)
        ]

    def soonest_free(self, model: str | None, tried: set[str], tokens: int = 0) -> float | None:
        """When the first enabled, untried key that serves ``model`` can take a request of
        ``tokens`` (its cooldown over and its budget refilled); ``None`` if none ever can."""
        now = self.clock.seconds()
        best = None
        for k in self.serving(model):
            if not k.enabled or k.id in tried:
                continue
            at = max(k.cooldown_until, now + k.budget.wait_for(tokens, now))
            if best is None or at < best:
                best = at
        return best if best is not None and best != float("inf") else None

    # -- state changes ------------------------------------------------------------------

    def cool_down(self, key: UpstreamKey, seconds: float, reason: str) -> None:
        key.cooldown_until = max(key.cooldown_until, self.clock.seconds() + seconds)
        key.last_error = reason
        if self.listener is not None:
            self.listener.key_changed(key)

    def disable(self, key: UpstreamKey, reason: str, probe: bool = False) -> None:
        """Take ``key`` out of service; with ``probe`` the prober may bring it back."""
        key.enabled = False
        key.disabled_reason = reason
        key.last_error = reason
        key.probe = probe
        key.disabled_at = self.clock.seconds()
        if self.listener is not None:
            self.listener.key_changed(key)

    def enable(self, key: UpstreamKey) -> None:
        key.enabled = True
        key.disabled_reason = None
        key.cooldown_until = 0.0
        key.strikes = 0
        key.probe = False
        if self.listener is not None:
            self.listener.key_changed(key)

    def learned(self, budget: Budget) -> None:
        """The upstream's headers have just updated ``budget``."""
        if self.listener is not None:
            self.listener.budget_learned(budget)

    # -- the shared view (cluster mode) ----------------------------------------------------

    @staticmethod
    def key_state(key: UpstreamKey) -> dict[str, Any]:
        """What other processes need to know of a key's state."""
        return {
            "enabled": key.enabled,
            "reason": key.disabled_reason,
            "cooldown_until": key.cooldown_until,
            "last_error": key.last_error,
            "probe": key.probe,
            "disabled_at": key.disabled_at,
        }

    def apply_key_state(self, key_id: str, state: dict[str, Any]) -> bool:
        """Take a key state another process published (no listener call: no echo).

        The last announcement wins: each process announces its whole merged view of the
        key (a cooldown there only ever lengthened what it knew), and an enable through
        the admin API must clear a cooldown everywhere. Returns whether the key is known.
        """
        key = self.keys.get(key_id)
        if key is None:
            return False
        enabled = bool(state.get("enabled", True))
        if enabled and not key.enabled:
            key.strikes = 0
        key.cooldown_until = float(state.get("cooldown_until") or 0.0)
        key.enabled = enabled
        key.disabled_reason = state.get("reason") if not enabled else None
        key.last_error = state.get("last_error") or key.last_error
        key.probe = bool(state.get("probe", False))
        key.disabled_at = float(state.get("disabled_at") or 0.0)
        return True

    def counts(self) -> dict[str, int]:
        out = {"active": 0, "cooling": 0, "disabled": 0}
        for key in self.keys.values():
            out[key.state] += 1
        return out
