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

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse

    from yugongd.gateway import Gateway
    from yugongd.pool import UpstreamKey


def _int_header(response: IResponse, name: bytes) -> int | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


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
        self._turn += 1
        n = len(candidates)
        best = None
        best_score: tuple[float, float] = (0.0, 0.0)
        for i in range(n):
            key = candidates[(self._turn + i) % n]
            load = (key.inflight + 1) / key.weight
            remaining = key.remaining_requests
            limit = key.rpm
            headroom = -(remaining / limit) if remaining is not None and limit else 0.0
            score = (load, headroom)
            if best is None or score < best_score:
                best, best_score = key, score
        assert best is not None
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
        remaining = _int_header(response, b"x-ratelimit-remaining-requests")
        if remaining is not None:
            key.remaining_requests = remaining
        tokens = _int_header(response, b"x-ratelimit-remaining-tokens")
        if tokens is not None:
            key.remaining_tokens = tokens
        if response.code < 400:
            key.strikes = 0
