"""``GET /metrics``: Prometheus text (admin token required)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web import server

from yugongd.errors import error_body, write_json

if TYPE_CHECKING:
    from yugongd.gateway import Gateway


class Metrics:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def render(self, request: server.Request) -> Any:
        write_json(request, 404, error_body(404, "unknown_url", "Unknown request URL."))
        return server.NOT_DONE_YET
