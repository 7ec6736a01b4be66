"""The proxy driven in memory: raw HTTP bytes into the real Site over a StringTransport,
a fake upstream Agent whose responses the test writes, and a fake clock. No sockets,
no real time: cooldowns, queueing, timeouts and probes are checked exactly."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web._newclient import Response
from twisted.web.http_headers import Headers

from yugongd.config import Config, FailoverConfig, KeyConfig, PoolConfig, Timeouts, UpstreamConfig
from yugongd.gateway import Gateway
from yugongd.site import GatewaySite
from yugongd.state import MemoryState


class FakeAgent:
    """Records upstream requests; the test answers them."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, Headers, bytes, defer.Deferred]] = []

    def request(self, method, url, headers=None, body=None):
        data = b""
        if body is not None:
            sink = []
            body.startProducing(type("C", (), {"write": lambda self, d: sink.append(d)})())
            data = b"".join(sink)
        d: defer.Deferred = defer.Deferred()
        self.calls.append((method, url, headers, data, d))
        return d

    def key_of(self, i: int) -> bytes:
        return self.calls[i][2].getRawHeaders(b"authorization")[0][len(b"Bearer ") :]


def respond(d, status=200, body=b"", headers=None, finish=True):
    hdrs = Headers({b"content-type": [b"application/json"]})
    for k, v in (headers or {}).items():
        hdrs.setRawHeaders(k.encode(), [v.encode()])
    transport = StringTransport()
    response = Response._construct((b"HTTP", 1, 1), status, b"X", hdrs, transport, None)
    d.callback(response)
    if body:
        response._bodyDataReceived(body)
    if finish:
        response._bodyDataFinished()
    return response


def make_gateway(keys=2, settings=None, **pool):
    """A gateway on a fake clock and a :class:`FakeAgent`: ``keys`` keys of one upstream,
    ``pool`` settings over the test defaults, other ``settings`` (Config fields) as given."""
    up = UpstreamConfig(
        name="up",
        base_url="http://upstream/v1",
        timeouts=Timeouts(connect=1, first_byte=5, idle=5),
        keys=tuple(KeyConfig(id=f"k{i}", key=f"sk-key-{i:016d}") for i in range(keys)),
    )
    config = Config(
        source="<test>",
        upstreams=(up,),
        pool=PoolConfig(**{"cooldown": 20.0, "queue_timeout": 10.0, **pool}),
        failover=FailoverConfig(attempts=3),
        **(settings or {}),
    )
    clock = MemoryReactorClock()
    gw = Gateway(config, clock, MemoryState())
    gw.start()
    agent = FakeAgent()
    gw.agent_for = lambda upstream: agent  # type: ignore[method-assign]
    return gw, clock, agent


class Client:
    """One HTTP connection to the gateway's Site, in memory."""

    def __init__(self, gw: Gateway, transport_class: type = StringTransport) -> None:
        self.site = GatewaySite(gw)
        self.proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        self.transport = transport_class(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
        )
        self.proto.makeConnection(self.transport)

    def post(self, path: str, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.proto.dataReceived(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    def response(self) -> tuple[int, dict[str, str], bytes]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            out, rest = b"", body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2 :]
            body = out
        return status, headers, body


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
OK = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()


def test_failover_to_the_next_key_on_5xx():
    gw, clock, agent = make_gateway()
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    assert len(agent.calls) == 1
    respond(agent.calls[0][4], 500, b'{"error": {"message": "boom", "code": null}}')
    assert len(agent.calls) == 2
    assert agent.key_of(0) != agent.key_of(1)
    assert agent.calls[1][3] == agent.calls[0][3], "the body is replayed"
    respond(agent.calls[1][4], 200, OK)
    status, headers, body = c.response()
    assert status == 200 and body == OK
    failed = next(k for k in gw.pool.keys.values() if k.secret.encode() == agent.key_of(0))
    assert failed.state == "cooling" and failed.last_error.startswith("HTTP 500")


def test_429_cools_the_key_for_retry_after_and_new_requests_wait_for_it():
    gw, clock, agent = make_gateway(keys=1)
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    respond(
        agent.calls[0][4], 429, b'{"error": {"code": "rate_limit_exceeded"}}', {"retry-after": "4"}
    )
    key = gw.pool.keys["k0"]
    assert key.state == "cooling"
    assert key.cooldown_until == pytest.approx(4.0)
    # failover goes to *other* keys only: with one key the upstream's 429 is the answer
    status, headers, _ = c.response()
    assert status == 429 and headers["retry-after"] == "4"
    # a new request waits for the cooling key (it is free within queue_timeout)
    c2 = Client(gw)
    c2.post("/v1/chat/completions", CHAT)
    assert len(agent.calls) == 1
    clock.advance(3.9)
    assert len(agent.calls) == 1
    clock.advance(0.2)
    assert len(agent.calls) == 2, "sent when the key was free again"
    respond(agent.calls[1][4], 200, OK)
    assert c2.response()[0] == 200


def test_429_without_headers_uses_pool_cooldown_doubling():
    gw, clock, agent = make_gateway(keys=1, cooldown=20.0, max_cooldown=600.0, queue_timeout=0.0)
    for expected in (20.0, 40.0, 80.0):
        c = Client(gw)
        c.post("/v1/chat/completions", CHAT)
        respond(agent.calls[-1][4], 429, b'{"error": {"code": "rate_limit_exceeded"}}')
        assert gw.pool.keys["k0"].cooldown_until - clock.seconds() == pytest.approx(expected)
        status, headers, body = c.response()
        assert status == 429
        clock.advance(expected)
    # a success resets the doubling
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    respond(agent.calls[-1][4], 200, OK)
    assert gw.pool.keys["k0"].strikes == 0


def test_pool_exhausted_when_the_soonest_key_is_beyond_queue_timeout():
    gw, clock, agent = make_gateway(keys=2, queue_timeout=5.0)
    gw.pool.cool_down(gw.pool.keys["k0"], 30, "test")
    gw.pool.cool_down(gw.pool.keys["k1"], 12, "test")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    status, headers, body = c.response()
    assert status == 429
    assert json.loads(body)["error"]["code"] == "pool_exhausted"
    assert headers["retry-after"] == "12"
    assert not agent.calls


def test_queue_is_first_come_first_served_and_bounded_in_time():
    gw, clock, agent = make_gateway(keys=1, queue_timeout=10.0)
    gw.pool.cool_down(gw.pool.keys["k0"], 3, "test")
    first, second = Client(gw), Client(gw)
    first.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "1"}]})
    clock.advance(1)
    second.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "2"}]})
    assert len(gw.queue) == 2
    clock.advance(2.01)
    # the key is free: both leave the queue in arrival order
    assert [json.loads(c[3])["messages"][0]["content"] for c in agent.calls] == ["1", "2"]
    assert len(gw.queue) == 0


def test_queued_request_gets_429_at_its_deadline():
    gw, clock, agent = make_gateway(keys=1, queue_timeout=5.0)
    gw.pool.cool_down(gw.pool.keys["k0"], 4, "test")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    assert len(gw.queue) == 1
    gw.pool.cool_down(gw.pool.keys["k0"], 60, "longer")  # the key gets worse meanwhile
    clock.advance(4)
    status, headers, body = c.response()
    assert status == 429 and json.loads(body)["error"]["code"] == "pool_exhausted"
    assert len(gw.queue) == 0


def test_client_leaving_the_queue_is_dropped():
    gw, clock, agent = make_gateway(keys=1)
    gw.pool.cool_down(gw.pool.keys["k0"], 3, "test")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    assert len(gw.queue) == 1
    c.proto.connectionLost(Exception("gone"))
    assert len(gw.queue) == 0
    clock.advance(5)
    assert not agent.calls


def test_no_enabled_key_is_503():
    gw, clock, agent = make_gateway(keys=1)
    gw.pool.disable(gw.pool.keys["k0"], "HTTP 401")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    status, _, body = c.response()
    assert status == 503 and json.loads(body)["error"]["code"] == "no_upstream_key"


def test_revoked_key_is_disabled_and_not_probed_quota_key_is_probed_back():
    gw, clock, agent = make_gateway(keys=2, probe_interval=60.0)
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    first = agent.key_of(0)
    respond(agent.calls[0][4], 401, b'{"error": {"code": "invalid_api_key"}}')
    respond(agent.calls[1][4], 429, b'{"error": {"code": "insufficient_quota"}}')
    assert c.response()[0] == 429
    keys = {k.secret.encode(): k for k in gw.pool.keys.values()}
    revoked, broke = keys[first], keys[agent.key_of(1)]
    assert (revoked.state, revoked.disabled_reason) == ("disabled", "HTTP 401 invalid_api_key")
    assert (broke.state, broke.disabled_reason) == ("disabled", "insufficient_quota")
    n = len(agent.calls)
    clock.advance(60)
    probes = agent.calls[n:]
    assert [(m, u) for m, u, *_ in probes] == [(b"GET", b"http://upstream/v1/models")]
    assert probes[0][2].getRawHeaders(b"authorization") == [b"Bearer " + agent.key_of(1)]
    respond(probes[0][4], 200, b'{"data": []}')
    assert broke.state == "active" and revoked.state == "disabled"


def test_first_byte_timeout_fails_over_and_then_504():
    gw, clock, agent = make_gateway(keys=2)
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    clock.advance(5)  # first_byte
    assert len(agent.calls) == 2
    clock.advance(5)
    status, _, body = c.response()
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"


def test_learned_limits_skip_a_key_without_budget():
    gw, clock, agent = make_gateway(keys=2)
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    used = agent.key_of(0)
    respond(
        agent.calls[0][4],
        200,
        OK,
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "30s",
        },
    )
    key = next(k for k in gw.pool.keys.values() if k.secret.encode() == used)
    assert key.remaining_requests == 0
    for _ in range(4):
        Client(gw).post("/v1/chat/completions", CHAT)
    assert all(agent.key_of(i) != used for i in range(1, 5))
    for i in range(1, 5):
        respond(agent.calls[i][4], 200, OK)
    clock.advance(30)
    assert key.remaining_requests == 100


def test_sse_error_event_when_the_upstream_breaks_off_mid_stream():
    gw, clock, agent = make_gateway(keys=1)
    c = Client(gw)
    c.post("/v1/chat/completions", {**CHAT, "stream": True})
    response = respond(
        agent.calls[0][4], 200, finish=False, headers={"content-type": "text/event-stream"}
    )
    response._bodyDataReceived(b'data: {"choices": [{"delta": {"content": "abc"}}]}\n\n')
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseFailed

    response._bodyDataFinished(Failure(ResponseFailed([Failure(ConnectionError("cut"))])))
    status, headers, body = c.response()
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert json.loads(events[-1][len(b"data: ") :])["error"]["code"] == "upstream_unavailable"
    row = gw.state.rows[-1]
    assert row.estimated and row.status == 200


def test_a_plugin_that_raises_does_not_lose_the_ledger_row():
    from yugongd import hookimpl

    class Broken:
        @hookimpl
        def yugongd_request_finished(self, call, outcome):
            raise RuntimeError("plugin bug")

        @hookimpl
        def yugongd_usage(self, call, key, usage):
            raise RuntimeError("plugin bug")

    gw, clock, agent = make_gateway(keys=1)
    gw.pm.register(Broken(), name="broken")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    respond(agent.calls[0][4], 200, OK)
    assert c.response()[0] == 200
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in gw.state.rows] == [
        (200, 3, 4)
    ]
    assert not gw.inflight


def test_a_plugin_raising_in_authentication_or_key_choice_gets_a_500_envelope():
    from yugongd import hookimpl

    class Broken:
        @hookimpl
        def yugongd_select_key(self, call, candidates):
            raise RuntimeError("plugin bug")

    gw, clock, agent = make_gateway(keys=1)
    gw.pm.register(Broken(), name="broken")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    status, _, body = c.response()
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert not gw.inflight and gw.state.rows[-1].status == 500

    class BrokenAuth:
        @hookimpl
        def yugongd_authenticate(self, request, token):
            raise RuntimeError("plugin bug")

    gw.pm.unregister(name="broken")
    gw.pm.register(BrokenAuth(), name="broken-auth")
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    status, _, body = c.response()
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"


class CountingTransport(StringTransport):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, seq) -> None:
        self.writes += 1
        super().writeSequence(seq)


def _counting_client(gw) -> Client:
    return Client(gw, CountingTransport)


def test_a_json_answer_goes_to_the_client_in_one_write():
    gw, clock, agent = make_gateway()
    client = _counting_client(gw)
    client.post("/v1/chat/completions", CHAT)
    respond(agent.calls[0][4], body=OK)
    # head and body together (twisted.web alone writes the head, then the body)
    assert client.transport.writes == 1
    status, _, body = client.response()
    assert status == 200 and body == OK


def test_a_json_answer_still_in_flight_is_sent_when_the_upstream_read_is_done():
    gw, clock, agent = make_gateway()
    client = _counting_client(gw)
    client.post("/v1/chat/completions", CHAT)
    response = respond(agent.calls[0][4], body=OK[:10], finish=False)
    assert client.transport.value() == b""  # held while the read is being delivered
    response._bodyProtocol.read_done()  # what yugongd's upstream client says after a read
    assert client.transport.writes == 1
    assert client.transport.value().startswith(b"HTTP/1.1 200 ")
    assert OK[:10] in client.transport.value()
    response._bodyDataReceived(OK[10:])
    response._bodyDataFinished()
    status, _, body = client.response()
    assert status == 200 and body == OK


def test_an_error_answer_goes_to_the_client_in_one_write():
    gw, clock, agent = make_gateway(keys=0)
    client = _counting_client(gw)
    client.post("/v1/chat/completions", CHAT)
    assert client.transport.writes == 1
    status, _, body = client.response()
    assert status == 503 and json.loads(body)["error"]["code"]


def test_request_ids_are_fresh_random_hex_and_a_forked_child_does_not_reuse_them():
    import os
    import re

    from yugongd import site

    ids = [site._random_hex() for _ in range(1000)]  # crosses a refill of the pool
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    site._random_hex()  # the pool now holds unused ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its pool starts empty
        os.write(write, b"empty" if not site._random else b"inherited")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 20) == b"empty"
    os.close(read)
    os.close(write)


def test_the_idle_timeout_counts_from_the_last_upstream_bytes():
    gw, clock, agent = make_gateway(keys=1)  # timeouts.idle = 5
    c = Client(gw)
    c.post("/v1/chat/completions", {**CHAT, "stream": True})
    response = respond(
        agent.calls[0][4], 200, finish=False, headers={"content-type": "text/event-stream"}
    )
    upstream = response._transport
    event = b'data: {"choices": [{"delta": {"content": "abc"}}]}\n\n'
    for _ in range(4):  # bytes every 4 s: never idle for 5
        clock.advance(4)
        response._bodyDataReceived(event)
    assert upstream.producerState == "producing"
    clock.advance(4.9)
    assert upstream.producerState == "producing"
    clock.advance(0.2)  # 5.1 s since the last bytes
    assert upstream.producerState == "stopped"


def test_headers_parsed_by_our_client_reach_the_client_canonical_and_filtered():
    from yugongd.httpclient import ResponseHeaders

    gw, clock, agent = make_gateway()
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    hdrs = ResponseHeaders(
        [
            (b"content-type", b"application/json"),
            (b"x-ratelimit-remaining-requests", b"99"),
            (b"openai-processing-ms", b"12 "),
            (b"connection", b"keep-alive, x-hop"),
            (b"x-hop", b"1"),
            (b"set-cookie", b"a=b"),
            (b"content-length", b"%d" % len(OK)),
            (b"x-many", b"1"),
            (b"x-many", b"2"),
        ]
    )
    response = Response._construct((b"HTTP", 1, 1), 200, b"OK", hdrs, StringTransport(), None)
    agent.calls[0][4].callback(response)
    response._bodyDataReceived(OK)
    response._bodyDataFinished()
    raw = c.transport.value()
    head = raw.split(b"\r\n\r\n")[0]
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert b"\r\nX-Ratelimit-Remaining-Requests: 99\r\n" in head
    assert b"\r\nOpenai-Processing-Ms: 12 \r\n" in head
    assert b"\r\nX-Many: 1\r\nX-Many: 2\r\n" in head
    assert b"X-Hop" not in head and b"Set-Cookie" not in head and b"keep-alive" not in head
    assert head.count(b"Content-Length") == 1 and b"\r\nContent-Length: %d\r\n" % len(OK) in head
    assert c.response()[2] == OK
