"""yugongd: an OpenAI-compatible API gateway daemon on Twisted.

Plugin authors need only what this module exports: :data:`hookimpl` to mark hook
implementations and :class:`Denial` to refuse a request from ``yugongd_authorize``.
"""

from yugongd._markers import hookimpl, hookspec
from yugongd.model import (
    Account,
    AttemptFailure,
    Call,
    Denial,
    FailureDecision,
    Outcome,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Account",
    "AttemptFailure",
    "Call",
    "Denial",
    "FailureDecision",
    "Outcome",
    "Usage",
    "__version__",
    "hookimpl",
    "hookspec",
]
