"""Default authentication and access control (plugin name ``accounts``).

Checks, in order: the account is enabled and not expired (401 ``invalid_api_key``), the
client IP is allowed (403 ``ip_not_allowed``), the model is in the allowlist (403
``model_not_allowed``), the account's ``rpm``/``tpm`` over the rolling minute (429
``rate_limit_exceeded`` with ``Retry-After``), and its credit (429
``insufficient_quota``). A request that passes is counted in the rate windows and its
expected cost is reserved against the credit; both are settled in
``yugongd_request_finished`` with what the request really used.

The expected cost is the price of the prompt estimate (``call.expected_tokens`` less the
completion limit) plus the completion limit the request asked for (``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``), or :data:`DEFAULT_COMPLETION_TOKENS`
when it asked for none.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from yugongd._markers import hookimpl
from yugongd.limits import AccountLimiter
from yugongd.model import Account, Call, Denial, Outcome
from yugongd.pool import models_match
from yugongd.site import is_local_listener

if TYPE_CHECKING:
    from twisted.web.server import Request

    from yugongd.config import Config
    from yugongd.gateway import Gateway

#: the account of single-user mode (no account exists, loopback listener)
ANONYMOUS = Account(id="anonymous", name="anonymous", source="anonymous")

#: completion tokens reserved against the credit when a request sets no limit
DEFAULT_COMPLETION_TOKENS = 1024

_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")

#: ``call.extra`` keys of this plugin
_TOKENS = "accounts.tokens"
_RESERVED = "accounts.reserved"


def completion_limit(body: object) -> int | None:
    """The completion limit a request body asks for, if any."""
    if isinstance(body, dict):
        for name in _LIMIT_FIELDS:
            v = body.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


class AccountsPlugin:
    """Account keys to accounts; enabled, expiry, client IP, model, rate and credit checks."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.limiter = AccountLimiter(gateway.clock)

    @hookimpl(trylast=True)
    def yugongd_configure(self, config: Config, gateway: Gateway) -> None:
        # config accounts whose runtime override the reload dropped: forget it durably
        accounts = gateway.accounts
        while accounts.dropped:
            account_id = accounts.dropped.pop()
            if account_id not in accounts.by_id:
                self.limiter.forget(account_id)
            gateway.state.delete_account(account_id)

    @hookimpl(trylast=True)
    def yugongd_authenticate(self, request: Request, token: str | None) -> Account | None:
        if self.gateway.single_user():
            return ANONYMOUS if is_local_listener(request) else None
        if not token:
            return None
        return self.gateway.accounts.lookup(token)

    @hookimpl(trylast=True)
    def yugongd_authorize(self, call: Call) -> Denial | None:
        account = call.account
        if account is None:
            return Denial(401, "invalid_api_key", "This request has no account.")
        denial = access_denial(account, call, self.gateway.clock.seconds())
        if denial is not None:
            return denial
        if account.source == "anonymous":
            return None
        limiter = self.limiter
        tokens = call.expected_tokens
        limited = account.rpm > 0 or account.tpm > 0
        if limited:
            check = limiter.check(account, tokens)
            if check.retry_after is not None:
                call.response_headers.update(limiter.headers(account))
                limit = account.rpm if check.which == "requests" else account.tpm
                unit = "requests" if check.which == "requests" else "tokens"
                return Denial(
                    429,
                    "rate_limit_exceeded",
                    f"Rate limit reached for this account: {limit} {unit} per minute. "
                    f"Please try again in {check.retry_after:.1f}s.",
                    retry_after=check.retry_after,
                    type=check.which,
                )
        if account.credit_usd is not None:
            cost = self.expected_cost(call)
            used = self.gateway.ledger.used_usd(account.id)
            if not self.gateway.accounts.credit.reserve(account.id, used, account.credit_usd, cost):
                if limited:
                    call.response_headers.update(limiter.headers(account))
                return Denial(
                    429,
                    "insufficient_quota",
                    f"This account's credit of ${account.credit_usd:.2f} is used up.",
                    type="insufficient_quota",
                )
            call.extra[_RESERVED] = (account.id, cost)
        if limited:
            second = limiter.admit(account, tokens)
            if second is not None:
                call.extra[_TOKENS] = (account.id, second, tokens)
            call.response_headers.update(limiter.headers(account))
        return None

    def expected_cost(self, call: Call) -> float:
        """What the request may cost, reserved against the credit while it runs."""
        limit = completion_limit(call.body)
        if limit is None:
            prompt = call.expected_tokens
            completion = DEFAULT_COMPLETION_TOKENS
        else:
            prompt = max(0, call.expected_tokens - limit)
            completion = limit
        return self.gateway.prices.cost(call.model, prompt, completion)

    @hookimpl(trylast=True)
    def yugongd_request_finished(self, call: Call, outcome: Outcome) -> None:
        """Release the credit reservation and settle the token window: exactly once
        (the entries are popped from ``call.extra``)."""
        reserved = call.extra.pop(_RESERVED, None)
        if reserved is not None:
            self.gateway.accounts.credit.release(*reserved)
        counted = call.extra.pop(_TOKENS, None)
        if counted is not None:
            account_id, second, expected = counted
            used = outcome.usage.total_tokens if outcome.usage is not None else 0
            self.limiter.settle(account_id, second, used - expected)


def access_denial(account: Account, call: Call, now: float) -> Denial | None:
    """The enabled, expiry, client IP and model checks."""
    denial = account_state_denial(account, now)
    if denial is not None:
        return denial
    if account.ip_allow:
        try:
            ip = ipaddress.ip_address(call.client_ip)
        except ValueError:
            ip = None
        if ip is None or not any(ip in net for net in account.ip_allow):
            return Denial(
                403,
                "ip_not_allowed",
                f"Requests from {call.client_ip or 'this address'} are not allowed for this account.",
            )
    if call.model is not None and not models_match(account.models, call.model):
        return Denial(
            403,
            "model_not_allowed",
            f"This account may not use the model {call.model!r}.",
        )
    return None


def account_state_denial(account: Account, now: float) -> Denial | None:
    """401 for a disabled or expired account (also used by the billing endpoints)."""
    if not account.enabled:
        return Denial(401, "invalid_api_key", "This account is disabled.")
    if account.expires is not None and now >= account.expires.timestamp():
        when = account.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        return Denial(401, "invalid_api_key", f"This account expired at {when}.")
    return None
