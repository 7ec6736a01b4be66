"""Default failure decisions (plugin name ``failover``).

- 429 with ``insufficient_quota``, 401, 403: disable the key, keep the reason, retry.
- other 429: cool down for what the upstream asked (``Retry-After`` / reset headers),
  else ``pool.cooldown`` doubling on repeats up to ``pool.max_cooldown``; retry.
- 5xx, 408, refused or broken connection, timeouts: a short cooldown (1 s, doubling on
  repeats, at most ``pool.cooldown``); after 5 in a row the key is disabled as
  ``repeated 5xx`` for the probe to re-test; retry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yugongd._markers import hookimpl
from yugongd.model import AttemptFailure, Call, FailureDecision

if TYPE_CHECKING:
    from yugongd.gateway import Gateway
    from yugongd.pool import UpstreamKey

SHORT_COOLDOWN = 1.0
STRIKES_TO_DISABLE = 5


class FailoverPlugin:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @hookimpl(trylast=True)
    def yugongd_upstream_failure(
        self, call: Call, key: UpstreamKey, failure: AttemptFailure
    ) -> FailureDecision:
        pool = self.gateway.config.pool
        status = failure.status
        if failure.kind == "status" and status is not None:
            if status == 429 and failure.code == "insufficient_quota":
                return FailureDecision(retry=True, disable="insufficient_quota")
            if status in (401, 403):
                reason = f"HTTP {status}" + (f" {failure.code}" if failure.code else "")
                return FailureDecision(retry=True, disable=reason)
            if status == 429:
                key.strikes += 1
                if failure.retry_after is not None:
                    wait = min(failure.retry_after, pool.max_cooldown)
                else:
                    wait = min(pool.cooldown * 2 ** (key.strikes - 1), pool.max_cooldown)
                return FailureDecision(retry=True, cooldown=wait)
            if status < 500 and status != 408:
                return FailureDecision(retry=False)
        key.strikes += 1
        if key.strikes >= STRIKES_TO_DISABLE:
            return FailureDecision(retry=True, disable=f"repeated failures: {failure.message}")
        wait = min(SHORT_COOLDOWN * 2 ** (key.strikes - 1), pool.cooldown)
        return FailureDecision(retry=True, cooldown=wait)
