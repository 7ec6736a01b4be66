"""``GET /metrics``: Prometheus text, behind the admin token.

Each :class:`~yugongd.gateway.Gateway` has its own :class:`Metrics` with its own
``CollectorRegistry`` (never prometheus-client's global one: a test process runs many
gateways, and a plugin must not see another gateway's numbers).

Two kinds of numbers:

- *counters and histograms* are fed per request by the default ``metrics`` plugin
  (:mod:`yugongd.builtin.metrics`) through :meth:`Metrics.request_finished`,
  :meth:`Metrics.attempt` and :meth:`Metrics.failure`. The labelled children are bound
  once and kept in dicts, so a request costs a few dict lookups and increments;
- *gauges of the current state* (keys by state, requests in flight, open streams, the
  pool queue, the ledger rows not yet written) are computed when Prometheus scrapes,
  from the gateway itself, so they cost nothing per request.

Label sets stay bounded: ``account`` is the account's name (``none`` before
authentication), ``key`` is the pool key's id, ``model`` is the request's model only
when it is one the pool or the price table names exactly, or one that an upstream
answered successfully (at most :data:`MAX_MODELS` of those); any other model is
``other``, and a request without a model is ``none``. No request id, path or client
address is ever a label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from twisted.web import server

import yugongd
from yugongd.errors import error_body, write_json

if TYPE_CHECKING:
    from collections.abc import Iterator

    from yugongd.gateway import Gateway
    from yugongd.model import AttemptFailure, Call, Outcome
    from yugongd.pool import UpstreamKey

# ``*_created`` series double every counter's output and tell an operator nothing the
# process start time does not; they are a process-wide switch in prometheus-client.
disable_created_metrics()

#: distinct model names learned from successful upstream answers, beyond the configured ones
MAX_MODELS = 256

#: distinct error codes with their own label; the rest are ``other``
MAX_ERROR_CODES = 64

#: seconds; from a cached completion to a long stream
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_BYTE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: yugongd's own time is meant to be a millisecond or two; queueing for a cooling key shows
#: up at the top
ADDED_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

_GLOB = frozenset("*?[")

#: ``yugongd_upstream_failures_total`` reasons (a bounded set)
FAILURE_REASONS = (
    "rate_limited",
    "insufficient_quota",
    "unauthorized",
    "forbidden",
    "server_error",
    "client_error",
    "timeout",
    "connect",
    "reset",
)


def failure_reason(failure: AttemptFailure) -> str:
    """The ``reason`` label of a failed attempt."""
    if failure.kind != "status":
        return failure.kind
    status = failure.status or 0
    if status == 429:
        return "insufficient_quota" if failure.code == "insufficient_quota" else "rate_limited"
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server_error"
    return "client_error"


class _StateCollector:
    """The gauges computed at scrape time from the running gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gw = self.gateway
        info = GaugeMetricFamily("yugongd_build_info", "yugongd's version.", labels=["version"])
        info.add_metric([yugongd.__version__], 1)
        yield info

        keys = list(gw.pool.keys.values())
        counts = {"active": 0, "cooling": 0, "disabled": 0}
        per_key = GaugeMetricFamily(
            "yugongd_key_state",
            "1 for the state each pool key is in now (active, cooling, disabled), else 0.",
            labels=["key", "upstream", "state"],
        )
        inflight = GaugeMetricFamily(
            "yugongd_key_inflight", "Upstream requests in flight per key.", labels=["key"]
        )
        remaining_requests = GaugeMetricFamily(
            "yugongd_key_remaining_requests",
            "Requests left in the key's organisation budget, as learned from the upstream.",
            labels=["key"],
        )
        remaining_tokens = GaugeMetricFamily(
            "yugongd_key_remaining_tokens",
            "Tokens left in the key's organisation budget, as learned from the upstream.",
            labels=["key"],
        )
        for key in keys:
            state = key.state
            counts[state] += 1
            for s in ("active", "cooling", "disabled"):
                per_key.add_metric([key.id, key.upstream, s], 1 if s == state else 0)
            inflight.add_metric([key.id], key.inflight)
            if (n := key.remaining_requests) is not None:
                remaining_requests.add_metric([key.id], n)
            if (n := key.remaining_tokens) is not None:
                remaining_tokens.add_metric([key.id], n)
        by_state = GaugeMetricFamily("yugongd_keys", "Pool keys by state.", labels=["state"])
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        yield per_key
        yield inflight
        yield remaining_requests
        yield remaining_tokens

        proxied = list(gw.inflight)
        yield GaugeMetricFamily(
            "yugongd_requests_in_flight",
            "Client requests being proxied now (waiting for a key, or talking to an upstream).",
            value=len(proxied),
        )
        yield GaugeMetricFamily(
            "yugongd_streams_open",
            "Streamed (stream: true) requests in flight now.",
            value=sum(1 for p in proxied if p.call.stream),
        )
        yield GaugeMetricFamily(
            "yugongd_queue_waiting",
            "Requests waiting in the pool queue for a cooling key.",
            value=len(gw.queue),
        )
        yield GaugeMetricFamily(
            "yugongd_ledger_pending_rows",
            "Ledger rows accepted but not yet written to the state store.",
            value=gw.state.pending(),
        )
        yield GaugeMetricFamily(
            "yugongd_accounts", "Accounts known to the gateway.", value=len(gw.accounts)
        )


class Metrics:
    """The Prometheus registry of one gateway, and the ``/metrics`` resource."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "yugongd_requests",
            "Client requests by final HTTP status, model and account.",
            ["status", "model", "account"],
            registry=r,
        )
        self.errors = Counter(
            "yugongd_errors",
            "Requests that ended with an error code (yugongd's own or the upstream's).",
            ["code"],
            registry=r,
        )
        self.attempts = Counter(
            "yugongd_upstream_attempts",
            "Upstream attempts by pool key (each answered or failed attempt counts once).",
            ["key"],
            registry=r,
        )
        self.failures = Counter(
            "yugongd_upstream_failures",
            "Failed upstream attempts by pool key and reason.",
            ["key", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "yugongd_tokens",
            "Tokens used, as the upstream counted them (or estimated), by account, model and kind.",
            ["account", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "yugongd_cost_usd",
            "Cost in USD of the requests, by account and model.",
            ["account", "model"],
            registry=r,
        )
        self.duration = Histogram(
            "yugongd_request_duration_seconds",
            "Whole request time, from the request line to the response's end.",
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.first_byte = Histogram(
            "yugongd_upstream_first_byte_seconds",
            "Time from sending a request upstream to the response headers of its first "
            "answered attempt.",
            registry=r,
            buckets=FIRST_BYTE_BUCKETS,
        )
        self.added = Histogram(
            "yugongd_added_latency_seconds",
            "yugongd's own time in a request that reached an upstream: the whole time less the "
            "time spent in upstream attempts (includes waiting in the pool queue).",
            registry=r,
            buckets=ADDED_BUCKETS,
        )
        r.register(_StateCollector(gateway))
        # pre-bound children, so that a request does not rebuild label tuples
        self._requests: dict[tuple[int, str, str], Any] = {}
        self._errors: dict[str, Any] = {}
        self._attempts: dict[str, Any] = {}
        self._failures: dict[tuple[str, str], Any] = {}
        self._tokens: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._known_models: set[str] = set()
        self._learned_models = 0
        self.configure()

    def configure(self) -> None:
        """Learn the model names the config spells out (at start and on reload)."""
        from yugongd.usage import DEFAULT_PRICES

        config = self.gateway.config
        names = set(DEFAULT_PRICES)
        names.update(config.prices)
        for up in config.upstreams:
            names.update(up.models)
            for kc in up.keys:
                names.update(kc.models)
        self._known_models.update(n for n in names if not (_GLOB & set(n)))

    # -- feeding, from the ``metrics`` plugin -------------------------------------------

    def model_label(self, model: str | None, learn: bool) -> str:
        if model is None:
            return "none"
        if model in self._known_models:
            return model
        if learn and self._learned_models < MAX_MODELS and len(model) <= 128:
            self._learned_models += 1
            self._known_models.add(model)
            return model
        return "other"

    def request_finished(self, call: Call, outcome: Outcome) -> None:
        status = outcome.status
        account = call.account.name if call.account is not None else "none"
        model = self.model_label(call.model, learn=outcome.attempts > 0 and 0 < status < 400)
        k = (status, model, account)
        child = self._requests.get(k)
        if child is None:
            child = self._requests[k] = self.requests.labels(str(status), model, account)
        child.inc()
        code = outcome.code
        if code is not None:
            err = self._errors.get(code)
            if err is None:
                # upstream error codes are passed through: keep the set bounded
                if len(self._errors) < MAX_ERROR_CODES and len(code) <= 64:
                    err = self._errors[code] = self.errors.labels(code)
                else:
                    err = self.errors.labels("other")
            err.inc()
        self.duration.observe(outcome.latency)
        if outcome.attempts > 0:
            self.added.observe(max(0.0, outcome.latency - outcome.upstream_latency))
            if outcome.upstream_first_byte is not None:
                self.first_byte.observe(outcome.upstream_first_byte)
        usage = outcome.usage
        if usage is not None and (usage.total_tokens or usage.cost_usd):
            tk = (account, model)
            children = self._tokens.get(tk)
            if children is None:
                children = self._tokens[tk] = (
                    self.tokens.labels(account, model, "prompt"),
                    self.tokens.labels(account, model, "completion"),
                    self.cost.labels(account, model),
                )
            prompt, completion, cost = children
            if usage.prompt_tokens:
                prompt.inc(usage.prompt_tokens)
            if usage.completion_tokens:
                completion.inc(usage.completion_tokens)
            if usage.cost_usd:
                cost.inc(usage.cost_usd)

    def attempt(self, key: UpstreamKey) -> None:
        child = self._attempts.get(key.id)
        if child is None:
            child = self._attempts[key.id] = self.attempts.labels(key.id)
        child.inc()

    def failure(self, key: UpstreamKey, failure: AttemptFailure) -> None:
        reason = failure_reason(failure)
        k = (key.id, reason)
        child = self._failures.get(k)
        if child is None:
            child = self._failures[k] = self.failures.labels(key.id, reason)
        child.inc()
        if failure.kind != "status":
            # an attempt without a response never reached yugongd_upstream_response
            self.attempt(key)

    # -- the resource ---------------------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        if self.gateway.admin.refused(request):
            return server.NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"allow", [b"GET, HEAD"])
            write_json(
                request,
                405,
                error_body(405, "method_not_allowed", "Use GET for /metrics."),
            )
            return server.NOT_DONE_YET
        body = generate_latest(self.registry)
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode()])
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        return body
