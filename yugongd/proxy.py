"""The streaming proxy: one :class:`ProxiedRequest` per client request under ``/v1/``.

The request body was read completely by twisted.web (bounded by ``limits.max_body``, see
:class:`yugongd.site.GatewayRequest`) so that it can be replayed on another key. The
response is streamed: each chunk the upstream sends is written to the client as it
arrives, the upstream socket is registered as the client request's producer so that a
slow client pauses the upstream read, and a client that goes away aborts the upstream
connection at once.

An attempt that fails before anything reached the client (an error status the failure
hook retries, a refused or broken connection, a timeout) moves to another key, with the
body replayed, up to ``failover.attempts``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from yugongd.channel import canonical_name, cork_channel
from yugongd.errors import error_body, sse_error_event, write_error
from yugongd.httpclient import ResponseHeaders, cancel_call, send_now
from yugongd.model import AttemptFailure, Call, FailureDecision, Outcome
from yugongd.plugins import notify
from yugongd.ratelimit import parse_duration, parse_int, parse_retry_after
from yugongd.usage import SSEUsageScanner, make_usage, usage_from_json

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.web.server import Request

    from yugongd.gateway import Gateway
    from yugongd.pool import UpstreamKey

log = Logger()

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: client headers never forwarded: hop-by-hop, framing the agent redoes, and credentials
#: that belong to the client (replaced by the pool key's)
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"authorization",
    b"api-key",
    b"x-api-key",
    b"openai-organization",
    b"openai-project",
    b"accept-encoding",
    b"x-request-id",
}
#: upstream headers never sent back: hop-by-hop, and cookies set for the pool key's session
RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"content-length"}
#: upstream statuses that go to the failure hook (the others pass through)
FAILURE_STATUSES = frozenset({401, 403, 408, 429}) | frozenset(range(500, 600))
ERROR_BODY_LIMIT = 1 << 20
JSON_USAGE_LIMIT = 8 << 20
USAGE_ENDPOINTS = (b"/chat/completions", b"/completions")

_MULTIPART_MODEL = re.compile(
    rb'content-disposition:[^\r\n]*name="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,256})\r\n',
    re.IGNORECASE,
)


class BadRequest(Exception):
    """The client's request cannot be forwarded: answered with ``status`` / ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def inspect_body(
    body: bytes, content_type: bytes, endpoint: bytes
) -> tuple[Any, str | None, bool, bytes, bool]:
    """Read what the gateway needs from a request body, once.

    :return: ``(parsed JSON or None, model, stream, body to forward, strip_usage)``.
        For a streamed chat or completions request that does not ask for usage, the
        body forwarded asks for it (``stream_options.include_usage``) and
        ``strip_usage`` says to remove that extra chunk from the client's stream.
    :raises BadRequest: the body claims or looks like JSON but is not.
    """
    if not body:
        return None, None, False, body, False
    if content_type.startswith(b"multipart/"):
        m = _MULTIPART_MODEL.search(body, 0, 65536) or _MULTIPART_MODEL.search(body)
        model = m.group(1).decode("utf-8", "replace").strip() if m else None
        return None, model, False, body, False
    head = body[:1] if body[:1] not in b" \t\r\n" else body.lstrip()[:1]
    if b"json" not in content_type and head not in (b"{", b"["):
        return None, None, False, body, False
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(
            400, "invalid_json", f"We could not parse the JSON body of your request: {_short(e)}"
        ) from None
    if not isinstance(parsed, dict):
        return parsed, None, False, body, False
    model = parsed.get("model")
    if not isinstance(model, str):
        model = None
    stream = parsed.get("stream") is True
    strip = False
    if stream and endpoint in USAGE_ENDPOINTS:
        options = parsed.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            strip = True
            if "stream_options" not in parsed:
                start = body.index(b"{")
                body = (
                    body[: start + 1]
                    + b'"stream_options":{"include_usage":true},'
                    + body[start + 1 :]
                )
            else:
                merged = dict(options) if isinstance(options, dict) else {}
                merged["include_usage"] = True
                parsed = {**parsed, "stream_options": merged}
                body = json.dumps(parsed).encode("utf-8")
    return parsed, model, stream, body, strip


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text[:200]


def expected_tokens(body: bytes, parsed: Any) -> int:
    """What a request may cost in tokens before it runs: about 4 bytes of prompt a token,
    plus the completion limit it asked for."""
    n = len(body) // 4
    if isinstance(parsed, dict):
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            v = parsed.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                n += v
                break
    return n


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, replayable: each attempt makes a new one."""

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_DONE = Failure(client.ResponseDone())
#: a body that ended normally (read once: twisted.web.client and .http are deprecation
#: proxies, where every attribute read costs ~2 µs)
_COMPLETE = (client.ResponseDone, http.PotentialDataLoss)


class _Collect(Protocol):
    """Reads a (small) error body, up to a limit."""

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.limit:
            self.parts.append(data)
        elif self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.done.callback(b"".join(self.parts))


class _Flow:
    """The upstream body's flow, as the client request sees it (its registered producer).

    While the client's side is full and the upstream is paused on its account, the upstream
    is silent by our doing: the idle timeout does not run then (a slow reader is bounded by
    backpressure, not cut as a stalled upstream)."""

    __slots__ = ("owner", "transport")

    def __init__(self, owner: ProxiedRequest, transport: Any) -> None:
        self.owner = owner
        self.transport = transport

    def pauseProducing(self) -> None:
        self.owner._stop_idle_timer()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()
        self.owner._start_idle_timer()

    def stopProducing(self) -> None:
        # twisted.web stops the producer when the client's connection is lost, before the
        # request's notifyFinish errback: the upstream body ends (at once) by the client's
        # doing, not the upstream's
        self.owner.client_gone = True
        self.transport.stopProducing()


class _Relay(Protocol):
    """Delivers an upstream response body to the proxied request."""

    def __init__(self, owner: ProxiedRequest) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        self.owner._body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.owner._body_data(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.owner._body_done(reason)


class _CorkedRelay(_Relay):
    """A :class:`_Relay` for a response whose writes are held (``ProxiedRequest.corked``)
    until the upstream read that brought them is delivered."""

    def read_done(self) -> None:
        self.owner._uncork()


def _retry_after(headers: Headers, status: int) -> float | None:
    """How long the upstream asked us to wait: ``retry-after-ms`` or ``Retry-After``
    (seconds or an HTTP date); for a 429 without them, the ``x-ratelimit-reset-*`` of
    whichever limit (requests, tokens) is used up."""
    ms = headers.getRawHeaders(b"retry-after-ms")
    if ms:
        value = parse_duration(ms[0])
        if value is not None:
            return value / 1000.0
    values = headers.getRawHeaders(b"retry-after")
    if values:
        value = parse_retry_after(values[0])
        if value is not None:
            return value
    if status != 429:
        return None
    waits = []
    for kind in (b"requests", b"tokens"):
        remaining = headers.getRawHeaders(b"x-ratelimit-remaining-" + kind)
        reset = headers.getRawHeaders(b"x-ratelimit-reset-" + kind)
        if remaining and reset and parse_int(remaining[0]) == 0:
            value = parse_duration(reset[0])
            if value is not None:
                waits.append(value)
    return max(waits) if waits else None


def _error_code(body: bytes) -> tuple[str | None, str]:
    try:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
            message = err.get("message")
            return (code if isinstance(code, str) else None), (
                message[:200] if isinstance(message, str) else ""
            )
    except (ValueError, RecursionError):
        pass
    return None, ""


class ProxiedRequest:
    """Carries one client request through its upstream attempts to the end of its response."""

    def __init__(
        self,
        gateway: Gateway,
        request: Request,
        call: Call,
        body: bytes,
        headers: dict[bytes, list[bytes]],
        path: bytes,
        strip_usage: bool,
        transform: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.call = call
        self.body = body
        self.headers = headers
        self.path = path
        self.strip_usage = strip_usage
        self.transform = transform
        self.buffer_all = False
        self.method = request.method
        self.key: UpstreamKey | None = None
        self.pending: defer.Deferred[IResponse] | None = None
        self.first_byte_timer: IDelayedCall | None = None
        self.idle_timer: IDelayedCall | None = None
        self.last_data_at = 0.0
        self.timed_out = False
        self.idle_timed_out = False
        self.upstream_transport: Any = None
        self.last_failure: AttemptFailure | None = None
        self.last_failure_response: tuple[int, bytes, Headers, bytes] | None = None
        self.scanner: SSEUsageScanner | None = None
        #: a stream's client connection, written to directly once the head is out
        self.direct: Any = None
        #: the client channel holding a JSON response's writes (sent together at its end)
        self.corked: Any = None
        self.json_parts: list[bytes] | None = None
        self.json_size = 0
        self.reached_upstream = False
        self.status = 0
        self.code: str | None = None
        self.bytes_out = 0
        self.first_byte_at: float | None = None
        self.client_gone = False
        self.finished = False
        self.usage_counted: tuple[int, int] | None = None
        #: tokens taken from the current attempt's key budget, settled at the end
        self.taken_tokens = 0
        self.queued = False
        #: when the current attempt was sent, and the time spent in upstream attempts
        self.attempt_started = 0.0
        self.upstream_time = 0.0
        self.upstream_first_byte: float | None = None
        self.queue_deadline = call.started + gateway.config.pool.queue_timeout
        request.notifyFinish().addErrback(self._client_lost)

    # -- attempts -----------------------------------------------------------------------

    def start(self) -> None:
        self.gateway.inflight.add(self)
        if self.gateway.queue:
            # others are already waiting for a key: first come, first served
            self.gateway.queue.add(self)
            return
        self._attempt()

    def ready(self) -> bool:
        """For the queue: whether a key can take this request now."""
        call = self.call
        return bool(self.gateway.pool.candidates(call.model, call.tried, call.expected_tokens))

    def free_at(self) -> float | None:
        call = self.call
        return self.gateway.pool.soonest_free(call.model, call.tried, call.expected_tokens)

    def _attempt(self) -> None:
        try:
            self._next_attempt()
        except Exception:
            # a plugin (key selection, failure decision) raised: answer, account, move on
            self._internal_error(Failure())

    def _next_attempt(self) -> None:
        gw = self.gateway
        call = self.call
        self.queued = False
        if call.attempt >= gw.config.failover.attempts:
            self._give_up()
            return
        candidates = gw.pool.candidates(call.model, call.tried, call.expected_tokens)
        if not candidates:
            self._no_candidates()
            return
        key = gw.pm.hook.yugongd_select_key(call=call, candidates=candidates)
        if key is None:
            key = candidates[0]
        self.key = key
        call.tried.add(key.id)
        call.attempt += 1
        key.inflight += 1
        key.requests += 1
        self.taken_tokens = call.expected_tokens
        now = gw.clock.seconds()
        key.budget.take(self.taken_tokens, now)
        call.sent_marks = (key.budget.requests.spent, key.budget.tokens.spent)
        self.attempt_started = now
        headers = _upstream_headers(self.headers, key)
        url = key.endpoint.base_url.encode("ascii") + self.path
        agent = gw.agent_for(key.endpoint)
        producer = BytesProducer(self.body) if self.body else None
        self.timed_out = False
        d = agent.request(self.method, url, headers, producer)
        self.pending = d
        self.first_byte_timer = gw.reactor.callLater(
            key.endpoint.timeouts.first_byte, self._first_byte_timeout, d
        )
        d.addCallbacks(self._on_response, self._on_attempt_error, errbackArgs=(key,))
        d.addErrback(self._internal_error)

    def _first_byte_timeout(self, d: defer.Deferred[IResponse]) -> None:
        self.first_byte_timer = None
        self.timed_out = True
        d.cancel()

    def _cancel_first_byte_timer(self) -> None:
        cancel_call(self.first_byte_timer)
        self.first_byte_timer = None

    def _on_attempt_error(self, reason: Failure, key: UpstreamKey) -> None:
        self.pending = None
        self.upstream_time += self.gateway.clock.seconds() - self.attempt_started
        self._cancel_first_byte_timer()
        key.inflight -= 1
        # the upstream never counted this attempt: give its budget back
        now = self.gateway.clock.seconds()
        key.budget.requests.give_back(1, now)
        key.budget.tokens.give_back(self.taken_tokens, now)
        self.taken_tokens = 0
        if self.client_gone:
            self._complete()
            return
        if self.timed_out:
            af = AttemptFailure(
                "timeout",
                message=f"no response within {key.endpoint.timeouts.first_byte:g}s",
            )
        elif reason.check(
            error.ConnectError, error.DNSLookupError, error.TimeoutError, defer.CancelledError
        ):
            af = AttemptFailure("connect", message=f"connect failed: {_describe(reason)}")
        else:
            af = AttemptFailure("reset", message=f"connection failed: {_describe(reason)}")
        self.last_failure_response = None
        self._failed(key, af)

    def _on_response(self, response: IResponse) -> None:
        self.pending = None
        if self.upstream_first_byte is None:
            self.upstream_first_byte = self.gateway.clock.seconds() - self.attempt_started
        self._cancel_first_byte_timer()
        key = self.key
        assert key is not None
        self.reached_upstream = True
        if self.client_gone:
            response.deliverBody(_Collect(0))
            key.inflight -= 1
            self._complete()
            return
        notify(
            self.gateway.pm.hook.yugongd_upstream_response,
            call=self.call,
            key=key,
            response=response,
        )
        if response.code in FAILURE_STATUSES:
            collector = _Collect(ERROR_BODY_LIMIT)
            response.deliverBody(collector)
            collector.done.addCallback(self._on_error_body, key, response)
            collector.done.addErrback(self._internal_error)
            return
        self._relay(response)

    def _on_error_body(self, body: bytes, key: UpstreamKey, response: IResponse) -> None:
        key.inflight -= 1
        self.upstream_time += self.gateway.clock.seconds() - self.attempt_started
        key.budget.tokens.give_back(self.taken_tokens, self.gateway.clock.seconds())
        self.taken_tokens = 0
        if self.client_gone:
            self._complete()
            return
        secret = key.auth_header[len(b"Bearer ") :]
        if secret and secret in body:
            # some upstreams echo the key they refuse: never log it, keep it, or pass it on
            body = body.replace(secret, key.hint.encode("utf-8"))
        code, message = _error_code(body)
        af = AttemptFailure(
            "status",
            status=response.code,
            code=code,
            retry_after=_retry_after(response.headers, response.code),
            message=f"HTTP {response.code}"
            + (f" {code}" if code else "")
            + (f": {message}" if message else ""),
        )
        self.last_failure_response = (response.code, response.phrase, response.headers, body)
        self._failed(key, af)

    def _failed(self, key: UpstreamKey, af: AttemptFailure) -> None:
        """Apply the failure hook's decision, then retry or answer."""
        decision = self._judge(key, af)
        if decision is not None and decision.retry:
            self._attempt()
        else:
            self._give_up()

    def _judge(self, key: UpstreamKey, af: AttemptFailure) -> FailureDecision | None:
        """Ask the failure hook what ``af`` means and apply it to the key."""
        gw = self.gateway
        key.failures += 1
        self.last_failure = af
        decision: FailureDecision | None = gw.pm.hook.yugongd_upstream_failure(
            call=self.call, key=key, failure=af
        )
        if decision is not None:
            if decision.disable:
                # quota and repeated failures may heal: the prober re-tests those keys;
                # a revoked key (401/403) waits for the admin
                probe = (
                    af.kind != "status"
                    or af.status is None
                    or af.status >= 500
                    or (af.code == "insufficient_quota")
                )
                gw.pool.disable(key, decision.disable, probe=probe)
            elif decision.cooldown:
                gw.pool.cool_down(key, decision.cooldown, af.message)
        log.info(
            "request {request_id}: attempt {attempt} on key {key_id} failed: {problem}",
            request_id=self.call.request_id,
            attempt=self.call.attempt,
            key_id=key.id,
            problem=af.message,
        )
        return decision

    def _no_candidates(self) -> None:
        """No key may take the next attempt: wait for one (bounded), or answer."""
        gw = self.gateway
        call = self.call
        if self.last_failure is None and not any(k.enabled for k in gw.pool.serving(call.model)):
            what = f"model {call.model!r}" if call.model else "this request"
            self._reject(503, "no_upstream_key", f"No enabled upstream key serves {what}.")
            return
        soonest = self.free_at()
        if soonest is not None and soonest <= self.queue_deadline and gw.queue.add(self):
            return
        self.expire(soonest)

    def expire(self, soonest: float | None) -> None:
        """Waiting any longer would pass ``pool.queue_timeout``: answer now."""
        if self.last_failure is not None:
            self._give_up()
            return
        gw = self.gateway
        if soonest is None:
            wait = gw.config.pool.cooldown
        else:
            wait = max(0.0, soonest - gw.clock.seconds())
        self._reject(
            429,
            "pool_exhausted",
            "Every upstream key that serves this model is cooling down or at its rate "
            "limit; try again later.",
            retry_after=wait,
        )

    def _give_up(self) -> None:
        """Every attempt failed: answer with what the last one got."""
        af = self.last_failure
        if af is not None and af.kind == "status" and self.last_failure_response is not None:
            status, phrase, headers, body = self.last_failure_response
            request = self.request
            request.setResponseCode(status, phrase)
            self._copy_headers(headers, keep_length=False)
            request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
            self.status = status
            self.code = af.code
            self._write(body)
            self._finish_response()
            return
        if af is not None and af.kind == "timeout":
            self._reject(
                504, "upstream_timeout", f"The upstream did not answer in time ({af.message})."
            )
        else:
            detail = af.message if af is not None else "no attempt was made"
            self._reject(502, "upstream_unavailable", f"Could not reach the upstream: {detail}.")

    def _reject(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.code = code
        if not self.client_gone:
            write_error(self.request, status, code, message, retry_after=retry_after)
        self._complete()

    # -- relaying the response ----------------------------------------------------------

    def _copy_headers(self, headers: Headers, keep_length: bool) -> None:
        out = self.request.responseHeaders
        connection = headers.getRawHeaders(b"connection") or []
        extra_drop = {t.strip().lower() for v in connection for t in v.split(b",")}
        # what our upstream client parsed (llhttp: token names, no CR or LF in a value) goes
        # in as it is, under twisted.web's canonical name; another agent's headers go
        # through setRawHeaders' checks
        raw = out._rawHeaders if type(headers) is ResponseHeaders else None
        for name, values in headers.getAllRawHeaders():
            lname = name.lower()
            if lname in RESPONSE_DROP or lname in extra_drop:
                if not (keep_length and lname == b"content-length"):
                    continue
            if raw is not None:
                raw[canonical_name(lname)] = list(values)
            else:
                out.setRawHeaders(name, values)
        out.setRawHeaders(b"x-request-id", [self.call.request_id.encode()])
        for name, value in self.call.response_headers.items():
            out.setRawHeaders(name, [value])

    def _relay(self, response: IResponse) -> None:
        request = self.request
        self.status = response.code
        request.setResponseCode(response.code, response.phrase)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.startswith(b"text/event-stream"):
            self.scanner = SSEUsageScanner(self.strip_usage)
        elif b"json" in ctype:
            if response.code < 300:
                self.json_parts = []
                self.buffer_all = self.transform is not None
            # what one upstream read brings (usually the whole answer) goes out in one send:
            # held from here until the read is done (_Relay.read_done) or the body ends
            self.corked = cork_channel(request)
        rewrites = (self.scanner is not None and self.strip_usage) or self.buffer_all
        self._copy_headers(response.headers, keep_length=not rewrites)
        response.deliverBody(_CorkedRelay(self) if self.corked is not None else _Relay(self))

    def _body_started(self, transport: Any) -> None:
        self.upstream_transport = transport
        self.request.registerProducer(_Flow(self, transport), True)
        self._start_idle_timer()

    def _start_idle_timer(self) -> None:
        idle = self.key.endpoint.timeouts.idle if self.key else 0
        if idle and self.idle_timer is None and self.upstream_transport is not None:
            self.last_data_at = self.gateway.clock.seconds()
            self.idle_timer = self.gateway.reactor.callLater(idle, self._idle_timeout)

    def _stop_idle_timer(self) -> None:
        cancel_call(self.idle_timer)
        self.idle_timer = None

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        # bytes since the timer was set move its deadline (noted per read as a time, which
        # costs less than rescheduling the timer for every relayed event)
        idle = self.key.endpoint.timeouts.idle if self.key else 0
        due = self.last_data_at + idle - self.gateway.clock.seconds()
        if due > 0 and self.upstream_transport is not None:
            self.idle_timer = self.gateway.reactor.callLater(due, self._idle_timeout)
            return
        self.idle_timed_out = True
        if self.upstream_transport is not None:
            self.upstream_transport.stopProducing()

    def _body_data(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.last_data_at = self.gateway.clock.seconds()
        if self.scanner is not None:
            data = self.scanner.feed(data)
        elif self.json_parts is not None:
            self.json_size += len(data)
            if self.buffer_all:
                self.json_parts.append(data)
                return
            if self.json_size <= JSON_USAGE_LIMIT:
                self.json_parts.append(data)
            else:
                self.json_parts = None
        if data and not self.client_gone:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = self.gateway.clock.seconds()
        self.bytes_out += len(data)
        direct = self.direct
        if direct is not None:
            # an event of a stream: the chunk framing Request.write would add, sent now
            self.request.sentLength += len(data)
            send_now(direct, b"%x\r\n%b\r\n" % (len(data), data))
            return
        request = self.request
        request.write(data)
        if self.scanner is not None and request.chunked and not request.finished:
            self.direct = request.channel.transport

    def _uncork(self) -> None:
        channel, self.corked = self.corked, None
        if channel is not None:
            channel.uncork()

    def _body_done(self, reason: Failure) -> None:
        self.upstream_time += self.gateway.clock.seconds() - self.attempt_started
        self._stop_idle_timer()
        self.upstream_transport = None
        if self.key is not None:
            self.key.inflight -= 1
        if self.scanner is not None:
            tail = self.scanner.finish()
            self.usage_counted = self.scanner.usage
        else:
            tail = b""
            if self.json_parts is not None:
                whole = b"".join(self.json_parts)
                self.json_parts = None
                if self.buffer_all and self.transform is not None:
                    tail = self.transform(whole)
                    self.request.responseHeaders.setRawHeaders(
                        b"content-length", [str(len(tail)).encode()]
                    )
                else:
                    self.usage_counted = usage_from_json(whole)
        if self.client_gone:
            self._complete()
            return
        self.request.unregisterProducer()
        complete = isinstance(reason.value, _COMPLETE)  # (Failure.check formats class names)
        if tail:
            self._write(tail)
        if complete:
            self._finish_response()
            return
        # The upstream broke off after the response started: say so, never cut silently.
        what = "stopped sending (idle timeout)" if self.idle_timed_out else "broke off the response"
        message = f"The upstream {what} after it had started."
        self.code = "upstream_timeout" if self.idle_timed_out else "upstream_unavailable"
        if self.key is not None:
            # too late to fail over, but the key is as suspect as one that never answered:
            # the failure hook's decision (a short cooldown, by default) applies to it
            self._judge(
                self.key,
                AttemptFailure(
                    "timeout" if self.idle_timed_out else "reset",
                    message=f"upstream {what} after the first byte",
                ),
            )
        if self.scanner is not None:
            self._write(sse_error_event(self.code, message))
            self._finish_response()
        else:
            # Without a chunk terminator or the full Content-Length, the client sees the cut.
            self.finished = True
            self.request.loseConnection()
            self._complete()

    def _finish_response(self) -> None:
        if not self.finished and not self.client_gone:
            self.finished = True
            self.request.finish()
        self._complete()  # (which uncorks first)

    # -- the client side ----------------------------------------------------------------

    def _client_lost(self, reason: Failure) -> None:
        if self.finished:
            return
        self.client_gone = True
        if self.queued:
            self.gateway.queue.remove(self)
            self._complete()
            return
        if self.pending is not None:
            self.pending.cancel()
        if self.upstream_transport is not None:
            self.upstream_transport.stopProducing()

    def _internal_error(self, reason: Failure) -> None:
        log.failure("request {request_id}: internal error", reason, request_id=self.call.request_id)
        if not self.finished and not self.client_gone:
            if self.request.startedWriting:
                self.finished = True
                self.request.loseConnection()
            else:
                self.status = 500
                self.code = "internal_error"
                write_error(self.request, 500, "internal_error", "yugongd hit an internal error.")
                self.finished = True
        self._complete()

    # -- the end ------------------------------------------------------------------------

    def _complete(self) -> None:
        """Account for the request, exactly once."""
        self._uncork()
        gw = self.gateway
        if self in gw.inflight:
            gw.inflight.discard(self)
        else:
            return
        self.finished = True
        call = self.call
        now = gw.clock.seconds()
        usage = None
        if self.queued:
            gw.queue.remove(self)
        if self.reached_upstream:
            if self.status and self.status < 400:
                counted = self.usage_counted
                if counted is None and self.scanner is None:
                    counted = (0, 0)
                # the stream's text is counted only when the estimate is needed
                estimate = (0, 0)
                if counted is None and self.scanner is not None:
                    estimate = (len(self.body) // 4, self.scanner.text_chars // 4)
                usage = make_usage(gw.prices, call.model, counted, estimate)
            else:
                usage = make_usage(gw.prices, None, (0, 0), (0, 0))
            if self.key is not None and self.taken_tokens:
                # settle the admission estimate with what the request really used
                self.key.budget.tokens.give_back(self.taken_tokens - usage.total_tokens, now)
                self.taken_tokens = 0
            notify(gw.pm.hook.yugongd_usage, call=call, key=self.key, usage=usage)
        outcome = Outcome(
            status=self.status or (499 if self.client_gone else 0),
            code=self.code,
            attempts=call.attempt,
            key_id=self.key.id if self.key else None,
            latency=now - call.started,
            first_byte_latency=(self.first_byte_at - call.started) if self.first_byte_at else None,
            upstream_latency=self.upstream_time,
            upstream_first_byte=self.upstream_first_byte,
            bytes_out=self.bytes_out,
            client_gone=self.client_gone,
            usage=usage,
        )
        notify(gw.pm.hook.yugongd_request_finished, call=call, outcome=outcome)


def _upstream_headers(forwarded: dict[bytes, list[bytes]], key: UpstreamKey) -> Headers:
    """The headers of an attempt: ``forwarded`` (the client's, filtered, names in twisted's
    canonical case and values it has checked) and the key's credentials.

    Made without ``Headers``' per-header re-encoding and checks (a dozen calls a request):
    every value here was already checked when the client's request was read (llhttp, and
    yugongd/channel.py's checks) or built by yugongd.
    """
    headers = Headers()
    raw = dict(forwarded)
    raw[b"Authorization"] = [key.auth_header]
    if key.org_header is not None:
        raw[b"Openai-Organization"] = [key.org_header]
    headers._rawHeaders = raw
    return headers


class PoolQueue:
    """Requests waiting for a key (all serving keys cooling down or at their limits).

    First come, first served: whenever the soonest key is due, the waiters are offered
    keys in arrival order; each waits at most until its ``queue_deadline``
    (``pool.queue_timeout`` after it arrived) and is then answered 429 ``pool_exhausted``.
    A waiter whose client leaves is dropped at once.
    """

    def __init__(self, reactor: Any, limit: int = 10000) -> None:
        self.reactor = reactor
        self.limit = limit
        self.waiters: dict[ProxiedRequest, None] = {}
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self.waiters)

    def add(self, waiter: ProxiedRequest) -> bool:
        """Queue ``waiter``; false when the queue is full."""
        if len(self.waiters) >= self.limit:
            return False
        waiter.queued = True
        self.waiters[waiter] = None
        at = waiter.free_at()
        now = self.reactor.seconds()
        self._schedule(0.0 if at is None else max(0.0, min(at, waiter.queue_deadline) - now))
        return True

    def remove(self, waiter: ProxiedRequest) -> None:
        waiter.queued = False
        self.waiters.pop(waiter, None)

    def _schedule(self, delay: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self.reactor.seconds() + delay:
                return
            timer.cancel()
        self._timer = self.reactor.callLater(delay, self.pump)

    def pump(self) -> None:
        """Offer keys to the waiters in arrival order."""
        self._timer = None
        now = self.reactor.seconds()
        next_at: float | None = None
        for waiter in list(self.waiters):
            if waiter not in self.waiters:
                continue
            if waiter.ready():
                self.remove(waiter)
                waiter._attempt()
                continue
            at = waiter.free_at()
            if at is None or at > waiter.queue_deadline or now >= waiter.queue_deadline:
                self.remove(waiter)
                waiter.expire(at)
                continue
            next_at = at if next_at is None else min(next_at, at)
        if next_at is not None and self.waiters:
            self._schedule(max(0.0, next_at - now))


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, client.ResponseNeverReceived | client.RequestTransmissionFailed):
        inner = value.reasons[0].value if value.reasons else None
        return f"{type(value).__name__} ({type(inner).__name__ if inner else '?'})"
    return type(value).__name__


__all__ = ["BadRequest", "ProxiedRequest", "error_body", "expected_tokens", "inspect_body"]
