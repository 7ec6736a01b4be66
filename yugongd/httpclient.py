"""The upstream HTTP/1.1 client: Twisted protocols driven by ``httptools`` (llhttp, in C).

Twisted's :class:`~twisted.web.client.Agent` parses responses line by line in Python
through a state machine of several objects per request; at gateway rates that parsing
was about half of yugongd's CPU. :class:`HTTPClient` keeps what the Agent gave us and
drops the rest:

- the same interface (:meth:`UpstreamAgent.request` takes a method, an absolute URL,
  :class:`~twisted.web.http_headers.Headers` and an ``IBodyProducer`` and fires with an
  ``IResponse``-like :class:`Response` whose body is delivered with ``deliverBody``), so
  the proxy, the probes and the in-memory test fakes are unchanged;
- Twisted's standard endpoints (TCP; TLS with the browser-like certificate policy for
  ``https``), made once per host;
- persistent connections, at most ``max_idle_per_host`` idle ones per host, each closed
  after ``idle_timeout`` seconds unused;
- backpressure: the body's transport pauses and resumes the TCP connection, and
  ``stopProducing`` aborts it;
- cancelling the request's Deferred (first-byte timeout, client gone) aborts the
  connection; a response that ends cleanly frees the connection for the next request.

A request sent on a reused idle connection that the server closed in the meantime (the
connection ends before a single response byte) is retried once on a new connection: that
is almost always a keep-alive connection the server timed out while it sat in the pool,
which never saw the request. (A server that read the request and then died without a byte
of answer would see it twice; Twisted's Agent retried only requests without a body, which
would make every such race a failover with a cooldown of a healthy key.) Everything else is the caller's to handle, as with the
Agent: the errors are :class:`~twisted.web.client.ResponseNeverReceived`,
:class:`~twisted.web.client.ResponseFailed` and the endpoint's connect errors.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet import defer, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionAborted, ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

log = Logger()

_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"host",
        b"upgrade",
        b"te",
        b"trailer",
    )
)
_DONE = Failure(client.ResponseDone())
#: (twisted.web.client is a deprecation proxy: an attribute read through it costs ~2 µs)
_UNKNOWN_LENGTH = client.UNKNOWN_LENGTH
#: response status line and headers larger than this are refused (Twisted's Agent refused
#: any single line over 64 KiB; llhttp itself has no bound)
MAX_HEAD_BYTES = 64 * 1024


class ResponseHeadTooLarge(Exception):
    """The upstream's response headers exceeded :data:`MAX_HEAD_BYTES`."""


def tcp_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport (a no-op for others, e.g. TLS over a
    memory BIO): requests and responses go out in a few small writes, none of which should
    wait for an ACK."""
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass


def cancel_call(call: Any) -> None:
    """Cancel a ``callLater`` call that may be ``None`` or have run already."""
    if call is not None and call.active():
        call.cancel()


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing is queued before it.

    Twisted's ``write`` queues the bytes, asks epoll to watch for writability, sends them on
    the reactor's next pass and asks epoll to stop watching: two ``epoll_ctl`` calls and a
    pass per write. On a plain TCP connection whose buffer is empty, one ``send`` does it
    here; what the socket does not take goes through ``write`` as before, so ordering and
    backpressure (the producer paused when the buffer grows) are unchanged. TLS and any
    other transport always go through ``write``.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error that write()'s attempt will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class ResponseHeaders:
    """The read-only subset of :class:`~twisted.web.http_headers.Headers` a response needs,
    made without re-encoding each name: lower-case names, values as received."""

    __slots__ = ("_raw", "_map")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._map: dict[bytes, list[bytes]] | None = None

    def _index(self) -> dict[bytes, list[bytes]]:
        m = self._map
        if m is None:
            m = self._map = {}
            for name, value in self._raw:
                values = m.get(name)
                if values is None:
                    m[name] = [value]
                else:
                    values.append(value)
        return m

    def getRawHeaders(self, name: bytes | str, default: Any = None) -> Any:
        if isinstance(name, str):
            name = name.encode("ascii")
        return self._index().get(name.lower(), default)

    def hasHeader(self, name: bytes | str) -> bool:
        return self.getRawHeaders(name) is not None

    def getAllRawHeaders(self) -> Any:
        return iter(self._index().items())

    def __repr__(self) -> str:
        return f"ResponseHeaders({sorted(self._index())!r})"


class _BodyTransport:
    """What a body protocol sees as its transport: the upstream connection's flow control,
    for as long as the connection carries this response (it may carry the next one after)."""

    __slots__ = ("_conn", "_response")

    def __init__(self, conn: _Connection, response: Response) -> None:
        self._conn = conn
        self._response = response

    def _transport(self) -> Any:
        conn = self._conn
        if conn.response is self._response and conn.response_open:
            return conn.transport
        return None

    def pauseProducing(self) -> None:
        t = self._transport()
        if t is not None:
            self._conn.paused = True
            t.pauseProducing()

    def resumeProducing(self) -> None:
        t = self._transport()
        if t is not None:
            self._conn.paused = False
            t.resumeProducing()

    def stopProducing(self) -> None:
        """The body's reader wants no more: drop the connection (it cannot be reused).
        The reader gets no more data and its ``connectionLost`` (``ResponseFailed``) now,
        before this returns: ``readBody``'s canceller needs that, or the protocol would
        fire the cancelled Deferred again when the connection is gone."""
        conn = self._conn
        if self._transport() is not None:
            conn.abort()
            conn.response = None
            conn.response_open = False
            self._response._stop(
                Failure(client.ResponseFailed([Failure(ConnectionAborted("stopProducing"))]))
            )

    abortConnection = stopProducing  # client.readBody's canceller uses this name


class Response:
    """An upstream response: status, headers, and a body delivered to one protocol."""

    __slots__ = (
        "version",
        "code",
        "phrase",
        "headers",
        "length",
        "request",
        "previousResponse",
        "_conn",
        "_protocol",
        "_read_done_cb",
        "_buffer",
        "_end",
        "_delivering",
        "_lost",
        "_stopped",
    )

    def __init__(self, conn: _Connection, code: int, phrase: bytes, headers: ResponseHeaders):
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = phrase
        self.headers = headers
        length = headers.getRawHeaders(b"content-length")
        self.length: Any = _UNKNOWN_LENGTH
        if length:
            try:
                self.length = int(length[0])
            except ValueError:
                pass
        self.request = None
        self.previousResponse = None
        self._conn = conn
        self._protocol: Any = None
        self._read_done_cb: Any = None
        self._buffer: list[bytes] | None = []
        self._end: Failure | None = None
        self._delivering = False
        self._lost = False  # the protocol's connectionLost was called
        self._stopped = False  # its reader called stopProducing

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the response body was already delivered")
        self._protocol = protocol
        self._read_done_cb = getattr(protocol, "read_done", None)
        self._delivering = True
        try:
            protocol.makeConnection(_BodyTransport(self._conn, self))
            buffered, self._buffer = self._buffer, None
            if buffered:
                for data in buffered:
                    if self._stopped:
                        break
                    protocol.dataReceived(data)
        finally:
            self._delivering = False
        if self._end is not None and not self._lost:
            self._lost = True
            protocol.connectionLost(self._end)

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def _data(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)

    def _read_done(self) -> None:
        """The bytes of one read from the socket have all been delivered: a body protocol
        with a ``read_done`` method (the proxy's, which holds a JSON response's writes to
        send them together) hears of it."""
        read_done = self._read_done_cb
        if read_done is not None and not self._stopped:
            read_done()

    def _stop(self, reason: Failure) -> None:
        self._stopped = True
        self._finish(reason)

    def _finish(self, reason: Failure) -> None:
        if self._end is not None:
            return
        self._end = reason
        if self._protocol is not None and not self._delivering:
            self._lost = True
            self._protocol.connectionLost(reason)


class _Connection(Protocol):
    """One upstream HTTP/1.1 connection: one request at a time, kept alive between."""

    #: fired with the connection once it is made (connections made by :class:`_DirectFactory`)
    made: defer.Deferred[Any] | None = None

    def __init__(self, owner: HTTPClient, key: tuple[bytes, bytes, int]) -> None:
        self.owner = owner
        self.key = key
        self.parser: Any = None
        self.d: defer.Deferred[Any] | None = None
        self.response: Response | None = None
        self.response_open = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.phrase = b""
        self.got_bytes = False
        self.head_bytes = 0
        self.message_done = False
        self.keep_alive = False
        self.head_only = False
        #: when it went back to the pool (the pool's sweep closes it idle_timeout later)
        self.idle_since = 0.0
        self.uses = 0
        self.connected_ = False
        self.retry: tuple[Any, ...] | None = None
        #: our side dropped the connection (cancel, stopProducing, close, bad response):
        #: nothing more is parsed or delivered, and it is never reused or retried
        self.aborted = False
        #: a body reader paused the transport; undone before the connection is reused
        self.paused = False
        #: status line and header bytes of the current response (see MAX_HEAD_BYTES)
        self.head_size = 0
        self.head_too_large = False

    # -- the transport --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True
        tcp_nodelay(self.transport)
        made, self.made = self.made, None
        if made is not None and not made.called:
            made.callback(self)

    def send(self, method: bytes, head: bytes, body: bytes, d: defer.Deferred[Any]) -> None:
        self.uses += 1
        self.d = d
        self.response = None
        self.headers = []
        self.phrase = b""
        self.got_bytes = False
        self.head_bytes = 0
        self.head_size = 0
        self.head_too_large = False
        self.message_done = False
        self.keep_alive = False
        self.head_only = method == b"HEAD"
        self.parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        send_now(self.transport, head + body if body else head)

    def dataReceived(self, data: bytes) -> None:
        if self.aborted:
            return
        if self.parser is None:
            # bytes while idle: the server broke the protocol; this connection is done
            self.abort()
            return
        self.got_bytes = True
        waiting = self.response is None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            if not self.aborted:
                self._fail(Failure(client.ResponseFailed([Failure(e)])))
                self.abort()
            return
        if waiting and self.response is None and not self.aborted:
            # still in the head: every byte so far was head (bounds what llhttp buffers)
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.head_too_large = True
        if self.head_too_large:
            self._fail(Failure(ResponseHeadTooLarge(f"response headers over {MAX_HEAD_BYTES}")))
            self.abort()
            return
        if self.message_done:
            self._message_end()
        elif self.response is not None:
            self.response._read_done()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.connected_ = False
        self.owner._forget(self)
        if self.d is not None:
            d, self.d = self.d, None
            if self.retry is not None and not self.got_bytes:
                # a reused connection the server had closed: it never saw this request
                (key, timeout, method, head, body, holder), self.retry = self.retry, None
                self.owner._send_new(key, timeout, method, head, body, holder, d)
                return
            d.errback(Failure(client.ResponseNeverReceived([reason])))
        elif self.response is not None and not self.message_done:
            response, self.response = self.response, None
            self.response_open = False
            if (
                not self.headers_have_length
                and reason.check(ConnectionDone) is not None
                and self.parser is not None
            ):
                # a body delimited by the end of the connection
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(client.ResponseFailed([reason])))
        self.parser = None

    def abort(self) -> None:
        self.aborted = True
        self.retry = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, reason: Failure) -> None:
        self.retry = None
        if self.d is not None:
            d, self.d = self.d, None
            d.errback(reason)
        elif self.response is not None and not self.message_done:
            response, self.response = self.response, None
            self.response_open = False
            response._finish(reason)

    # -- httptools callbacks --------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.phrase += status
        self.head_size += len(status) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self.aborted or self.head_too_large:
            return
        if self.head_size > MAX_HEAD_BYTES:
            # (dataReceived fails the request once llhttp returns)
            self.head_too_large = True
            return
        code = self.parser.get_status_code()
        if 100 <= code < 200:  # an interim response: the real one follows
            self.headers = []
            self.phrase = b""
            return
        self.retry = None
        headers = ResponseHeaders(self.headers)
        self.headers_have_length = (
            headers.getRawHeaders(b"content-length") is not None
            or headers.getRawHeaders(b"transfer-encoding") is not None
        )
        response = Response(self, code, self.phrase, headers)
        self.response = response
        self.response_open = True
        d, self.d = self.d, None
        if self.head_only or code == 204 or code == 304:
            response.length = 0
        if self.head_only:
            self.message_done = True
        if d is not None:
            d.callback(response)

    headers_have_length = True

    def on_body(self, data: bytes) -> None:
        # (a HEAD response's message is done with its head; bytes after it are not its body)
        if self.response is not None and not self.message_done and not self.aborted:
            self.response._data(data)

    def on_message_complete(self) -> None:
        if self.response is not None and not self.message_done and not self.aborted:
            self.message_done = True
            # (llhttp forgets this once the callback returns)
            self.keep_alive = self.parser.should_keep_alive()

    def _message_end(self) -> None:
        response, self.response = self.response, None
        self.response_open = False
        keep = (
            not self.head_only
            and self.keep_alive
            and self.transport is not None
            and self.connected_
            and not self.aborted
        )
        self.parser = None
        self.message_done = False
        if keep:
            if self.paused:
                # the reader paused on the last bytes; the next request needs reading
                self.paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self.owner._release(self)
        elif self.transport is not None:
            self.transport.loseConnection()
        if response is not None:
            response._finish(_DONE)

    # -- the pool's side ------------------------------------------------------------------

    def idle_timeout(self) -> None:
        self.owner._forget(self)
        if self.transport is not None:
            self.transport.loseConnection()


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, owner: HTTPClient, key: tuple[bytes, bytes, int]) -> None:
        self.owner = owner
        self.key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.owner, self.key)


class _DirectFactory(ClientFactory):
    """``reactor.connectTCP`` for an upstream at an IP address, without an endpoint: the
    endpoint's wrapping factory and protocol cost a few objects per new connection and one
    more Python call on every read of it. The connection's ``made`` Deferred fires with the
    protocol, or fails with the reason the connection failed (as the endpoint's would)."""

    noisy = False

    def __init__(self, owner: HTTPClient, key: tuple[bytes, bytes, int]) -> None:
        self.owner = owner
        self.key = key
        self.made: defer.Deferred[Any] | None = None

    def buildProtocol(self, addr: Any) -> _Connection:
        conn = _Connection(self.owner, self.key)
        conn.made = self.made
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.made is not None and not self.made.called:
            self.made.errback(reason)


class HTTPClient:
    """Persistent upstream connections shared by every upstream; agents per connect timeout."""

    def __init__(
        self, reactor: Any, max_idle_per_host: int = 256, idle_timeout: float = 90.0
    ) -> None:
        self.reactor = reactor
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        #: scheme://host[:port] -> (pool key, Host header value)
        self._origins: dict[bytes, tuple[tuple[bytes, bytes, int], bytes]] = {}
        self._endpoints: dict[tuple[tuple[bytes, bytes, int], float], Any] = {}
        #: per origin: whether it is connected to without an endpoint (an IP address, http)
        self._direct: dict[tuple[bytes, bytes, int], bool] = {}
        self._endpoint_factories: dict[float, Any] = {}
        self._closing: list[defer.Deferred[None]] = []
        #: one timer for every idle connection's timeout (see _sweep), not one per request
        self._sweep_call: Any = None

    def agent(self, connect_timeout: float) -> UpstreamAgent:
        return UpstreamAgent(self, connect_timeout)

    def open_connections(self) -> int:
        return len(self._all)

    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    # -- requests -------------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        body_producer: Any,
        connect_timeout: float,
    ) -> defer.Deferred[Any]:
        cut = uri.find(b"/", uri.find(b"://") + 3)
        if cut < 0:
            origin, path = uri, b"/"
        else:
            origin, path = uri[:cut], uri[cut:]
        origin_info = self._origins.get(origin)
        if origin_info is None:
            origin_info = self._origins[origin] = self._parse_origin(origin)
        key, host = origin_info
        parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                if name.lower() in _HOP:
                    continue
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        body = b""
        if body_producer is not None:
            known: bytes | None = getattr(body_producer, "_body", None)
            if known is None:
                return self._collect_body(method, uri, headers, body_producer, connect_timeout)
            body = known
        if body or method in (b"POST", b"PUT", b"PATCH"):
            parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)

        def cancel(d: defer.Deferred[Any]) -> None:
            conn = holder[0]
            if conn is not None and conn.d is d:
                conn.d = None
                conn.retry = None
                conn.abort()

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        holder: list[_Connection | None] = [None]
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the oldest are left to time out
            if conn.connected_ and conn.transport is not None and not conn.aborted:
                holder[0] = conn
                conn.retry = (key, connect_timeout, method, head, body, holder)
                conn.send(method, head, body, d)
                return d
        self._send_new(key, connect_timeout, method, head, body, holder, d)
        return d

    def _send_new(
        self,
        key: tuple[bytes, bytes, int],
        connect_timeout: float,
        method: bytes,
        head: bytes,
        body: bytes,
        holder: list[_Connection | None],
        d: defer.Deferred[Any],
    ) -> None:
        holder[0] = None
        connecting = self._connect(key, connect_timeout)
        cancelled = [False]

        def connected(conn: _Connection) -> None:
            if cancelled[0]:
                conn.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._all.add(conn)
            holder[0] = conn
            conn.send(method, head, body, d)

        def failed(reason: Failure) -> None:
            if not cancelled[0]:
                d.errback(reason)

        connecting.addCallbacks(connected, failed)
        # a cancel while connecting abandons the attempt
        original = d._canceller

        def cancel(dd: defer.Deferred[Any]) -> None:
            if holder[0] is None:
                cancelled[0] = True
                connecting.cancel()
                if not dd.called:
                    dd.errback(Failure(defer.CancelledError()))
                return
            assert original is not None
            original(dd)

        d._canceller = cancel

    def _collect_body(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        producer: Any,
        connect_timeout: float,
    ) -> defer.Deferred[Any]:
        """A body from a general ``IBodyProducer``: read it whole, then send."""
        parts: list[bytes] = []

        class _Sink:
            def write(self, data: bytes) -> None:
                parts.append(data)

        done = defer.maybeDeferred(producer.startProducing, _Sink())
        return done.addCallback(
            lambda _: self.request(method, uri, headers, _Bytes(b"".join(parts)), connect_timeout)
        )

    # -- connections ----------------------------------------------------------------------

    @staticmethod
    def _parse_origin(origin: bytes) -> tuple[tuple[bytes, bytes, int], bytes]:
        uri = client.URI.fromBytes(origin + b"/")
        default = 443 if uri.scheme == b"https" else 80
        host = uri.host if uri.port == default else b"%s:%d" % (uri.host, uri.port)
        if b":" in uri.host and not uri.host.startswith(b"["):
            host = b"[%s]" % uri.host if uri.port == default else b"[%s]:%d" % (uri.host, uri.port)
        return (uri.scheme, uri.host, uri.port), host

    def _connect(
        self, key: tuple[bytes, bytes, int], connect_timeout: float
    ) -> defer.Deferred[Any]:
        """A new connection to ``key``'s origin (a Deferred of its :class:`_Connection`)."""
        direct = self._direct.get(key)
        if direct is None:
            scheme, host, _ = key
            literal = host.decode("ascii", "replace")
            direct = self._direct[key] = (
                scheme == b"http"
                and (isIPAddress(literal) or isIPv6Address(literal))
                and hasattr(self.reactor, "connectTCP")
            )
        if not direct:
            return self._endpoint(key, connect_timeout).connect(_ConnectionFactory(self, key))
        factory = _DirectFactory(self, key)
        connector: list[Any] = []

        def cancel(d: defer.Deferred[Any]) -> None:
            # as an endpoint's connect does: the attempt ends, the Deferred fails at once
            if not d.called:
                d.errback(Failure(ConnectingCancelledError(connector[0].getDestination())))
            connector[0].stopConnecting()

        made: defer.Deferred[Any] = defer.Deferred(cancel)
        factory.made = made
        connector.append(
            self.reactor.connectTCP(
                key[1].decode("ascii"), key[2], factory, timeout=connect_timeout
            )
        )
        return made

    def _endpoint(self, key: tuple[bytes, bytes, int], connect_timeout: float) -> Any:
        cached = self._endpoints.get((key, connect_timeout))
        if cached is None:
            factory = self._endpoint_factories.get(connect_timeout)
            if factory is None:
                factory = self._endpoint_factories[connect_timeout] = (
                    client._StandardEndpointFactory(
                        self.reactor, client.BrowserLikePolicyForHTTPS(), connect_timeout, None
                    )
                )
            scheme, host, port = key
            literal = host.decode("ascii", "replace")
            if scheme == b"http" and isIPAddress(literal):
                # an address needs no name resolution (HostnameEndpoint would still take
                # a trip through the resolver's thread pool for every new connection)
                cached = TCP4ClientEndpoint(self.reactor, literal, port, timeout=connect_timeout)
            elif scheme == b"http" and isIPv6Address(literal):
                cached = TCP6ClientEndpoint(self.reactor, literal, port, timeout=connect_timeout)
            else:
                uri = client.URI(scheme, b"%s:%d" % (host, port), host, port, b"/", b"", b"", b"")
                cached = factory.endpointForURI(uri)
            self._endpoints[(key, connect_timeout)] = cached
        return cached

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.abort()
            return
        conn.idle_since = self.reactor.seconds()
        idle.append(conn)
        if self._sweep_call is None:
            self._sweep_call = self.reactor.callLater(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout``; come back for the next one due.
        (Each idle list is in the order the connections were released: oldest first.)"""
        self._sweep_call = None
        now = self.reactor.seconds()
        due = None
        for idle in list(self._idle.values()):
            while idle and idle[0].idle_since + self.idle_timeout <= now:
                idle.pop(0).idle_timeout()
            if idle and (due is None or idle[0].idle_since < due):
                due = idle[0].idle_since
        if due is not None:
            self._sweep_call = self.reactor.callLater(
                max(0.0, due + self.idle_timeout - now), self._sweep
            )

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if not self._all and self._closing:
            waiting, self._closing = self._closing, []
            for w in waiting:
                w.callback(None)

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections and abort the busy ones (called after the drain);
        fires when every connection is gone."""
        for conn in list(self._all):
            if conn.d is not None or conn.response is not None:
                conn.abort()
        cancel_call(self._sweep_call)
        self._sweep_call = None
        for idle in list(self._idle.values()):
            for conn in list(idle):
                if conn.transport is not None:
                    conn.transport.loseConnection()
        self._idle.clear()
        if not self._all:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closing.append(d)
        return d


class _Bytes:
    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)


class UpstreamAgent:
    """An ``IAgent``: requests through an :class:`HTTPClient` with one connect timeout."""

    __slots__ = ("_client", "_timeout")

    def __init__(self, http: HTTPClient, connect_timeout: float) -> None:
        self._client = http
        self._timeout = connect_timeout

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        return self._client.request(method, uri, headers, bodyProducer, self._timeout)
