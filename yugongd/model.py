"""The objects that hooks receive and return.

They are small attrs classes with slots: one :class:`Call` is made per request on the
hot path, so nothing here does work in its constructor.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import TYPE_CHECKING, Any, Literal

from attrs import define, field, frozen

if TYPE_CHECKING:
    from twisted.web.server import Request

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@frozen
class Account:
    """A sub-account: who a client key belongs to and what it may do.

    :param id: stable identifier, used in the ledger.
    :param key_hash: SHA-256 hex digest of the account's key; the key itself is never kept.
    :param models: glob patterns of the models the account may use.
    :param rpm: requests per rolling minute, 0 for unlimited.
    :param tpm: tokens per rolling minute, 0 for unlimited.
    :param credit_usd: spend limit in USD, ``None`` for unlimited.
    :param expires: the moment the account stops working, ``None`` for never.
    :param ip_allow: networks clients must come from; empty for any.
    :param enabled: a disabled account is refused like an unknown key.
    :param source: ``"config"`` (the config file), ``"api"`` (the admin API) or
        ``"anonymous"`` (single-user mode).
    :param config_hash: for a config account, a digest of the config entry it was made
        from; a runtime change (admin ``PATCH``) is kept while the entry is unchanged.
    """

    id: str
    name: str
    key_hash: str = field(repr=False, default="")
    models: tuple[str, ...] = ("*",)
    rpm: int = 0
    tpm: int = 0
    credit_usd: float | None = None
    expires: datetime.datetime | None = None
    ip_allow: tuple[IPNetwork, ...] = ()
    enabled: bool = True
    source: Literal["config", "api", "anonymous"] = "config"
    config_hash: str = ""


@frozen
class Denial:
    """A refusal from ``yugongd_authorize``: the request gets this OpenAI error.

    :param status: HTTP status, e.g. 403 or 429.
    :param code: the OpenAI error ``code`` (see the contract's table).
    :param message: a human-readable message; it must not contain any key.
    :param retry_after: seconds, sent as ``Retry-After`` when given.
    """

    status: int
    code: str
    message: str
    retry_after: float | None = None
    type: str = "invalid_request_error"


@frozen
class Usage:
    """What one request consumed, from the upstream's own numbers where it gave them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False


@frozen
class AttemptFailure:
    """Why one upstream attempt failed.

    :param kind: ``"status"`` (the upstream answered with an error status), ``"connect"``
        (refused, unreachable, connect timeout), ``"reset"`` (the connection broke before the
        response headers), or ``"timeout"`` (no response headers within ``first_byte``).
    :param status: the upstream's HTTP status for ``"status"``.
    :param code: the OpenAI error code from the upstream's error body, if any
        (``"rate_limit_exceeded"``, ``"insufficient_quota"`` …).
    :param retry_after: seconds the upstream asked us to wait (``Retry-After`` or the
        ``x-ratelimit-reset-*`` headers), if it said.
    :param message: a short description for logs and ``last_error``; never contains a key.
    """

    kind: Literal["status", "connect", "reset", "timeout"]
    status: int | None = None
    code: str | None = None
    retry_after: float | None = None
    message: str = ""


@frozen
class FailureDecision:
    """What ``yugongd_upstream_failure`` decides about a failed attempt.

    :param retry: try the request again on another key (if attempts remain).
    :param cooldown: put the key aside for this many seconds.
    :param disable: disable the key, keeping this reason.
    """

    retry: bool
    cooldown: float | None = None
    disable: str | None = None


@frozen
class Outcome:
    """How a request ended, for ``yugongd_request_finished``."""

    status: int
    code: str | None = None
    attempts: int = 0
    key_id: str | None = None
    latency: float = 0.0
    first_byte_latency: float | None = None
    bytes_out: int = 0
    client_gone: bool = False
    #: what the request consumed, when it reached an upstream
    usage: Usage | None = None
    #: seconds spent in upstream attempts (sent to response end), for "added latency"
    upstream_latency: float = 0.0
    #: seconds from sending the first answered attempt to its response headers
    upstream_first_byte: float | None = None


@define(slots=True)
class Call:
    """One client request as it goes through the gateway.

    Hooks receive the same object for the whole life of the request; plugins may keep
    their own per-request data in :attr:`extra`.
    """

    request_id: str
    endpoint: str
    method: str
    client_ip: str
    started: float
    account: Account | None = None
    model: str | None = None
    stream: bool = False
    body: Any = None
    attempt: int = 0
    request: Request | None = field(default=None, repr=False)
    #: ids of the keys already tried for this request
    tried: set[str] = field(factory=set)
    #: expected tokens of this request (prompt estimate + max tokens), for admission
    expected_tokens: int = 0
    #: the current attempt's budget counters (requests, tokens ``Bucket.spent``) right
    #: after it was admitted: what the pool took after it is still in flight upstream
    sent_marks: tuple[float, float] | None = None
    #: response headers a plugin wants added (e.g. the account's x-ratelimit-* headers)
    response_headers: dict[bytes, bytes] = field(factory=dict)
    extra: dict[str, Any] = field(factory=dict)
