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

With ``state: "redis://…"`` the rate windows and the credit are the cluster's: one Lua
script in Redis checks both and, when the request may go, counts it and reserves its
expected cost (:meth:`yugongd.redisstate.RedisState.admit`, the one round trip a request
waits for); the settlement is queued with the ledger rows and never waited for. While
Redis is unreachable, ``cluster.redis_outage`` decides: ``local`` checks this process's
own windows and its last view of the account's spending, ``reject`` answers 503
``state_unavailable``.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from yugongd._markers import hookimpl
from yugongd.limits import AccountLimiter, format_duration
from yugongd.model import Account, Call, Denial, Outcome
from yugongd.pool import models_match
from yugongd.site import is_local_listener

if TYPE_CHECKING:
    from twisted.web.server import Request

    from yugongd.config import Config
    from yugongd.gateway import Gateway
    from yugongd.redisstate import Admission, RedisState

log = Logger()

#: the account of single-user mode (no account exists, loopback listener)
ANONYMOUS = Account(id="anonymous", name="anonymous", source="anonymous")

#: completion tokens reserved against the credit when a request sets no limit
DEFAULT_COMPLETION_TOKENS = 1024

_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")

#: ``call.extra`` keys of this plugin
_TOKENS = "accounts.tokens"
_RESERVED = "accounts.reserved"
#: cluster mode: the account whose spending Redis must be told of at the end
_SETTLE = "accounts.settle"
#: cluster mode: ``(reservation uid or '', token second or None, expected tokens)``
_SHARED = "accounts.shared"


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
        state = gateway.state
        #: the cluster's shared admission (``state: "redis://…"``), else ``None``
        self.shared: RedisState | None = (
            state if getattr(state, "shared_admission", False) else None  # type: ignore[assignment]
        )
        self._uids = itertools.count(1)

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
        if self.shared is not None and not self.gateway.started:
            # the accounts are still being read from Redis: no account is known yet, and
            # that must not look like single-user mode
            return None
        if self.gateway.single_user():
            return ANONYMOUS if is_local_listener(request) else None
        if not token:
            return None
        return self.gateway.accounts.lookup(token)

    @hookimpl(trylast=True)
    def yugongd_authorize(self, call: Call) -> Denial | None | defer.Deferred[Denial | None]:
        account = call.account
        if account is None:
            return Denial(401, "invalid_api_key", "This request has no account.")
        denial = access_denial(account, call, self.gateway.clock.seconds())
        if denial is not None:
            return denial
        if account.source == "anonymous":
            return None
        shared = self.shared
        if shared is None:
            return self._local_admission(call, account)
        call.extra[_SETTLE] = account.id
        if account.rpm <= 0 and account.tpm <= 0 and account.credit_usd is None:
            return None
        if shared.up:
            return self._shared_admission(call, account, shared)
        return self._outage(call, account)

    def _outage(self, call: Call, account: Account) -> Denial | None:
        """Redis is unreachable: ``cluster.redis_outage`` says what to do."""
        if self.gateway.config.cluster.redis_outage == "reject":
            return Denial(
                503,
                "state_unavailable",
                "yugongd cannot reach its shared state (Redis) to check this account's "
                "limits; please try again shortly.",
                type="server_error",
            )
        return self._local_admission(call, account)

    def _shared_admission(
        self, call: Call, account: Account, shared: RedisState
    ) -> defer.Deferred[Denial | None]:
        tokens = call.expected_tokens
        credit = account.credit_usd
        cost = self.expected_cost(call) if credit is not None else 0.0
        uid = f"{shared.boot}:{next(self._uids)}"
        d = shared.admit(account, tokens, credit, cost, uid, self.gateway.clock.seconds())

        def answered(adm: Admission) -> Denial | None:
            if account.rpm > 0 or account.tpm > 0:
                call.response_headers.update(shared_headers(account, adm))
            if adm.verdict == "ok":
                call.extra[_SHARED] = (
                    uid if credit is not None else "",
                    adm.second if account.tpm > 0 else None,
                    tokens,
                )
                return None
            if adm.verdict == "credit":
                return _credit_denial(account)
            return _rate_denial(account, adm.verdict, adm.retry_after)

        def failed(reason: Any) -> Denial | None:
            log.warn(
                "request {request_id}: shared admission failed ({error}); "
                "cluster.redis_outage={choice}",
                request_id=call.request_id,
                error=type(reason.value).__name__,
                choice=self.gateway.config.cluster.redis_outage,
            )
            return self._outage(call, account)

        return d.addCallbacks(answered, failed)

    def _local_admission(self, call: Call, account: Account) -> Denial | None:
        """This process's own rate windows and credit book."""
        limiter = self.limiter
        tokens = call.expected_tokens
        limited = account.rpm > 0 or account.tpm > 0
        if limited:
            check = limiter.check(account, tokens)
            if check.retry_after is not None:
                call.response_headers.update(limiter.headers(account))
                return _rate_denial(account, check.which, check.retry_after)
        if account.credit_usd is not None:
            cost = self.expected_cost(call)
            used = self.gateway.ledger.used_usd(account.id)
            if not self.gateway.accounts.credit.reserve(account.id, used, account.credit_usd, cost):
                if limited:
                    call.response_headers.update(limiter.headers(account))
                return _credit_denial(account)
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
        used = outcome.usage.total_tokens if outcome.usage is not None else 0
        if counted is not None:
            account_id, second, expected = counted
            self.limiter.settle(account_id, second, used - expected)
        settle = call.extra.pop(_SETTLE, None)
        if settle is not None and self.shared is not None:
            uid, token_second, expected = call.extra.pop(_SHARED, None) or ("", None, 0)
            cost = outcome.usage.cost_usd if outcome.usage is not None else 0.0
            delta = used - expected if token_second is not None else 0
            if cost or uid or delta:
                self.shared.settle(settle, uid, cost, token_second, delta)


def _rate_denial(account: Account, which: str, retry_after: float) -> Denial:
    limit = account.rpm if which == "requests" else account.tpm
    return Denial(
        429,
        "rate_limit_exceeded",
        f"Rate limit reached for this account: {limit} {which} per minute. "
        f"Please try again in {retry_after:.1f}s.",
        retry_after=retry_after,
        type=which,
    )


def _credit_denial(account: Account) -> Denial:
    return Denial(
        429,
        "insufficient_quota",
        f"This account's credit of ${account.credit_usd:.2f} is used up.",
        type="insufficient_quota",
    )


def shared_headers(account: Account, adm: Admission) -> dict[bytes, bytes]:
    """The account's ``x-ratelimit-*`` headers from the cluster's windows."""
    out: dict[bytes, bytes] = {}
    for limit, used, reset, name in (
        (account.rpm, adm.requests_used, adm.requests_reset, b"requests"),
        (account.tpm, adm.tokens_used, adm.tokens_reset, b"tokens"),
    ):
        if limit <= 0:
            continue
        out[b"x-ratelimit-limit-" + name] = str(limit).encode()
        out[b"x-ratelimit-remaining-" + name] = str(max(0, limit - used)).encode()
        out[b"x-ratelimit-reset-" + name] = format_duration(reset).encode()
    return out


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
