"""The billing endpoints chat front-ends call (``/v1/dashboard/billing/…``, also without
``/v1``), answered from the account's own credit and ledger in OpenAI's legacy shapes.

- ``subscription``: the account's credit as ``hard_limit_usd`` (and the soft and system
  limits); an account with unlimited credit reports :data:`UNLIMITED_USD`, as one-api
  does. ``access_until`` is the expiry in unix seconds, 0 for none.
- ``usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD``: ``total_usage`` in US cents and
  one ``daily_costs`` entry per UTC day that has usage, with a line item per model.
  ``end_date`` is exclusive, as OpenAI's was; without ``start_date`` the period starts on
  the first day of the current month, without ``end_date`` it ends after today.

The request is authenticated like a proxied one (the ``yugongd_authenticate`` hook); a
disabled or expired account gets 401 like everywhere else.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from yugongd.errors import write_error, write_json

if TYPE_CHECKING:
    from yugongd.gateway import Gateway
    from yugongd.model import Account
    from yugongd.state import UsageLine

log = Logger()

#: what ``hard_limit_usd`` says for an account without a credit limit
UNLIMITED_USD = 100000000.0

DAY = 86400


def _parse_date(text: str | None, name: str) -> datetime.date | None:
    if text is None or not text.strip():
        return None
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"'{name}' must be a date like 2025-01-31, got {text[:40]!r}.") from None


def _day_start(day: datetime.date) -> float:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()


def subscription(account: Account) -> dict[str, Any]:
    """``GET /dashboard/billing/subscription`` for ``account``."""
    credit = UNLIMITED_USD if account.credit_usd is None else account.credit_usd
    return {
        "object": "billing_subscription",
        "has_payment_method": True,
        "hard_limit_usd": credit,
        "soft_limit_usd": credit,
        "system_hard_limit_usd": credit,
        "access_until": int(account.expires.timestamp()) if account.expires else 0,
    }


def usage_document(lines: list[UsageLine]) -> dict[str, Any]:
    """``GET /dashboard/billing/usage`` from the account's ledger lines grouped by day."""
    days: dict[int, list[dict[str, Any]]] = {}
    total = 0.0
    for line in lines:
        cents = line.cost_usd * 100
        total += cents
        day = line.day or 0
        days.setdefault(day, []).append({"name": line.model or "", "cost": cents})
    return {
        "object": "list",
        "total_usage": total,
        "daily_costs": [
            {"timestamp": day, "line_items": sorted(items, key=lambda i: i["name"])}
            for day, items in sorted(days.items())
        ],
    }


class BillingAPI:
    """Answers balance queries from the account's own credit and ledger."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def render(self, request: server.Request, path: bytes) -> Any:
        from yugongd.builtin.accounts import account_state_denial
        from yugongd.site import bearer_token

        gw = self.gateway
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, 405, "method_not_allowed", "Use GET for the billing endpoints.")
            return server.NOT_DONE_YET
        if path not in (b"/dashboard/billing/subscription", b"/dashboard/billing/usage"):
            write_error(request, 404, "unknown_url", "Unknown billing URL.")
            return server.NOT_DONE_YET
        account = gw.pm.hook.yugongd_authenticate(request=request, token=bearer_token(request))
        if account is None:
            write_error(request, 401, "invalid_api_key", gw.unauthenticated_message(request))
            return server.NOT_DONE_YET
        denial = account_state_denial(account, gw.clock.seconds())
        if denial is not None:
            write_error(request, denial.status, denial.code, denial.message)
            return server.NOT_DONE_YET
        if path.endswith(b"/subscription"):
            write_json(request, 200, _dumps(subscription(account)))
            return server.NOT_DONE_YET
        args = request.args or {}
        try:
            start = _parse_date(_arg(args, b"start_date"), "start_date")
            end = _parse_date(_arg(args, b"end_date"), "end_date")
        except ValueError as e:
            write_error(request, 400, "invalid_date", str(e))
            return server.NOT_DONE_YET
        today = datetime.datetime.fromtimestamp(gw.clock.seconds(), datetime.timezone.utc).date()
        if start is None:
            start = today.replace(day=1)
        since = _day_start(start)
        until = _day_start(end) if end is not None else _day_start(today) + DAY

        def answer(lines: list[UsageLine]) -> None:
            if not (getattr(request, "_disconnected", False) or request.finished):
                write_json(request, 200, _dumps(usage_document(lines)))

        def failed(reason: Failure) -> None:
            log.failure("billing usage query failed", reason)
            if not (getattr(request, "_disconnected", False) or request.finished):
                write_error(request, 500, "internal_error", "The usage query failed.")

        d = gw.state.summarize(account.id, since, until, by_day=True)
        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


def _arg(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _dumps(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode("utf-8")
