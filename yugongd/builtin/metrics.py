"""Default Prometheus counters (plugin name ``metrics``).

Observes the request lifecycle and feeds :class:`yugongd.metrics.Metrics` (served at
``GET /metrics``). It never decides anything: its ``yugongd_upstream_failure`` runs
first (``tryfirst``) so that it sees every failure whatever another plugin decides, and
always answers ``None``. Disabling it (``plugins.disable: [metrics]``) leaves the
scrape-time gauges (key states, requests in flight, queue, ledger) and zero counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yugongd._markers import hookimpl

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse

    from yugongd.config import Config
    from yugongd.gateway import Gateway
    from yugongd.model import AttemptFailure, Call, FailureDecision, Outcome
    from yugongd.pool import UpstreamKey


class MetricsPlugin:
    """Counts requests, attempts, failures, tokens, cost and latencies."""

    def __init__(self, gateway: Gateway) -> None:
        # the plugins are made before ``gateway.metrics``: look it up when a hook runs
        self.gateway = gateway

    @hookimpl(trylast=True)
    def yugongd_configure(self, config: Config, gateway: Gateway) -> None:
        gateway.metrics.configure()

    @hookimpl(trylast=True)
    def yugongd_upstream_response(self, call: Call, key: UpstreamKey, response: IResponse) -> None:
        self.gateway.metrics.attempt(key)

    @hookimpl(tryfirst=True)
    def yugongd_upstream_failure(
        self, call: Call, key: UpstreamKey, failure: AttemptFailure
    ) -> FailureDecision | None:
        self.gateway.metrics.failure(key, failure)
        return None

    @hookimpl(trylast=True)
    def yugongd_request_finished(self, call: Call, outcome: Outcome) -> None:
        self.gateway.metrics.request_finished(call, outcome)
