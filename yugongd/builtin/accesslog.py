"""Default access log (plugin name ``accesslog``): one line per request.

See :mod:`yugongd.accesslog` for what a line holds. ``access_log.enabled: false`` in the
config (read per request, so a reload applies) or ``plugins.disable: [accesslog]`` turns
it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yugongd import accesslog
from yugongd._markers import hookimpl

if TYPE_CHECKING:
    from yugongd.gateway import Gateway
    from yugongd.model import Call, Outcome


class AccessLogPlugin:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @hookimpl(trylast=True)
    def yugongd_request_finished(self, call: Call, outcome: Outcome) -> None:
        settings = self.gateway.config.access_log
        if settings.enabled:
            accesslog.emit(call, outcome, settings.format)
