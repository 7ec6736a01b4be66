"""The client side of HTTP/1.1: one connection, parsed by ``httptools``, answered by
twisted.web ``Request`` objects.

twisted.web's ``HTTPChannel`` parses a request line by line in Python (``LineReceiver``,
a ``headerReceived`` per header, a transfer decoder object for the body) — about a tenth
of what a proxied request costs yugongd. :class:`GatewayChannel` keeps twisted.web's
``Request`` (so every resource, ``write_error``, ``notifyFinish``, producers and the
tests' in-memory clients work unchanged) and replaces only the channel under it: the
request line, headers and body (``Content-Length`` or chunked) are parsed by the C parser
``httptools`` (llhttp, the parser of Node.js) and handed to the request in one go.

What the channel does, as ``HTTPChannel`` did:

- keep-alive (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 closes after its answer),
  pipelined requests answered in order (later ones are parsed and held; reading pauses
  when more than 16 kB waits), ``Expect: 100-continue``;
- limits: a request line over 16 kB is answered 414, one header line over 16 kB 431, a
  head over 16 kB in all or over 500 header lines 400, bad HTTP 400 — each with
  ``Connection: close``; ``limits.header_timeout`` for a head that does not come whole
  (408), ``limits.idle_timeout`` between requests (then 15 s more to close before the
  connection is aborted);
- backpressure both ways: it is the transport's push producer (a client that does not read
  pauses the request's producer: the upstream), and a request's producer registers with it;
- registration with its :class:`~yugongd.site.GatewaySite` for ``limits.max_connections``;
- cork/uncork: a whole answer written in one ``send``.

Not kept: HTTP/2 over TLS (twisted.web negotiates it only when the ``h2`` package is
installed, which yugongd does not require) and websocket upgrades (an ``Upgrade`` request
is answered as a plain request and the connection closes after it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet import interfaces
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import InvalidHeaderName, _nameEncoder
from zope.interface import implementer

from yugongd.httpclient import cancel_call, send_now, tcp_nodelay

if TYPE_CHECKING:
    from yugongd.site import GatewaySite

log = Logger()

#: the longest request line, header line and whole head (twisted.web's limits)
MAX_LINE = 16384
MAX_HEAD = 16384
MAX_HEADERS = 500
#: bytes of later (pipelined) requests held while one is answered before reading pauses
EAGER_READ = 0x4000

_CLOSED = Failure(ConnectionDone())
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


def _refusal(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


_REQUEST_TIMEOUT = _refusal(b"408 Request Timeout")
_BAD_REQUEST = _refusal(b"400 Bad Request")
_URI_TOO_LONG = _refusal(b"414 URI Too Long")
_HEADERS_TOO_LARGE = _refusal(b"431 Request Header Fields Too Large")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing and answer ``answer``."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer


#: header names as they arrive -> their canonical form (``content-type`` -> ``Content-Type``)
_canonical: dict[bytes, bytes] = {}


def canonical_name(name: bytes) -> bytes:
    """twisted.web's canonical header name, remembered (a client sends the same few)."""
    known = _canonical.get(name)
    if known is None:
        known = _nameEncoder.encode(name)  # raises InvalidHeaderName
        if len(_canonical) >= 2048:
            _canonical.clear()
        _canonical[name] = known
    return known


@implementer(interfaces.IPushProducer, interfaces.IConsumer)
class GatewayChannel(Protocol):
    """One client connection (see the module docstring)."""

    # set by GatewaySite.buildProtocol
    site: GatewaySite
    requestFactory: Any
    callLater: Any
    timeOut: float | None = None
    #: seconds before a connection that did not close after its idle timeout is aborted
    abortTimeout = 15

    #: requests received and not yet answered, the one being answered first
    requests: list[Any]
    persistent = True
    _transport_full = False  # the client is not reading: our writes wait in the transport
    _reading_paused = False
    _held = 0  # bytes received while a request is being answered
    _answering = False  # requests[0] has been handed to its resource and is not done
    _requestProducer: Any = None
    _requestProducerStreaming = False
    _header_timer: Any = None
    _idle_call: Any = None
    _abort_call: Any = None
    _last_read = 0.0
    _host: Any = None
    _secure: bool | None = None
    #: while a whole response is being written: its pieces, sent together by :meth:`uncork`
    _corked: list[bytes] | None = None
    #: a request line or headers are being received (the head of a request)
    _in_head = False
    _done = False  # no more requests on this connection: bytes that come are dropped

    def __init__(self) -> None:
        self.requests = []
        self._ready: list[Any] = []  # complete requests waiting for the one before them
        self._parser = httptools.HttpRequestParser(self)
        self._request: Any = None  # the request being received
        self._url: list[bytes] = []
        self._url_size = 0
        self._head_size = 0  # request line and header lines seen so far
        self._head_bytes = 0  # bytes received since the head began
        self._header_count = 0
        self._length: int | None = 0
        self._headers: dict[bytes, list[bytes]] = {}

    # -- connection -------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        tcp_nodelay(transport)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._seconds = self.site.reactor.seconds
        self._last_read = self._seconds()
        self._arm_idle()
        self.site.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._last_read = self._seconds()
        if self._answering:
            # while a request is answered, later ones are read (a client that goes away is
            # still noticed) but only so much of them before reading pauses
            self._held += len(data)
            if self._held > EAGER_READ and not self._reading_paused:
                self._pause_reading()
        if self._request is None or self._in_head:
            # a head's bytes (counted from the read it begins in: at most a read too few)
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            # raised in one of our callbacks below (httptools wraps it)
            cause = e.__context__
            if not isinstance(cause, _Refused):
                log.failure("internal error reading a request", Failure(cause))
            self._refuse(cause.answer if isinstance(cause, _Refused) else _BAD_REQUEST)
            return
        except httptools.HttpParserUpgrade:
            # the request was delivered; there is no protocol switch here: its answer ends
            # the connection
            self._refuse(b"")
            return
        except httptools.HttpParserError:
            self._refuse(_BAD_REQUEST)
            return
        if self._in_head and self.transport is not None and not self._done:
            if self._head_bytes > MAX_HEAD + MAX_LINE:
                self._refuse(self._too_large_head())
                return
            if self._header_timer is None:
                # the head did not come whole in this read: from now on it has
                # limits.header_timeout to be complete (a head that does, as nearly every
                # one does, costs no timer)
                self._header_timer = self.callLater(
                    self.site.gateway.config.limits.header_timeout, self._headers_too_slow
                )

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self._done = True
        self._in_head = False
        self._cancel_header_timer()
        cancel_call(self._idle_call)
        cancel_call(self._abort_call)
        self._idle_call = self._abort_call = None
        self.site.connection_closed(self)
        # those whose head was complete: the one answered, those waiting, one being received
        requests, self.requests = self.requests, []
        self._ready = []
        self._request = None
        for request in requests:
            request.connectionLost(reason)

    def idle(self) -> bool:
        """Between requests (a keep-alive connection waiting for the next one)."""
        return not self.requests and not self._in_head

    # -- parser callbacks (httptools) ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done or not self.persistent:
            raise _Refused(b"")  # nothing more is read on this connection (see _refuse)
        self._in_head = True
        request = self._request = self.requestFactory(self)
        # twisted.web reads request.channel.site etc. from here on
        request.requestHeaders._rawHeaders = self._headers = {}
        self._url = []
        self._url_size = 0
        self._head_size = 0
        self._header_count = 0
        self._length = 0

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_LINE:
            raise _Refused(_URI_TOO_LONG)
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if size > MAX_LINE:
            raise _Refused(_HEADERS_TOO_LARGE)
        self._head_size += size
        self._header_count += 1
        if self._head_size + self._url_size > MAX_HEAD or self._header_count > MAX_HEADERS:
            raise _Refused(_BAD_REQUEST)
        if value[:1] in b" \t" or value[-1:] in b" \t":
            value = value.strip(b" \t")
        if b"\x00" in value:
            raise _Refused(_BAD_REQUEST)
        try:
            name = canonical_name(name)
        except InvalidHeaderName:
            raise _Refused(_BAD_REQUEST) from None
        if name == b"Content-Length":
            if not value.isdigit() or self._length is None:
                raise _Refused(_BAD_REQUEST)
            self._length = int(value)
        elif name == b"Transfer-Encoding":
            if value.lower() == b"chunked":
                self._length = None
        values = self._headers.get(name)
        if values is None:
            self._headers[name] = [value]
        else:
            values.append(value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_header_timer()
        request = self._request
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version(), b"HTTP/1.0")
        request._yg_line = (parser.get_method(), b"".join(self._url), version)
        self.requests.append(request)
        self.site.connection_busy(self)
        if b"Cookie" in self._headers:
            request.parseCookies()
        if not self.checkPersistence(request, version):
            self.persistent = False  # nothing after this request is read
        request.gotLength(self._length)
        expect = self._headers.get(b"Expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, data: bytes) -> None:
        self._request.handleContentChunk(data)

    def on_message_complete(self) -> None:
        request, self._request = self._request, None
        if self.requests[0] is request:
            self._dispatch(request)
        else:
            self._ready.append(request)

    # -- requests -----------------------------------------------------------------------

    def _dispatch(self, request: Any) -> None:
        self._answering = True
        method, uri, version = request._yg_line
        del request._yg_line
        try:
            request.requestReceived(method, uri, version)
        except Exception:
            log.failure("internal error handling a request")
            if self.transport is not None:
                self.transport.loseConnection()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """Whether the connection stays open after this request's answer (twisted.web's
        rule: HTTP/1.1 without ``Connection: close``)."""
        if version != b"HTTP/1.1":
            return False
        connection = self._headers.get(b"Connection")
        if connection and b"close" in [t.strip().lower() for t in connection[0].split(b",")]:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def requestDone(self, request: Any) -> None:
        """Called by the request being answered when its answer is complete."""
        if not self.requests or request is not self.requests[0]:
            raise TypeError("requestDone for a request that is not being answered")
        del self.requests[0]
        self._held = 0
        self._answering = False
        if not self.requests and not self.persistent:
            # HTTP/1.0, "Connection: close", or nothing more could be read
            self.loseConnection()
            return
        if self._reading_paused and not self._transport_full:
            self._resume_reading()
        if self._ready:
            self._dispatch(self._ready.pop(0))
        else:
            self._last_read = self._seconds()
            self._arm_idle()

    def _refuse(self, answer: bytes) -> None:
        """No more requests are read on this connection: one that cannot be read is
        answered with ``answer`` (when no earlier answer is still being written) and the
        connection closes once the requests received before it are answered."""
        self._done = True
        self.persistent = False
        self._in_head = False
        self._cancel_header_timer()
        partial, self._request = self._request, None
        if partial is not None and partial in self.requests:
            self.requests.remove(partial)  # its body will not be complete
        if not self.requests:
            if answer and not self._closing and self.transport is not None:
                self.transport.write(answer)
            self.loseConnection()

    def _too_large_head(self) -> bytes:
        if self._header_count == 0 and not self._head_size:
            # no header line complete: the request line, or the first header, is too long
            return (
                _URI_TOO_LONG
                if self._url_size >= MAX_LINE or not self._url
                else (_HEADERS_TOO_LARGE)
            )
        return (
            _HEADERS_TOO_LARGE if self._head_bytes - self._head_size > MAX_LINE else (_BAD_REQUEST)
        )

    # -- timeouts -----------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.timeOut and self._idle_call is None:
            self._idle_call = self.callLater(self.timeOut, self._idle_check)

    def _idle_check(self) -> None:
        """``limits.idle_timeout``: nothing received for that long while no request is
        being answered (the deadline moves with each read; no timer is reset per read)."""
        self._idle_call = None
        if self._answering or self.transport is None or self._done:
            return  # being answered: armed again when the answer is done
        left = self._last_read + (self.timeOut or 0) - self._seconds()
        if left > 0:
            self._idle_call = self.callLater(left, self._idle_check)
            return
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        log.info("Timing out client: {peer}", peer=str(self.getPeer()))
        self._done = True
        if self.abortTimeout is not None:
            self._abort_call = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self._abort_call = None
        log.info("Forcibly timing out client: {peer}", peer=str(self.getPeer()))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_header_timer(self) -> None:
        cancel_call(self._header_timer)
        self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.info(
            "client {peer}: request headers not complete within {timeout}s; closing",
            peer=str(self.getPeer()),
            timeout=f"{self.site.gateway.config.limits.header_timeout:g}",
        )
        self._refuse(_REQUEST_TIMEOUT)
        if self.transport is not None and self.abortTimeout is not None:
            # a client that does not read the 408 either does not hold the connection
            self._abort_call = self.callLater(self.abortTimeout, self.forceAbortClient)

    # -- what a Request uses (twisted.web's channel interface) ---------------------------

    _peer: Any = None

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None and self.transport is not None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None and self.transport is not None:
            host = self._host = self.transport.getHost()
        return host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = interfaces.ISSLTransport(self.transport, None) is not None
        return self._secure

    def cork(self) -> None:
        """Hold what is written until :meth:`uncork`: a response written as head, body and
        end goes out in one ``send`` instead of three queued writes and an epoll round."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self.transport is not None:
            send_now(self.transport, b"".join(corked))

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        if self._corked is not None:
            self._corked.extend(head)
        elif self.transport is not None:
            self.transport.write(b"".join(head))

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        if self._corked is not None:
            self._corked.extend(iovec)
        elif self.transport is not None:
            self.transport.writeSequence(iovec)

    _closing = False

    def loseConnection(self) -> None:
        self._done = True
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
            transport.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # what twisted.web's Request calls for a body it cannot parse
        if self.transport is not None:
            self.transport.write(_BAD_REQUEST)
        self.loseConnection()

    # -- producer (the transport's) and consumer (the request's) ---------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._requestProducer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer "
                f"{self._requestProducer} was never unregistered."
            )
        if not streaming:
            from twisted.web.http import _PullToPush

            producer = _PullToPush(producer, self)
        self._requestProducer = producer
        self._requestProducerStreaming = streaming
        if not streaming:
            producer.startStreaming()
        elif self._transport_full:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        producer = self._requestProducer
        if producer is None:
            return
        if not self._requestProducerStreaming:
            producer.stopStreaming()
        self._requestProducer = None
        self._requestProducerStreaming = False

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: the client is not reading."""
        self._transport_full = True
        if self._requestProducer is not None:
            self._requestProducer.pauseProducing()
        if not self._answering:
            self._pause_reading()

    def resumeProducing(self) -> None:
        self._transport_full = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        if self._reading_paused and (not self._answering or self._held <= EAGER_READ):
            self._resume_reading()

    def stopProducing(self) -> None:
        if self._requestProducer is not None:
            self._requestProducer.stopProducing()

    def _pause_reading(self) -> None:
        self._reading_paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None and not self._done:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


def cork_channel(request: Any) -> GatewayChannel | None:
    """Cork the channel under ``request`` (see :meth:`GatewayChannel.cork`) and return it to
    be uncorked; ``None`` for a request on another channel (twisted.web's own, as in the
    in-memory test clients), which writes as it goes."""
    channel = getattr(request, "channel", None)
    if isinstance(channel, GatewayChannel):
        channel.cork()
        return channel
    return None
