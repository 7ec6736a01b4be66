"""Default authentication and access control (plugin name ``accounts``)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from yugongd._markers import hookimpl
from yugongd.model import Account, Call, Denial
from yugongd.pool import models_match
from yugongd.site import is_local_listener

if TYPE_CHECKING:
    from twisted.web.server import Request

    from yugongd.gateway import Gateway

#: the account of single-user mode (no account exists, loopback listener)
ANONYMOUS = Account(id="anonymous", name="anonymous", source="anonymous")


class AccountsPlugin:
    """Account keys to accounts; enabled, expiry, client IP and model allowlist checks."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

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
        if not account.enabled:
            return Denial(401, "invalid_api_key", "This account is disabled.")
        if account.expires is not None:
            if self.gateway.clock.seconds() >= account.expires.timestamp():
                when = account.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
                return Denial(401, "invalid_api_key", f"This account expired at {when}.")
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
