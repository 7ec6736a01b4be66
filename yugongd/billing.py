"""The billing endpoints chat front-ends call (``/v1/dashboard/billing/…``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web import server

from yugongd.errors import error_body, write_json

if TYPE_CHECKING:
    from yugongd.gateway import Gateway


class BillingAPI:
    """Answers balance queries from the account's own credit and ledger."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def render(self, request: server.Request, path: bytes) -> Any:
        body = error_body(404, "unknown_url", "Unknown billing URL.")
        write_json(request, 404, body)
        return server.NOT_DONE_YET
