"""Default accounting (plugin name ``accounting``): one ledger row per request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from yugongd._markers import hookimpl
from yugongd.model import Call, Outcome
from yugongd.state import LedgerRow

if TYPE_CHECKING:
    from yugongd.gateway import Gateway


class AccountingPlugin:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @hookimpl(trylast=True)
    def yugongd_request_finished(self, call: Call, outcome: Outcome) -> None:
        account = call.account
        if account is None:
            return
        usage = outcome.usage
        row = LedgerRow(
            time=self.gateway.clock.seconds(),
            request_id=call.request_id,
            account_id=account.id,
            model=call.model,
            key_id=outcome.key_id,
            status=outcome.status,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost_usd=usage.cost_usd if usage else 0.0,
            estimated=usage.estimated if usage else False,
            latency=outcome.latency,
            attempts=outcome.attempts,
            endpoint=call.endpoint,
        )
        self.gateway.ledger.record(row)
