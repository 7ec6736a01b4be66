"""The client-side HTTP/1.1 channel (yugongd/channel.py: httptools under twisted.web's
Request), driven in memory with a resource whose answers the test writes, on a fake
clock: keep-alive, pipelining, HTTP/1.0, chunked bodies, 100-continue, bad input,
backpressure both ways and the idle timeout."""

from __future__ import annotations

import pytest
from twisted.web import resource, server

from tests.test_proxy_memory import Client, make_gateway
from yugongd.channel import EAGER_READ, GatewayChannel
from yugongd.config import LimitsConfig


class Held(resource.Resource):
    """Keeps every request; the test answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[server.Request] = []

    def render(self, request: server.Request) -> object:
        self.requests.append(request)
        return server.NOT_DONE_YET


def answer(request: server.Request, body: bytes = b"ok") -> None:
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Conn(Client):
    """A client connection to a gateway's Site whose resource is :class:`Held`."""

    def __init__(self, idle_timeout: float | None = None) -> None:
        limits = {"limits": LimitsConfig(idle_timeout=idle_timeout)} if idle_timeout else None
        self.gw, self.clock, _ = make_gateway(settings=limits)
        super().__init__(self.gw)
        self.res = self.site.resource = Held()
        assert isinstance(self.proto, GatewayChannel)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def out(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data


GET = b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"


def test_keep_alive_answers_one_request_after_another():
    c = Conn()
    c.send(GET)
    assert len(c.res.requests) == 1
    answer(c.res.requests[0], b"one")
    out = c.out()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\none")
    c.send(b"GET /b HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert [r.path for r in c.res.requests] == [b"/a", b"/b"]
    answer(c.res.requests[1], b"two")
    assert c.out().endswith(b"two")
    assert not c.transport.disconnecting


def test_pipelined_requests_are_answered_in_order():
    c = Conn()
    c.send(GET + b"POST /b?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + GET)
    # the second waits until the first is answered
    assert [r.path for r in c.res.requests] == [b"/a"]
    answer(c.res.requests[0], b"first")
    assert [r.path for r in c.res.requests] == [b"/a", b"/b"]
    second = c.res.requests[1]
    assert second.method == b"POST" and second.args == {b"x": [b"1"]}
    assert second.content.read() == b"abc"
    answer(second, b"second")
    answer(c.res.requests[2], b"third")
    out = c.out()
    assert out.index(b"first") < out.index(b"second") < out.index(b"third")


def test_headers_arrive_canonical_and_trimmed():
    c = Conn()
    c.send(
        b"POST /h HTTP/1.1\r\ncontent-type:  application/json \r\nX-TWO: a\r\n"
        b"x-two: b\r\nAuthorization: Bearer k\r\nContent-Length: 0\r\n\r\n"
    )
    r = c.res.requests[0]
    assert r.requestHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert r.requestHeaders.getRawHeaders(b"x-two") == [b"a", b"b"]
    names = [name for name, _ in r.requestHeaders.getAllRawHeaders()]
    assert names == [b"Content-Type", b"X-Two", b"Authorization", b"Content-Length"]
    assert r.getClientAddress().host == "127.0.0.1" and r.getHost().port == 8080


def test_a_chunked_body_is_delivered_whole():
    c = Conn()
    c.send(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert c.res.requests == []  # not complete yet
    c.send(b"2\r\nde\r\n0\r\n\r\n")
    assert c.res.requests[0].content.read() == b"abcde"


def test_http_1_0_and_connection_close_end_the_connection_after_the_answer():
    c = Conn()
    c.send(b"GET /a HTTP/1.0\r\n\r\n")
    answer(c.res.requests[0])
    assert c.out().startswith(b"HTTP/1.0 200 ")
    assert c.transport.disconnecting
    c = Conn()
    c.send(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n" + GET)
    assert len(c.res.requests) == 1
    answer(c.res.requests[0])
    assert b"\r\nConnection: close\r\n" in c.out()
    assert c.transport.disconnecting
    assert len(c.res.requests) == 1  # what came after "close" is not read


def test_expect_100_continue():
    c = Conn()
    c.send(b"POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert c.out() == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hi")
    assert c.res.requests[0].content.read() == b"hi"


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /a HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /a HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_bad_http_is_400_and_closed(data):
    c = Conn()
    c.send(data)
    assert c.out().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert c.transport.disconnecting
    assert c.res.requests == []


def test_garbage_after_a_request_closes_after_its_answer():
    c = Conn()
    c.send(GET + b"NONSENSE \x01\r\n\r\n")
    assert len(c.res.requests) == 1 and not c.transport.disconnecting
    answer(c.res.requests[0])
    out = c.out()
    assert out.startswith(b"HTTP/1.1 200 ") and b"400" not in out
    assert c.transport.disconnecting


def test_an_upgrade_request_is_answered_then_the_connection_closes():
    c = Conn()
    c.send(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes")
    answer(c.res.requests[0])
    assert c.out().startswith(b"HTTP/1.1 200 ")
    assert c.transport.disconnecting


def test_a_client_that_stops_reading_pauses_the_producer_and_reading():
    c = Conn()
    c.send(GET)
    r = c.res.requests[0]

    class Producer:
        paused = 0
        resumed = 0

        def pauseProducing(self):
            self.paused += 1

        def resumeProducing(self):
            self.resumed += 1

        def stopProducing(self):
            pass

    p = Producer()
    r.registerProducer(p, True)
    c.proto.pauseProducing()  # what the transport says when its buffer is full
    assert p.paused == 1
    assert c.transport.producerState == "producing"  # still reading while answering
    c.proto.resumeProducing()
    assert p.resumed == 1
    r.unregisterProducer()
    answer(r)
    c.proto.pauseProducing()  # not answering: stop reading until the client reads
    assert c.transport.producerState == "paused"
    c.proto.resumeProducing()
    assert c.transport.producerState == "producing"


def test_pipelined_bytes_beyond_the_eager_limit_pause_reading_until_answered():
    c = Conn()
    c.send(GET)
    body = b"x" * (EAGER_READ + 1)
    c.send(b"POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert c.transport.producerState == "paused"
    answer(c.res.requests[0])
    assert c.transport.producerState == "producing"
    assert c.res.requests[1].content.read() == body


def test_a_client_that_leaves_fails_the_request_in_progress():
    c = Conn()
    c.send(GET)
    r = c.res.requests[0]
    failures = []
    r.notifyFinish().addErrback(failures.append)
    c.proto.connectionLost()
    assert len(failures) == 1 and r._disconnected


def test_idle_timeout_counts_from_the_last_bytes_and_not_while_answering():
    c = Conn(idle_timeout=10)
    c.clock.advance(6)
    c.send(b"GET /a HTTP/1.1\r\n")  # a partial head resets the idle clock
    c.clock.advance(6)
    assert not c.transport.disconnecting
    c.send(b"Host: gw\r\n\r\n")
    c.clock.advance(60)  # answering: no idle timeout
    assert not c.transport.disconnecting
    answer(c.res.requests[0])
    c.clock.advance(9.9)
    assert not c.transport.disconnecting
    c.clock.advance(0.2)
    assert c.transport.disconnecting


def test_a_head_not_whole_within_the_header_timeout_is_408():
    c = Conn()
    timeout = c.gw.config.limits.header_timeout
    c.send(b"GET /a HTTP/1.1\r\nHost: g")
    c.clock.advance(timeout - 0.1)
    c.send(b"w\r\nX-A: 1\r\n")
    assert not c.transport.disconnecting
    c.clock.advance(0.2)
    assert c.out().startswith(b"HTTP/1.1 408 ")
    assert c.transport.disconnecting


def test_a_head_sent_in_pieces_over_the_limit_is_refused():
    c = Conn()
    c.send(b"GET /a HTTP/1.1\r\nX-Long: ")
    for _ in range(40):
        if c.transport.disconnecting:
            break
        c.send(b"a" * 1024)
    assert c.out().startswith(b"HTTP/1.1 431 ")
    assert c.transport.disconnecting


def test_answers_carry_server_and_a_current_date():
    from twisted.web.http import datetimeToString, stringToDatetime

    from yugongd.site import http_date

    c = Conn()
    c.send(GET)
    answer(c.res.requests[0])
    head = c.out().split(b"\r\n\r\n")[0].split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in head[1:])
    assert fields[b"Server"] == server.version
    import time

    assert abs(stringToDatetime(fields[b"Date"]) - time.time()) < 2
    for _ in range(3):
        before = datetimeToString()
        got = http_date()
        assert got in (before, datetimeToString())


def test_a_resource_answering_with_bytes_and_a_failing_one():
    class Bytes(resource.Resource):
        isLeaf = True

        def render(self, request):
            if request.path == b"/boom":
                raise RuntimeError("boom")
            return b"hello"

    c = Conn()
    c.site.resource = Bytes()
    c.send(GET)
    out = c.out()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nhello")
    c.send(b"GET /boom HTTP/1.1\r\n\r\n")
    assert c.out().startswith(b"HTTP/1.1 500 ")
