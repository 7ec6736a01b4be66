"""The HTTP front: the twisted.web ``Site``, its ``Request`` and the one root resource.

The root resource is a leaf that dispatches on the path itself (``/v1/…`` to the proxy,
``/admin/…``, ``/healthz``, the billing endpoints): no resource tree is walked per
request.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from yugongd.channel import GatewayChannel
from yugongd.errors import write_error
from yugongd.model import Call, Denial, Outcome
from yugongd.plugins import notify
from yugongd.pool import models_match
from yugongd.proxy import REQUEST_DROP, BadRequest, ProxiedRequest, expected_tokens, inspect_body

if TYPE_CHECKING:
    from yugongd.gateway import Gateway

log = Logger()

_REQUEST_ID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class _Discard:
    """Where an over-limit request body goes: nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


_date: list[Any] = [None, b""]


def http_date() -> bytes:
    """``http.datetimeToString()`` for now, made once a second."""
    second = int(time.time())
    if _date[0] != second:
        _date[1] = http.datetimeToString(second)
        _date[0] = second
    return _date[1]


class GatewayRequest(server.Request):
    """A request whose body is refused past ``limits.max_body`` while it is read.

    twisted.web buffers the body before ``render`` (in memory, or a temporary file above
    100 kB); this stops buffering at the limit, both for a declared ``Content-Length``
    and for a chunked body, and lets ``render`` answer 413.
    """

    too_large = False
    _body_size = 0

    def process(self) -> None:
        """twisted.web's ``process`` without the per-request work the gateway does not use:
        no resource-tree walk (the root resource is a leaf that dispatches on the path
        itself), no encoder lookup, and the ``Date`` header made once a second."""
        self.site = site = self.channel.site  # type: ignore[attr-defined]
        headers = self.responseHeaders._rawHeaders
        headers[b"Server"] = [server.version]
        headers[b"Date"] = [http_date()]
        self.prepath = []
        self.postpath = []
        self.sitepath: list[bytes] = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def _max_body(self) -> int:
        return int(self.channel.site.max_body)  # type: ignore[attr-defined]

    def gotLength(self, length: int | None) -> None:
        limit = self._max_body()
        if length is not None and length > limit:
            self.too_large = True
            self.content = _Discard()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._body_size += len(data)
        if self._body_size > self._max_body():
            self.too_large = True
            if self.content is not None:
                self.content.close()
            self.content = _Discard()
            return
        if self.content is not None:
            self.content.write(data)


class GatewaySite(server.Site):
    """The ``Site`` of every listener; twisted.web's own access log is off (see the gateway's).

    It keeps its open connections, most recently busy last, to bound them by
    ``limits.max_connections``; ``limits.idle_timeout`` closes a connection that sends
    nothing for that long while no request is in progress.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(self, gateway: Gateway, timeout: float | None = None) -> None:
        # multipart uploads (audio) are forwarded as they are, never parsed into args
        super().__init__(
            GatewayResource(gateway),
            timeout=timeout if timeout is not None else gateway.config.limits.idle_timeout,
            reactor=gateway.reactor,
            parsePOSTFormSubmission=False,
        )
        self.gateway = gateway
        #: open connections, in the order they were last busy (dict as an ordered set)
        self.connections: dict[GatewayChannel, None] = {}

    @property
    def max_body(self) -> int:
        return self.gateway.config.limits.max_body

    def buildProtocol(self, addr: Any) -> Any:
        limits = self.gateway.config.limits
        if len(self.connections) >= limits.max_connections:
            idle = next((c for c in self.connections if c.idle()), None)
            if idle is None:
                log.warn(
                    "{n} client connections open (limits.max_connections), none idle: "
                    "refusing a new one",
                    n=len(self.connections),
                )
                return None
            # make room: the keep-alive connection idle the longest goes
            del self.connections[idle]
            if idle.transport is not None:
                idle.transport.loseConnection()
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.timeOut = limits.idle_timeout
        return protocol

    def connection_opened(self, channel: GatewayChannel) -> None:
        self.connections[channel] = None

    def connection_busy(self, channel: GatewayChannel) -> None:
        if channel in self.connections:
            del self.connections[channel]
            self.connections[channel] = None

    def connection_closed(self, channel: GatewayChannel) -> None:
        self.connections.pop(channel, None)

    def log(self, request: Any) -> None:
        pass


def is_local_listener(request: server.Request) -> bool:
    """Whether the request came in on a loopback or unix-socket listener."""
    host = request.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        h = host.host
        return h.startswith("127.") or h == "::1" or h.startswith("::ffff:127.")
    return True


def bearer_token(request: server.Request) -> str | None:
    raw = request.requestHeaders.getRawHeaders(b"authorization")
    if raw:
        value = raw[0]
        if value[:7].lower() == b"bearer ":
            return value[7:].strip().decode("utf-8", "replace") or None
        return None
    raw = request.requestHeaders.getRawHeaders(b"api-key")
    if raw:
        return raw[0].strip().decode("utf-8", "replace") or None
    return None


def _bad_path(path: bytes) -> bool:
    """A path with ``.`` or ``..`` segments (raw or percent-encoded) or encoded slashes."""
    if b"%" in path:
        lowered = path.lower()
        if b"%2f" in lowered or b"%5c" in lowered:
            return True
        path = unquote_to_bytes(path)
    if b"/." not in path and b"\\" not in path:
        return False
    return any(seg in (b".", b"..") for seg in path.replace(b"\\", b"/").split(b"/"))


class GatewayResource(resource.Resource):
    """Every path of the gateway."""

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def render(self, request: server.Request) -> Any:
        path = request.path
        if _bad_path(path):
            write_error(request, 400, "invalid_path", "The request path is not valid.")
            return server.NOT_DONE_YET
        if path.startswith(b"/v1/"):
            if path.startswith(b"/v1/dashboard/billing/"):
                return self.gateway.billing.render(request, path[3:])
            try:
                handle_v1(self.gateway, request)
            except Exception:
                log.failure("internal error in {path}", path=path[:200])
                if not request.startedWriting and not getattr(request, "_disconnected", False):
                    write_error(request, 500, "internal_error", "yugongd hit an internal error.")
            return server.NOT_DONE_YET
        if path.startswith(b"/dashboard/billing/"):
            return self.gateway.billing.render(request, path)
        if path == b"/healthz":
            return self.gateway.healthz(request)
        if path == b"/metrics":
            return self.gateway.metrics.render(request)
        if path.startswith(b"/admin/") or path == b"/admin":
            return self.gateway.admin.render(request)
        write_error(
            request,
            404,
            "unknown_url",
            f"Unknown request URL: {request.method.decode('ascii', 'replace')} {path.decode('ascii', 'replace')[:200]}.",
        )
        return server.NOT_DONE_YET


def read_body(request: server.Request) -> bytes:
    """The whole request body, as twisted.web buffered it."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return bytes(content.read())


def new_request_id(request: server.Request) -> str:
    """The client's ``X-Request-Id`` when it is sane, otherwise a fresh one."""
    raw = request.requestHeaders.getRawHeaders(b"x-request-id")
    if raw:
        value = raw[0]
        if 0 < len(value) <= 128 and all(c in _REQUEST_ID_OK for c in value):
            return value.decode("ascii")
    return "req_yg" + _random_hex()


_random: list[str] = []
# a forked child (twistd daemonising after a request, a test) must not reuse the parent's
os.register_at_fork(after_in_child=_random.clear)


def _random_hex() -> str:
    """24 random hex digits; the randomness is fetched 4 kB at a time, not a syscall each."""
    if not _random:
        pool = os.urandom(12 * 340).hex()
        _random.extend(pool[i : i + 24] for i in range(0, len(pool), 24))
    return _random.pop()


def make_call(gateway: Gateway, request: server.Request, endpoint: str) -> Call:
    addr = request.getClientAddress()
    return Call(
        request_id=new_request_id(request),
        endpoint=endpoint,
        method=request.method.decode("ascii", "replace"),
        client_ip=getattr(addr, "host", "") or "",
        started=gateway.clock.seconds(),
        request=request,
    )


def reject(gateway: Gateway, call: Call, denial: Denial) -> None:
    """Answer a request the gateway refuses before any upstream attempt, and account for it."""
    request = call.request
    assert request is not None
    request.responseHeaders.setRawHeaders(b"x-request-id", [call.request_id.encode()])
    for name, value in call.response_headers.items():
        request.responseHeaders.setRawHeaders(name, [value])
    if not getattr(request, "_disconnected", False):
        write_error(
            request,
            denial.status,
            denial.code,
            denial.message,
            retry_after=denial.retry_after,
            type_=denial.type,
        )
    outcome = Outcome(
        status=denial.status,
        code=denial.code,
        latency=gateway.clock.seconds() - call.started,
    )
    notify(gateway.pm.hook.yugongd_request_finished, call=call, outcome=outcome)


def handle_v1(gateway: Gateway, request: server.Request) -> None:
    """Authenticate, authorize and forward one ``/v1/…`` request."""
    endpoint_bytes = request.path[3:]
    call = make_call(gateway, request, endpoint_bytes.decode("utf-8", "replace"))
    if getattr(request, "too_large", False):
        limit = gateway.config.limits.max_body
        reject(
            gateway,
            call,
            Denial(
                413,
                "request_too_large",
                f"The request body is larger than the limit of {limit} bytes.",
            ),
        )
        return
    body = read_body(request)
    ctype = (request.requestHeaders.getRawHeaders(b"content-type") or [b""])[0].lower()
    try:
        parsed, model, stream, body, strip_usage = inspect_body(body, ctype, endpoint_bytes)
    except BadRequest as e:
        reject(gateway, call, Denial(e.status, e.code, e.message))
        return
    call.body = parsed
    call.model = model
    call.stream = stream
    call.expected_tokens = expected_tokens(body, parsed)
    account = gateway.pm.hook.yugongd_authenticate(request=request, token=bearer_token(request))
    if account is None:
        message = gateway.unauthenticated_message(request)
        reject(gateway, call, Denial(401, "invalid_api_key", message))
        return
    call.account = account
    results = gateway.pm.hook.yugongd_authorize(call=call)
    if any(isinstance(r, defer.Deferred) for r in results):
        d = defer.gatherResults(
            [r if isinstance(r, defer.Deferred) else defer.succeed(r) for r in results],
            consumeErrors=True,
        )
        d.addCallback(_authorized, gateway, call, body, strip_usage)
        d.addErrback(_authorize_failed, gateway, call)
        return
    _authorized(results, gateway, call, body, strip_usage)


def _authorize_failed(reason: Failure, gateway: Gateway, call: Call) -> None:
    log.failure(
        "request {request_id}: authorization hook failed", reason, request_id=call.request_id
    )
    reject(
        gateway,
        call,
        Denial(500, "internal_error", "yugongd could not check this request.", type="server_error"),
    )


def _authorized(
    results: list[Denial | None], gateway: Gateway, call: Call, body: bytes, strip_usage: bool
) -> None:
    for denial in results:
        if denial is not None:
            reject(gateway, call, denial)
            return
    request = call.request
    assert request is not None
    if getattr(request, "_disconnected", False):
        reject(gateway, call, Denial(499, "client_closed", "The client went away."))
        return
    headers: dict[bytes, list[bytes]] = {}
    connection = request.requestHeaders.getRawHeaders(b"connection") or []
    extra_drop = {t.strip().lower() for v in connection for t in v.split(b",")}
    # names as twisted.web's Headers keeps them (canonical case): the proxy's upstream
    # Headers is made from this dict as it is (ProxiedRequest._next_attempt)
    for name, values in request.requestHeaders.getAllRawHeaders():
        lname = name.lower()
        if lname not in REQUEST_DROP and lname not in extra_drop:
            headers[name] = list(values)
    headers[b"X-Request-Id"] = [call.request_id.encode()]
    headers[b"Accept-Encoding"] = [b"identity"]
    query = request.uri.find(b"?")
    path = request.path[3:] + (request.uri[query:] if query >= 0 else b"")
    transform = None
    account = call.account
    if request.method == b"GET" and call.endpoint == "/models" and account is not None:
        if account.models != ("*",):
            transform = partial(filter_models, account.models)
    ProxiedRequest(gateway, request, call, body, headers, path, strip_usage, transform).start()


def filter_models(patterns: tuple[str, ...], body: bytes) -> bytes:
    """``GET /v1/models`` as the account sees it: only the models its allowlist admits."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return body
    doc["data"] = [
        m
        for m in doc["data"]
        if isinstance(m, dict) and isinstance(m.get("id"), str) and models_match(patterns, m["id"])
    ]
    return json.dumps(doc).encode("utf-8")
