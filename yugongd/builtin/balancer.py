"""Default key selection and limit learning (plugin name ``pool``).

Strategies (``pool.strategy``):

- ``least-loaded``: the key with the fewest requests in flight per unit of weight; among
  equals, the one with the largest share of its learned remaining requests, then the next
  in rotation, so that idle keys share the load evenly.
- ``round-robin``: each candidate in turn.
- ``weighted``: smooth weighted round-robin (nginx's), so that load follows the weights
  exactly over any window.
- ``random``: a random candidate, with probability proportional to its weight.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from yugongd._markers import hookimpl
from yugongd.model import Call
from yugongd.ratelimit import parse_duration, parse_int

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse

    from yugongd.gateway import Gateway
    from yugongd.pool import UpstreamKey


def _first(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class BalancerPlugin:
    """Chooses among the candidate keys by the configured strategy."""

    def __init__(self, gateway: Gateway, rng: random.Random | None = None) -> None:
        self.gateway = gateway
        self.rng = rng or random.Random()
        self._turn = 0
        self._current: dict[str, float] = {}

    @hookimpl(trylast=True)
    def yugongd_select_key(self, call: Call, candidates: list[UpstreamKey]) -> UpstreamKey | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        strategy = self.gateway.config.pool.strategy
        if strategy == "round-robin":
            self._turn += 1
            return candidates[self._turn % len(candidates)]
        if strategy == "random":
            return self.rng.choices(candidates, weights=[k.weight for k in candidates])[0]
        if strategy == "weighted":
            return self._smooth_weighted(candidates)
        return self._least_loaded(candidates)

    def _least_loaded(self, candidates: list[UpstreamKey]) -> UpstreamKey:
        """Fewest in flight per unit of weight, scaled by how much of its organisation's
        budget is left; ties go to the next key in rotation."""
        self._turn += 1
        now = self.gateway.clock.seconds()
        n = len(candidates)
        best = candidates[0]
        best_score = float("inf")
        for i in range(n):
            key = candidates[(self._turn + i) % n]
            score = (key.inflight + 1) / key.weight / max(0.05, key.budget.headroom(now))
            if score < best_score:
                best, best_score = key, score
        return best

    def _smooth_weighted(self, candidates: list[UpstreamKey]) -> UpstreamKey:
        total = 0.0
        best = None
        current = self._current
        for key in candidates:
            w = current.get(key.id, 0.0) + key.weight
            current[key.id] = w
            total += key.weight
            if best is None or w > current[best.id]:
                best = key
        assert best is not None
        current[best.id] -= total
        return best

    @hookimpl(trylast=True)
    def yugongd_upstream_response(self, call: Call, key: UpstreamKey, response: IResponse) -> None:
        """Learn the organisation's remaining requests and tokens from the headers."""
        now = self.gateway.clock.seconds()
        marks = call.sent_marks or (None, None)
        learned = False
        remaining = parse_int(_first(response, b"x-ratelimit-remaining-requests"))
        if remaining is not None:
            learned = True
            key.budget.requests.sync(
                parse_int(_first(response, b"x-ratelimit-limit-requests")),
                remaining,
                parse_duration(_first(response, b"x-ratelimit-reset-requests")),
                now,
                marks[0],
            )
        remaining = parse_int(_first(response, b"x-ratelimit-remaining-tokens"))
        if remaining is not None:
            learned = True
            key.budget.tokens.sync(
                parse_int(_first(response, b"x-ratelimit-limit-tokens")),
                remaining,
                parse_duration(_first(response, b"x-ratelimit-reset-tokens")),
                now,
                marks[1],
            )
        if learned:
            self.gateway.pool.learned(key.budget)
        if response.code < 400:
            key.strikes = 0
