"""yugongd.httpclient against scripted raw-TCP servers on 127.0.0.1: the bytes it sends,
how it reads responses, its keep-alive pool, its errors, cancellation and flow control."""

from __future__ import annotations

import gc
import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from yugongd import httpclient
from yugongd.httpclient import HTTPClient, ResponseHeaders, ResponseHeadTooLarge

# -- the scripted server ---------------------------------------------------------------------


def response(
    body: bytes = b"ok", status: bytes = b"200 OK", headers: bytes = b"", version: bytes = b"1.1"
) -> bytes:
    return b"HTTP/%s %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        version,
        status,
        len(body),
        headers,
        body,
    )


class ServerConn(Protocol):
    """One accepted connection: splits what it receives into requests (head + Content-Length
    body) and hands each to the server's handler."""

    factory: Server

    def connectionMade(self) -> None:
        self.index = len(self.factory.conns)
        self.factory.conns.append(self)
        self.raw = b""
        self.buf = b""
        self.requests: list[bytes] = []
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = re.search(rb"\r\ncontent-length: *(\d+)", self.buf[: end + 4], re.I)
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < size:
                return
            req, self.buf = self.buf[:size], self.buf[size:]
            self.requests.append(req)
            self.factory.handler(self, req)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Server(Factory):
    protocol = ServerConn
    noisy = False

    def __init__(self, handler: Callable[[ServerConn, bytes], None]) -> None:
        self.handler = handler
        self.conns: list[ServerConn] = []
        self.port: Any = None

    def url(self, path: str = "/") -> bytes:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()


def answer(data: bytes, close: bool = False) -> Callable[[ServerConn, bytes], None]:
    def handler(conn: ServerConn, req: bytes) -> None:
        conn.send(data)
        if close:
            conn.transport.loseConnection()  # type: ignore[union-attr]

    return handler


def silent(conn: ServerConn, req: bytes) -> None:
    pass


@pytest_twisted.async_yield_fixture
async def serve() -> Any:
    servers: list[Server] = []

    def start(handler: Callable[[ServerConn, bytes], None]) -> Server:
        s = Server(handler)
        s.port = reactor.listenTCP(0, s, interface="127.0.0.1")
        servers.append(s)
        return s

    yield start
    for s in servers:
        for c in s.conns:
            if not c.closed:
                c.transport.abortConnection()  # type: ignore[union-attr]
        await defer.maybeDeferred(s.port.stopListening)


@pytest_twisted.async_yield_fixture
async def http() -> Any:
    c = HTTPClient(reactor, max_idle_per_host=4, idle_timeout=30.0)
    yield c
    await c.close().addTimeout(2, reactor)


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Every test: nothing logs a failure (AlreadyCalledError, unhandled Deferred errors)."""
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    gc.collect()  # unhandled errors in garbage Deferreds are logged on collection
    globalLogPublisher.removeObserver(observe)
    assert not failures, [e.get("log_failure") or e for e in failures]


# -- helpers -----------------------------------------------------------------------------------


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate: Callable[[], bool], timeout: float = 1.0) -> Any:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        yield sleep(0.005)
    raise AssertionError("condition not met in time")


class Body(Protocol):
    """Records a response body; ``on_data`` runs after each piece."""

    def __init__(self, on_data: Callable[[Body, bytes], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.on_data = on_data
        self.reasons: list[Failure] = []
        #: fires (with None) on the first connectionLost; the reason is ``reasons[0]``
        self.done: defer.Deferred[None] = defer.Deferred()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        assert not self.reasons, "data after connectionLost"
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reasons.append(reason if reason is not None else Failure(client.ResponseDone()))
        if not self.done.called:  # (it may have timed out)
            self.done.callback(None)

    def ended(self) -> defer.Deferred[None]:
        """Waits (at most 1.5 s) for connectionLost."""
        return self.done.addTimeout(1.5, reactor)


def get(
    http: HTTPClient,
    url: bytes,
    method: bytes = b"GET",
    headers: Headers | None = None,
    body: Any = None,
) -> defer.Deferred[Any]:
    d = http.agent(1.0).request(method, url, headers, body)
    d.addTimeout(1.5, reactor)
    return d


@defer.inlineCallbacks
def fetch(http: HTTPClient, url: bytes, method: bytes = b"GET") -> Any:
    """Request, read the whole body; returns (response, body, end reason)."""
    resp = yield get(http, url, method)
    body = Body()
    resp.deliverBody(body)
    yield body.ended()
    return resp, body.data, body.reasons[0]


@defer.inlineCallbacks
def failure_of(d: defer.Deferred[Any]) -> Any:
    """Fires with ``[failure]`` (a Failure itself would errback) when ``d`` fails."""
    try:
        yield d
    except Exception:
        return [Failure()]
    raise AssertionError("the request succeeded")


# -- keep-alive --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_two_requests_reuse_one_connection(serve, http):
    s = serve(answer(response(b"hello")))
    r1 = yield get(http, s.url("/a"))
    assert (yield client.readBody(r1)) == b"hello"
    assert http.idle_connections() == 1
    r2 = yield get(http, s.url("/b"))
    assert (yield client.readBody(r2)) == b"hello"
    assert len(s.conns) == 1
    assert [r.split(b" ")[1] for r in s.conns[0].requests] == [b"/a", b"/b"]
    assert http.open_connections() == 1 and http.idle_connections() == 1
    assert not s.conns[0].closed


@pytest.mark.parametrize(
    "reply",
    [
        response(b"x", headers=b"Connection: close\r\n"),
        response(b"x", version=b"1.0"),
    ],
    ids=["connection-close", "http-1.0"],
)
@pytest_twisted.inlineCallbacks
def test_closing_responses_are_not_reused(serve, http, reply):
    s = serve(answer(reply))
    _, body1, reason1 = yield fetch(http, s.url())
    assert body1 == b"x" and reason1.check(client.ResponseDone)
    assert http.idle_connections() == 0
    yield wait_for(lambda: s.conns[0].closed)  # the client closed it
    _, body2, _ = yield fetch(http, s.url())
    assert body2 == b"x"
    assert len(s.conns) == 2


@pytest_twisted.inlineCallbacks
def test_http10_keep_alive_response_is_reused(serve, http):
    s = serve(answer(response(b"x", version=b"1.0", headers=b"Connection: keep-alive\r\n")))
    yield fetch(http, s.url())
    yield fetch(http, s.url())
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_at_most_max_idle_per_host_kept(serve):
    http = HTTPClient(reactor, max_idle_per_host=2, idle_timeout=30.0)
    waiting: list[ServerConn] = []

    def handler(conn: ServerConn, req: bytes) -> None:
        waiting.append(conn)
        if len(waiting) == 3:  # three concurrent requests on three connections: answer all
            for c in waiting:
                c.send(response(b"x"))

    s = serve(handler)
    try:
        results = yield defer.gatherResults([fetch(http, s.url()) for _ in range(3)])
        assert [r[1] for r in results] == [b"x"] * 3
        assert len(s.conns) == 3
        assert http.idle_connections() == 2
        yield wait_for(lambda: sum(c.closed for c in s.conns) == 1)
        yield sleep(0.05)
        assert sum(c.closed for c in s.conns) == 1
        assert http.open_connections() == 2
    finally:
        yield http.close()


@pytest_twisted.inlineCallbacks
def test_idle_connection_closed_after_idle_timeout(serve):
    http = HTTPClient(reactor, max_idle_per_host=4, idle_timeout=0.1)
    s = serve(answer(response(b"x")))
    try:
        yield fetch(http, s.url())
        assert http.idle_connections() == 1
        yield sleep(0.03)
        assert not s.conns[0].closed  # not before the timeout
        yield wait_for(lambda: s.conns[0].closed, timeout=0.5)
        assert http.idle_connections() == 0 and http.open_connections() == 0
        yield fetch(http, s.url())  # the next request opens a new connection
        assert len(s.conns) == 2
    finally:
        yield http.close()


@pytest_twisted.inlineCallbacks
def test_close_closes_idle_aborts_busy_and_fires(serve):
    http = HTTPClient(reactor)
    s = serve(lambda conn, req: conn.send(response(b"x")) if b"/idle" in req else None)
    busy = get(http, s.url("/busy"))  # waits for its response
    yield wait_for(lambda: len(s.conns) == 1 and len(s.conns[0].requests) == 1)
    yield fetch(http, s.url("/idle"))  # so on a second connection, then idle
    assert len(s.conns) == 2 and http.idle_connections() == 1
    closed = http.close()
    assert not closed.called  # connections are still going
    (reason,) = yield failure_of(busy)
    assert reason.check(client.ResponseNeverReceived)
    yield closed
    assert http.open_connections() == 0 and http.idle_connections() == 0
    yield wait_for(lambda: all(c.closed for c in s.conns))
    assert (yield http.close()) is None  # nothing left: fires at once


@pytest_twisted.inlineCallbacks
def test_close_does_not_retry_a_busy_reused_connection(serve):
    http = HTTPClient(reactor)
    s = serve(lambda conn, req: conn.send(response(b"x")) if len(conn.requests) == 1 else None)
    yield fetch(http, s.url())
    busy = get(http, s.url())  # reuses the connection; the server never answers
    yield wait_for(lambda: len(s.conns[0].requests) == 2)
    closed = http.close()
    (reason,) = yield failure_of(busy)
    assert reason.check(client.ResponseNeverReceived)
    yield closed
    yield sleep(0.05)
    assert len(s.conns) == 1  # not sent again on a new connection after close
    assert http.open_connections() == 0


# -- response bodies ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_content_length_body(serve, http):
    s = serve(answer(response(b"0123456789", headers=b"X-Thing: a\r\nX-Thing: b\r\n")))
    resp, body, reason = yield fetch(http, s.url())
    assert resp.code == 200 and resp.phrase == b"OK"
    assert resp.length == 10
    assert resp.headers.getRawHeaders(b"x-thing") == [b"a", b"b"]
    assert body == b"0123456789"
    assert reason.check(client.ResponseDone)


@pytest_twisted.inlineCallbacks
def test_chunked_body_streams_chunks(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
    resp = yield get(http, s.url())
    assert resp.length is client.UNKNOWN_LENGTH
    body = Body()
    resp.deliverBody(body)
    yield wait_for(lambda: body.data == b"hello")  # delivered before the body ends
    assert not body.reasons
    s.conns[0].send(b"6\r\n world\r\n0\r\n\r\n")
    yield body.ended()
    reason = body.reasons[0]
    assert body.data == b"hello world"
    assert reason.check(client.ResponseDone)
    assert http.idle_connections() == 1  # a chunked response ends cleanly: reusable


@pytest_twisted.inlineCallbacks
def test_read_until_close_body_ends_with_potential_data_loss(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True))
    resp, body, reason = yield fetch(http, s.url())
    assert body == b"all of it"
    assert reason.check(PotentialDataLoss)
    assert http.open_connections() == 0


@pytest.mark.parametrize("how", ["reset", "clean-close"])
@pytest_twisted.inlineCallbacks
def test_connection_lost_mid_body_is_response_failed(serve, http, how):
    def handler(conn: ServerConn, req: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        t: Any = conn.transport
        reactor.callLater(0.02, t.abortConnection if how == "reset" else t.loseConnection)

    s = serve(handler)
    resp, body, reason = yield fetch(http, s.url())
    assert body == b"partial"
    assert reason.check(client.ResponseFailed)
    assert not reason.check(PotentialDataLoss)
    assert http.open_connections() == 0
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_chunked_body_cut_by_clean_close_is_response_failed(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", True))
    _, body, reason = yield fetch(http, s.url())
    assert body == b"hello"
    assert reason.check(client.ResponseFailed)


@pytest_twisted.inlineCallbacks
def test_204_has_no_body_and_keeps_the_connection(serve, http):
    s = serve(answer(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"))
    resp, body, reason = yield fetch(http, s.url())
    assert resp.code == 204 and resp.length == 0
    assert body == b"" and reason.check(client.ResponseDone)
    resp, body, reason = yield fetch(http, s.url())
    assert resp.code == 204 and reason.check(client.ResponseDone)
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_head_has_no_body_and_its_connection_is_closed(serve, http):
    def handler(conn: ServerConn, req: bytes) -> None:
        if req.startswith(b"HEAD"):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        else:
            conn.send(response(b"x"))

    s = serve(handler)
    resp, body, reason = yield fetch(http, s.url("/h"), method=b"HEAD")
    assert s.conns[0].requests[0].startswith(b"HEAD /h HTTP/1.1\r\n")
    assert resp.code == 200 and resp.length == 0
    assert body == b"" and reason.check(client.ResponseDone)
    # never reused (a stray body after a HEAD head would be read as the next response)
    yield wait_for(lambda: s.conns[0].closed)
    assert http.open_connections() == 0
    _, body, _ = yield fetch(http, s.url())
    assert body == b"x"
    assert len(s.conns) == 2


@pytest_twisted.inlineCallbacks
def test_interim_100_continue_then_the_real_response(serve, http):
    s = serve(
        answer(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + response(b"real", b"201 Made"))
    )
    resp, body, reason = yield fetch(http, s.url())
    assert resp.code == 201 and resp.phrase == b"Made"
    assert resp.headers.getRawHeaders(b"x-interim") is None
    assert body == b"real" and reason.check(client.ResponseDone)
    yield fetch(http, s.url())
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_interim_response_in_its_own_packet(serve, http):
    def handler(conn: ServerConn, req: bytes) -> None:
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        reactor.callLater(0.02, conn.send, response(b"later"))

    s = serve(handler)
    resp, body, _ = yield fetch(http, s.url())
    assert resp.code == 200 and body == b"later"


@pytest_twisted.inlineCallbacks
def test_read_body_works(serve, http):
    s = serve(answer(response(b'{"ok": true}', headers=b"Content-Type: application/json\r\n")))
    resp = yield get(http, s.url())
    assert resp.headers.getRawHeaders("Content-Type") == [b"application/json"]
    assert (yield client.readBody(resp)) == b'{"ok": true}'


# -- the request bytes -------------------------------------------------------------------------


def head_lines(req: bytes) -> list[bytes]:
    return req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


@pytest_twisted.inlineCallbacks
def test_request_line_host_and_headers(serve, http):
    s = serve(answer(response()))
    headers = Headers(
        {
            b"Authorization": [b"Bearer sk-1"],
            b"X-Multi": [b"1", b"2"],
            b"Connection": [b"close"],
            b"Keep-Alive": [b"timeout=5"],
            b"Transfer-Encoding": [b"chunked"],
            b"Content-Length": [b"999"],
            b"Host": [b"evil.example"],
        }
    )
    yield client.readBody((yield get(http, s.url("/v1/models?x=1"), headers=headers)))
    lines = head_lines(s.conns[0].requests[0])
    port = s.port.getHost().port
    assert lines[0] == b"GET /v1/models?x=1 HTTP/1.1"
    assert lines[1] == b"Host: 127.0.0.1:%d" % port
    rest = sorted(line.lower() for line in lines[2:])
    assert rest == [b"authorization: bearer sk-1", b"x-multi: 1", b"x-multi: 2"]
    assert s.conns[0].requests[0].endswith(b"\r\n\r\n")


def test_host_header_omits_default_port():
    parse = HTTPClient._parse_origin
    assert parse(b"http://example.com") == ((b"http", b"example.com", 80), b"example.com")
    assert parse(b"http://example.com:80")[1] == b"example.com"
    assert parse(b"https://example.com:443") == ((b"https", b"example.com", 443), b"example.com")
    assert parse(b"https://example.com:8443")[1] == b"example.com:8443"
    assert parse(b"http://example.com:443")[1] == b"example.com:443"
    assert parse(b"http://[::1]:8080")[1] == b"[::1]:8080"


class KnownBody:
    """Like proxy.BytesProducer: a body already in memory."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)


@pytest.mark.parametrize(
    "make_body",
    [KnownBody, lambda b: client.FileBodyProducer(io.BytesIO(b))],
    ids=["bytes", "FileBodyProducer"],
)
@pytest_twisted.inlineCallbacks
def test_post_body_with_content_length(serve, http, make_body):
    s = serve(answer(response()))
    payload = b'{"model": "gpt"}' * 100
    headers = Headers({b"Content-Type": [b"application/json"]})
    resp = yield get(http, s.url("/v1/chat"), b"POST", headers, make_body(payload))
    yield client.readBody(resp)
    req = s.conns[0].requests[0]
    lines = head_lines(req)
    assert lines[0] == b"POST /v1/chat HTTP/1.1"
    assert b"Content-Length: %d" % len(payload) in lines
    assert b"Content-Type: application/json" in lines
    assert req.split(b"\r\n\r\n", 1)[1] == payload


@pytest.mark.parametrize(
    "make_body",
    [lambda: None, lambda: KnownBody(b""), lambda: client.FileBodyProducer(io.BytesIO(b""))],
    ids=["none", "bytes", "FileBodyProducer"],
)
@pytest_twisted.inlineCallbacks
def test_empty_post_says_content_length_0(serve, http, make_body):
    s = serve(answer(response()))
    yield client.readBody((yield get(http, s.url(), b"POST", None, make_body())))
    req = s.conns[0].requests[0]
    assert b"Content-Length: 0" in head_lines(req) and req.endswith(b"\r\n\r\n")


@pytest_twisted.inlineCallbacks
def test_get_without_body_has_no_content_length(serve, http):
    s = serve(answer(response()))
    yield client.readBody((yield get(http, s.url())))
    assert b"content-length" not in s.conns[0].requests[0].lower()


# -- errors ------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_connection_refused_is_a_connect_error(http):
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    yield port.stopListening()
    (reason,) = yield failure_of(get(http, b"http://127.0.0.1:%d/" % number))
    assert reason.check(error.ConnectError)
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_new_connection_closed_without_response_is_never_received(serve, http):
    s = serve(lambda conn, req: conn.transport.loseConnection())
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(client.ResponseNeverReceived)
    assert len(s.conns) == 1  # a new connection is not retried


@pytest_twisted.inlineCallbacks
def test_stale_reused_connection_is_retried_once(serve, http):
    def handler(conn: ServerConn, req: bytes) -> None:
        if conn.index == 0 and len(conn.requests) == 2:
            conn.transport.loseConnection()  # closed it "meanwhile", before answering
        else:
            conn.send(response(b"n%d" % len(conn.requests)))

    s = serve(handler)
    yield fetch(http, s.url("/one"))
    post = KnownBody(b"payload")
    resp = yield get(http, s.url("/two"), b"POST", None, post)
    assert (yield client.readBody(resp)) == b"n1"
    assert len(s.conns) == 2
    assert s.conns[1].requests == [s.conns[0].requests[1]]  # the same bytes again
    assert s.conns[1].requests[0].endswith(b"\r\n\r\npayload")


@pytest_twisted.inlineCallbacks
def test_stale_retry_happens_only_once(serve, http):
    def handler(conn: ServerConn, req: bytes) -> None:
        if conn.index == 0 and len(conn.requests) == 1:
            conn.send(response())
        else:
            conn.transport.loseConnection()

    s = serve(handler)
    yield fetch(http, s.url())
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(client.ResponseNeverReceived)
    assert len(s.conns) == 2


@pytest_twisted.inlineCallbacks
def test_no_retry_once_response_bytes_arrived(serve, http):
    def handler(conn: ServerConn, req: bytes) -> None:
        if len(conn.requests) == 1:
            conn.send(response())
        else:
            conn.send(b"HTTP/1.1 200 OK\r\nContent-")
            conn.transport.loseConnection()

    s = serve(handler)
    yield fetch(http, s.url())
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(client.ResponseNeverReceived)
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_response_head_too_large_fails_and_aborts(serve, http):
    big = b"X-Big: " + b"a" * (httpclient.MAX_HEAD_BYTES + 10) + b"\r\n"
    # (the server does not close: the client must drop the connection itself)
    s = serve(answer(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 0\r\n\r\n"))
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(ResponseHeadTooLarge)
    yield wait_for(lambda: s.conns[0].closed)
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_response_head_that_never_ends_is_refused(serve, http):
    """Many small headers and no end of head: refused once over the limit, not buffered."""
    many = b"".join(b"X-H%05d: %s\r\n" % (i, b"v" * 30) for i in range(2500))
    assert len(many) > httpclient.MAX_HEAD_BYTES
    s = serve(answer(b"HTTP/1.1 200 OK\r\n" + many))
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(ResponseHeadTooLarge)
    yield wait_for(lambda: s.conns[0].closed)


@pytest_twisted.inlineCallbacks
def test_response_head_too_large_in_one_read(serve, http):
    """A head just over the limit that arrives in a single read is refused too."""
    big = b"X-Big: " + b"a" * (httpclient.MAX_HEAD_BYTES - 100) + b"\r\n"
    more = b"X-More: " + b"b" * 200 + b"\r\n"
    s = serve(answer(b"HTTP/1.1 200 OK\r\n" + big + more + b"Content-Length: 0\r\n\r\n"))
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(ResponseHeadTooLarge)
    yield wait_for(lambda: s.conns[0].closed)


@pytest_twisted.inlineCallbacks
def test_head_split_across_reads_with_a_large_body_is_fine(serve, http):
    """The limit is on the head: a small head whose last part arrives with ~64 KiB of body
    in the same read is not "too large"."""
    body = b"b" * 65500

    def handler(conn: ServerConn, req: bytes) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n")
        reactor.callLater(0.05, conn.send, b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    s = serve(handler)
    resp, data, reason = yield fetch(http, s.url())
    assert data == body and reason.check(client.ResponseDone)


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01"],
    ids=["ssh", "bad-status", "tls"],
)
@pytest_twisted.inlineCallbacks
def test_garbage_response_fails(serve, http, garbage):
    s = serve(answer(garbage))
    (reason,) = yield failure_of(get(http, s.url()))
    assert reason.check(client.ResponseFailed)
    yield wait_for(lambda: s.conns[0].closed)
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_bad_chunk_encoding_fails_the_body(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"))
    _, body, reason = yield fetch(http, s.url())
    assert body == b"hello" and reason.check(client.ResponseFailed)
    yield wait_for(lambda: s.conns[0].closed)


@pytest_twisted.inlineCallbacks
def test_bytes_while_idle_drop_the_connection(serve, http):
    s = serve(answer(response()))
    yield fetch(http, s.url())
    s.conns[0].send(b"unsolicited")
    yield wait_for(lambda: s.conns[0].closed)
    assert http.idle_connections() == 0
    yield fetch(http, s.url())
    assert len(s.conns) == 2


# -- cancellation ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_cancel_while_connecting(serve, http):
    s = serve(answer(response()))
    d = http.agent(1.0).request(b"GET", s.url())
    d.cancel()
    (reason,) = yield failure_of(d)
    assert reason.check(defer.CancelledError)
    yield sleep(0.1)
    assert all(c.closed for c in s.conns)
    assert all(not c.requests for c in s.conns)
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_cancel_while_connecting_cancels_the_connect(http, monkeypatch):
    cancelled: list[bool] = []

    monkeypatch.setattr(
        http, "_connect", lambda key, timeout: defer.Deferred(lambda d: cancelled.append(True))
    )
    d = http.agent(1.0).request(b"GET", b"http://192.0.2.1/")
    assert not d.called
    d.cancel()
    (reason,) = yield failure_of(d)
    assert reason.check(defer.CancelledError)
    assert cancelled == [True]


def test_an_upstream_at_an_address_is_connected_to_without_an_endpoint() -> None:
    from twisted.internet.testing import MemoryReactorClock

    mem = MemoryReactorClock()
    c = HTTPClient(mem)
    d = c.agent(2.5).request(b"GET", b"http://192.0.2.1:8080/x")
    host, port, factory, timeout, _ = mem.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.1", 8080, 2.5)
    assert isinstance(factory, httpclient._DirectFactory)
    # cancelled while connecting: fails at once, and the connect attempt is stopped
    d.cancel()
    failed: list[Failure] = []
    d.addErrback(failed.append)
    assert failed and failed[0].check(defer.CancelledError)
    assert mem.connectors[0].stoppedConnecting
    # a connect that fails reports the reason, as an endpoint's connect would
    d2 = c.agent(2.5).request(b"GET", b"http://[::1]:8080/x")
    host, port, factory, _, _ = mem.tcpClients[1]
    assert (host, port) == ("::1", 8080)
    factory.clientConnectionFailed(mem.connectors[1], Failure(error.ConnectionRefusedError()))
    d2.addErrback(failed.append)
    assert failed[1].check(error.ConnectionRefusedError)
    # a name goes through an endpoint (resolution, TLS), never connectTCP directly
    c.agent(2.5).request(b"GET", b"http://upstream.invalid/x").addErrback(lambda f: None)
    assert all(not isinstance(e[2], httpclient._DirectFactory) for e in mem.tcpClients[2:])


@pytest.mark.parametrize("reused", [False, True], ids=["new", "reused"])
@pytest_twisted.inlineCallbacks
def test_cancel_while_waiting_for_headers(serve, http, reused):
    s = serve(lambda conn, req: conn.send(response()) if b"/first" in req else None)
    if reused:
        yield fetch(http, s.url("/first"))
    d = http.agent(1.0).request(b"GET", s.url("/slow"))
    yield wait_for(lambda: bool(s.conns) and s.conns[-1].requests[-1].startswith(b"GET /slow"))
    fired: list[Any] = []
    d.addBoth(fired.append)
    d.cancel()
    assert len(fired) == 1 and isinstance(fired[0], Failure)
    assert fired[0].check(defer.CancelledError)
    yield wait_for(lambda: s.conns[-1].closed)  # the server sees the disconnect
    yield sleep(0.05)
    assert len(fired) == 1
    assert len(s.conns) == 1  # the cancelled request is not retried
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_cancel_then_late_response_bytes(serve, http):
    """The server answers right as the client cancels: nothing fires twice."""
    s = serve(silent)
    d = http.agent(1.0).request(b"GET", s.url())
    yield wait_for(lambda: bool(s.conns) and bool(s.conns[0].requests))
    s.conns[0].send(response(b"late"))
    d.cancel()
    (reason,) = yield failure_of(d)
    assert reason.check(defer.CancelledError)
    yield wait_for(lambda: s.conns[0].closed)
    yield sleep(0.02)


@pytest_twisted.inlineCallbacks
def test_cancel_after_the_response_is_a_no_op(serve, http):
    s = serve(answer(response(b"x")))
    d = get(http, s.url())
    resp = yield d
    d.cancel()
    assert (yield client.readBody(resp)) == b"x"
    assert http.idle_connections() == 1


# -- flow control ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_pause_and_resume_producing(serve, http):
    rest = b"r" * 50000
    s = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nfirst" % (5 + len(rest))))
    resp = yield get(http, s.url())
    body = Body(lambda b, data: b.transport.pauseProducing() if len(b.chunks) == 1 else None)
    resp.deliverBody(body)
    yield wait_for(lambda: body.data == b"first")
    s.conns[0].send(rest)  # the client is not reading: it stays in the socket buffers
    yield sleep(0.1)
    assert body.data == b"first"
    body.transport.resumeProducing()
    yield body.ended()
    reason = body.reasons[0]
    assert body.data == b"first" + rest
    assert reason.check(client.ResponseDone)


@pytest_twisted.inlineCallbacks
def test_stop_producing_aborts_and_ends_the_body(serve, http):
    s = serve(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"
        )
    )
    resp = yield get(http, s.url())
    body = Body(lambda b, data: b.transport.stopProducing())
    resp.deliverBody(body)
    yield body.ended()
    reason = body.reasons[0]
    # the whole response was in one read: still nothing after stopProducing
    assert body.chunks == [b"hello"]
    assert not reason.check(client.ResponseDone)
    assert reason.check(client.ResponseFailed)
    yield wait_for(lambda: s.conns[0].closed)
    yield sleep(0.02)
    assert len(body.reasons) == 1
    assert http.open_connections() == 0 and http.idle_connections() == 0


@pytest_twisted.inlineCallbacks
def test_stop_producing_mid_body(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome"))
    resp = yield get(http, s.url())
    body = Body()
    resp.deliverBody(body)
    yield wait_for(lambda: body.data == b"some")
    body.transport.stopProducing()
    yield body.ended()
    reason = body.reasons[0]
    assert reason.check(client.ResponseFailed)
    yield wait_for(lambda: s.conns[0].closed)


@pytest_twisted.inlineCallbacks
def test_read_body_cancel_aborts(serve, http):
    """readBody's canceller aborts through the body transport: the Deferred fails once (the
    autouse fixture sees any AlreadyCalledError) and the server sees the disconnect."""
    s = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome"))
    resp = yield get(http, s.url())
    d = client.readBody(resp)
    yield sleep(0.02)
    d.cancel()
    (reason,) = yield failure_of(d)
    assert reason.check(defer.CancelledError, client.ResponseFailed)
    yield wait_for(lambda: s.conns[0].closed)
    yield sleep(0.02)  # the client's side of the abort runs after a reactor turn
    assert http.open_connections() == 0


@pytest_twisted.inlineCallbacks
def test_paused_at_the_end_of_a_body_the_connection_still_works(serve, http):
    """A reader that pauses on the last bytes (a slow client) and never resumes must not
    leave the pooled connection unread: the next request on it gets its response."""
    s = serve(answer(response(b"all")))
    resp = yield get(http, s.url())
    body = Body(lambda b, data: b.transport.pauseProducing())
    resp.deliverBody(body)
    yield body.ended()
    reason = body.reasons[0]
    assert reason.check(client.ResponseDone)
    _, data, _ = yield fetch(http, s.url())
    assert data == b"all"
    assert len(s.conns) == 1


@pytest_twisted.inlineCallbacks
def test_paused_idle_connection_notices_the_server_closing(serve, http):
    s = serve(answer(response(b"all")))
    resp = yield get(http, s.url())
    body = Body(lambda b, data: b.transport.pauseProducing())
    resp.deliverBody(body)
    yield body.ended()
    assert http.idle_connections() == 1
    s.conns[0].transport.loseConnection()
    yield wait_for(lambda: http.open_connections() == 0)


@pytest_twisted.inlineCallbacks
def test_stale_body_transport_cannot_touch_the_next_response(serve, http):
    s = serve(lambda conn, req: conn.send(response(b"one")) if b"/one" in req else None)
    _, _, _ = yield fetch(http, s.url("/one"))
    resp1 = yield get(http, s.url("/one"))
    body1 = Body()
    resp1.deliverBody(body1)
    yield body1.ended()
    stale = body1.transport
    d2 = get(http, s.url("/two"))
    yield wait_for(lambda: len(s.conns[0].requests) == 3)
    stale.pauseProducing()
    stale.stopProducing()
    stale.abortConnection()
    s.conns[0].send(response(b"two"))
    resp2 = yield d2
    stale.pauseProducing()
    body2 = Body()
    resp2.deliverBody(body2)
    yield body2.ended()
    reason = body2.reasons[0]
    assert body2.data == b"two" and reason.check(client.ResponseDone)
    assert len(s.conns) == 1 and not s.conns[0].closed
    assert http.idle_connections() == 1


# -- delivery ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_body_before_deliver_body_is_buffered_in_order(serve, http):
    s = serve(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"
        )
    )
    resp = yield get(http, s.url())
    yield wait_for(lambda: http.idle_connections() == 1)  # the whole response is in
    body = Body()
    resp.deliverBody(body)
    assert body.chunks == [b"one", b"two", b"three"]
    assert len(body.reasons) == 1 and body.reasons[0].check(client.ResponseDone)
    with pytest.raises(RuntimeError):
        resp.deliverBody(Body())


@pytest_twisted.inlineCallbacks
def test_partial_buffer_then_live_data(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfour"))
    resp = yield get(http, s.url())
    yield sleep(0.03)
    body = Body()
    resp.deliverBody(body)
    assert body.data == b"four" and not body.reasons
    s.conns[0].send(b"more")
    yield body.ended()
    reason = body.reasons[0]
    assert body.data == b"fourmore" and reason.check(client.ResponseDone)


@pytest_twisted.inlineCallbacks
def test_buffered_read_until_close_ends_with_potential_data_loss(serve, http):
    s = serve(answer(b"HTTP/1.0 200 OK\r\n\r\nuntil close", close=True))
    resp = yield get(http, s.url())
    yield wait_for(lambda: s.conns[0].closed)
    yield wait_for(lambda: http.open_connections() == 0)
    body = Body()
    resp.deliverBody(body)
    assert body.data == b"until close"
    assert len(body.reasons) == 1 and body.reasons[0].check(PotentialDataLoss)


def test_response_headers():
    h = ResponseHeaders([(b"content-type", b"a/b"), (b"x-n", b"1"), (b"x-n", b"2")])
    assert h.getRawHeaders(b"Content-Type") == [b"a/b"]
    assert h.getRawHeaders("X-N") == [b"1", b"2"]
    assert h.getRawHeaders(b"missing") is None
    assert h.getRawHeaders(b"missing", [b"d"]) == [b"d"]
    assert h.hasHeader("content-type") and not h.hasHeader(b"nope")
    assert dict(h.getAllRawHeaders()) == {b"content-type": [b"a/b"], b"x-n": [b"1", b"2"]}


def test_address_literals_connect_without_name_resolution():
    """An upstream at an IP address gets a plain TCP endpoint (no trip through the
    resolver's thread pool per new connection); names and https keep Twisted's standard
    endpoints (happy eyeballs, TLS)."""
    from twisted.internet.endpoints import (
        HostnameEndpoint,
        TCP4ClientEndpoint,
        TCP6ClientEndpoint,
    )

    http = HTTPClient(reactor)
    assert isinstance(http._endpoint((b"http", b"127.0.0.1", 80), 5.0), TCP4ClientEndpoint)
    assert isinstance(http._endpoint((b"http", b"::1", 80), 5.0), TCP6ClientEndpoint)
    assert isinstance(http._endpoint((b"http", b"localhost", 80), 5.0), HostnameEndpoint)
    tls = http._endpoint((b"https", b"127.0.0.1", 443), 5.0)
    assert not isinstance(tls, TCP4ClientEndpoint | TCP6ClientEndpoint)
    # made once per host, port and timeout
    assert http._endpoint((b"http", b"127.0.0.1", 80), 5.0) is http._endpoint(
        (b"http", b"127.0.0.1", 80), 5.0
    )


# -- send_now ----------------------------------------------------------------------------------


class _Sink(Protocol):
    pass


def _tcp_pair() -> tuple[Any, Any]:
    """A twisted.internet.tcp.Connection over one end of a socket pair, and the other end."""
    import socket

    from twisted.internet import tcp

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = tcp.Connection(ours, _Sink(), reactor)
    conn.connected = True
    return conn, theirs


def test_send_now_sends_at_once_when_nothing_is_queued() -> None:
    conn, theirs = _tcp_pair()
    try:
        httpclient.send_now(conn, b"data: 1\n\n")
        # on the wire without the reactor running, and nothing left queued
        assert theirs.recv(100) == b"data: 1\n\n"
        assert not conn._tempDataBuffer and not conn.dataBuffer
    finally:
        conn.socket.close()
        theirs.close()


def test_send_now_queues_what_the_socket_does_not_take_and_keeps_the_order() -> None:
    import socket

    conn, theirs = _tcp_pair()
    try:
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
        httpclient.send_now(conn, big)
        queued = sum(len(p) for p in conn._tempDataBuffer)
        assert 0 < queued < len(big)
        # with bytes queued, the next write goes behind them, not straight to the socket
        httpclient.send_now(conn, b"after")
        assert conn._tempDataBuffer[-1] == b"after"
        received = bytearray()
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                chunk = b""
            if chunk:
                received += chunk
                continue
            if not conn._tempDataBuffer and not conn.dataBuffer[conn.offset :]:
                break
            conn.doWrite()
        assert bytes(received) == big + b"after"
    finally:
        conn.stopWriting()
        conn.socket.close()
        theirs.close()


def test_send_now_leaves_other_transports_to_write() -> None:
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    httpclient.send_now(transport, b"x")
    assert transport.value() == b"x"
    conn, theirs = _tcp_pair()
    try:
        conn.TLS = True  # bytes over TLS must go through the TLS layer
        written: list[bytes] = []
        conn.write = written.append
        httpclient.send_now(conn, b"secret")
        assert written == [b"secret"]
        with pytest.raises(BlockingIOError):
            theirs.recv(100)
    finally:
        conn.stopWriting()
        conn.socket.close()
        theirs.close()


class ReadsBody(Body):
    """A Body that also records ``read_done`` (after each socket read's bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[object] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.events.append(data)

    def read_done(self) -> None:
        self.events.append("read done")


@pytest_twisted.inlineCallbacks
def test_a_body_protocol_hears_when_each_read_is_delivered(serve, http):
    s = serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
    resp = yield get(http, s.url())
    body = ReadsBody()
    resp.deliverBody(body)
    yield wait_for(lambda: body.data == b"hello")
    s.conns[0].send(b"1\r\n!\r\n")
    yield wait_for(lambda: body.events[-1:] == ["read done"] and body.data == b"hello!")
    s.conns[0].send(b"0\r\n\r\n")
    yield body.ended()
    # after the read with "!" came "read done"
    assert body.events[body.events.index(b"!") + 1] == "read done"
    assert body.reasons[0].check(client.ResponseDone)


def test_idle_connections_time_out_from_one_sweep_timer() -> None:
    """One timer for the pool (not a callLater and a cancel per request): each idle
    connection closes idle_timeout after it was released, the oldest first."""
    from twisted.internet.testing import MemoryReactorClock

    mem = MemoryReactorClock()
    pool = HTTPClient(mem, idle_timeout=10.0)
    closed: list[str] = []

    class Conn:
        def __init__(self, name: str, key: tuple[bytes, bytes, int]) -> None:
            self.name, self.key, self.idle_since = name, key, 0.0

        def idle_timeout(self) -> None:
            closed.append(self.name)

    k1, k2 = (b"http", b"a", 80), (b"http", b"b", 80)
    pool._release(Conn("a", k1))  # type: ignore[arg-type]
    mem.advance(4)
    pool._release(Conn("b", k1))  # type: ignore[arg-type]
    mem.advance(2)
    pool._release(Conn("c", k2))  # type: ignore[arg-type]
    assert len(mem.getDelayedCalls()) == 1
    mem.advance(3.9)
    assert closed == []
    mem.advance(0.1)  # t=10
    assert closed == ["a"]
    mem.advance(3.9)
    assert closed == ["a"]
    mem.advance(0.1)  # t=14
    assert closed == ["a", "b"]
    mem.advance(2)  # t=16
    assert closed == ["a", "b", "c"]
    assert pool.idle_connections() == 0 and mem.getDelayedCalls() == []
