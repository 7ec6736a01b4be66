"""Every hook of the request lifecycle.

Implement them with :data:`yugongd.hookimpl`. The default behaviour is itself a set of
plugins (see :mod:`yugongd.builtin`) registered with ``trylast=True``, so a third-party
implementation runs before the default and, for ``firstresult`` hooks, wins whenever it
returns something other than ``None``.

Hooks run on the reactor thread and must not block. Only ``yugongd_authorize`` may return a
Deferred; every other hook answers synchronously.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yugongd._markers import hookspec

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.web.iweb import IResponse
    from twisted.web.server import Request

    from yugongd.config import Config
    from yugongd.gateway import Gateway
    from yugongd.model import (
        Account,
        AttemptFailure,
        Call,
        Denial,
        FailureDecision,
        Outcome,
        Usage,
    )
    from yugongd.pool import UpstreamKey


@hookspec
def yugongd_configure(config: Config, gateway: Gateway) -> None:
    """Called once at start, and again after every reload, with the parsed config.

    :param config: the new :class:`yugongd.config.Config`.
    :param gateway: the running gateway (its ``pool``, ``accounts``, ``ledger``, ``clock``),
        for plugins that need more than the per-request ``call``.
    """


@hookspec(firstresult=True)
def yugongd_authenticate(request: Request, token: str | None) -> Account | None:
    """Find the account a request belongs to.

    Called for every client request. The first non-``None`` answer wins; when every
    implementation answers ``None`` the request is refused with 401 ``invalid_api_key``.

    :param request: the client's ``twisted.web`` request (headers, client address).
    :param token: the bearer token of the ``Authorization`` header, or ``None``.
    :return: the :class:`yugongd.Account`, or ``None`` for "not mine / unknown".
    """


@hookspec
def yugongd_authorize(call: Call) -> Denial | None | Deferred[Denial | None]:
    """Decide whether an authenticated request may proceed.

    Every implementation runs; any :class:`yugongd.Denial` rejects the request (the first
    one in call order is sent). This is where model allowlists, client IP ranges, rate
    limits and credit are checked. May return a Deferred that fires with a Denial or None.

    :param call: the request; ``call.account`` is set.
    """


@hookspec(firstresult=True)
def yugongd_select_key(call: Call, candidates: list[UpstreamKey]) -> UpstreamKey | None:
    """Choose the upstream key for the next attempt.

    Called before each attempt with the keys that may serve it (enabled, not cooling
    down, serving ``call.model``, not yet tried for this request). The first non-``None``
    answer wins; it must be one of ``candidates``. When every implementation answers
    ``None`` the first candidate is used.
    """


@hookspec
def yugongd_upstream_response(call: Call, key: UpstreamKey, response: IResponse) -> None:
    """Called with every upstream response's status and headers, before its body.

    The default pool learns the key's remaining requests and tokens here. Every
    implementation runs.
    """


@hookspec(firstresult=True)
def yugongd_upstream_failure(
    call: Call, key: UpstreamKey, failure: AttemptFailure
) -> FailureDecision | None:
    """Decide what a failed attempt means for the key and the request.

    Called when an attempt fails before any byte reached the client: an error status
    from the upstream (429, 401, 403, 5xx …), a refused or broken connection, or a
    timeout. The first non-``None`` :class:`yugongd.FailureDecision` wins and the gateway
    applies it (cool the key down, disable it, try another key). ``None`` from every
    implementation means: no retry, no change to the key.
    """


@hookspec
def yugongd_usage(call: Call, key: UpstreamKey | None, usage: Usage) -> None:
    """Called once per request that reached an upstream, with what it consumed.

    ``usage.cost_usd`` is already priced. ``usage.estimated`` is true when the upstream
    did not report usage (a stream cut short) and the tokens were estimated. ``key`` is
    the key of the last attempt. Every implementation runs; the default writes the ledger.
    """


@hookspec
def yugongd_request_finished(call: Call, outcome: Outcome) -> None:
    """Called once per client request, whatever happened to it, after the response ended."""


#: names of every hook, for docs and tests
HOOK_NAMES: tuple[str, ...] = tuple(name for name in dict(globals()) if name.startswith("yugongd_"))
