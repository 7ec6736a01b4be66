"""The default plugins: registered like third-party ones, each under its own name.

``plugins.disable`` takes these names. Every hookimpl here is ``trylast=True`` so that a
third-party implementation of the same hook runs first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from yugongd.builtin.accesslog import AccessLogPlugin
from yugongd.builtin.accounting import AccountingPlugin
from yugongd.builtin.accounts import AccountsPlugin
from yugongd.builtin.balancer import BalancerPlugin
from yugongd.builtin.failover import FailoverPlugin
from yugongd.builtin.metrics import MetricsPlugin

if TYPE_CHECKING:
    from yugongd.gateway import Gateway

DEFAULT_PLUGINS: tuple[tuple[str, Callable[[Gateway], object]], ...] = (
    ("accounts", AccountsPlugin),
    ("pool", BalancerPlugin),
    ("failover", FailoverPlugin),
    ("accounting", AccountingPlugin),
    ("metrics", MetricsPlugin),
    ("accesslog", AccessLogPlugin),
)
