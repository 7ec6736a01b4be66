"""Property-based tests (hypothesis) for what reads untrusted bytes: the SSE usage scanner,
the rate-limit header parsers, the config loader and the client-side HTTP channel."""

from __future__ import annotations

import json
import math
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yugongd.config import _TOP_KEYS, ConfigError, load_config, parse_config
from yugongd.ratelimit import parse_duration, parse_int, parse_retry_after
from yugongd.usage import SSEUsageScanner

#: derandomized: the same examples on every run, so the suite cannot fail by chance (a
#: failing example found while writing a test is fixed, not left for the next run to meet)
FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the SSE usage scanner ------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def run(scanner: SSEUsageScanner, pieces: list[bytes]) -> bytes:
    return b"".join(scanner.feed(p) for p in pieces) + scanner.finish()


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
content_event = st.builds(
    lambda t: b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}).encode(),
    texts,
)
usage_event = st.builds(
    lambda p, c: (
        b"data: "
        + json.dumps(
            {
                "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }
        ).encode()
    ),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
junk_event = st.one_of(
    st.just(b"data: [DONE]"),
    st.just(b": keep-alive"),
    st.just(b'data: {"usage": null, "choices": [{"delta": {"content": "x"}}]}'),
    st.just(b'data: {"usage": [1, 2'),
    st.builds(
        lambda b: b"data: " + b.replace(b"\n", b"").replace(b"\r", b""), st.binary(max_size=40)
    ),
    st.builds(lambda t: b"event: " + t.encode().replace(b"\n", b""), texts),
)
terminators = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"])


@st.composite
def sse_streams(draw: Any) -> tuple[list[bytes], bytes]:
    """(events with their terminators, the whole stream)."""
    events = draw(st.lists(st.one_of(content_event, usage_event, junk_event), max_size=12))
    whole = [e + draw(terminators) for e in events]
    return whole, b"".join(whole)


@FAST
@given(sse_streams(), st.lists(st.integers(0, 10**6), max_size=20), st.booleans())
def test_any_chunking_of_a_stream_gives_the_same_result(stream, cuts, strip):
    _, data = stream
    whole = SSEUsageScanner(strip)
    expected = run(whole, [data])
    pieces = SSEUsageScanner(strip)
    assert run(pieces, chunked(data, cuts)) == expected
    assert (pieces.usage, pieces.text_chars) == (whole.usage, whole.text_chars)
    byte_by_byte = SSEUsageScanner(strip)
    assert run(byte_by_byte, [data[i : i + 1] for i in range(len(data))]) == expected
    assert byte_by_byte.usage == whole.usage


@FAST
@given(sse_streams(), st.lists(st.integers(0, 10**6), max_size=10))
def test_without_stripping_the_client_gets_the_bytes_unchanged(stream, cuts):
    _, data = stream
    scanner = SSEUsageScanner(False)
    for piece in chunked(data, cuts):
        assert scanner.feed(piece) == piece
    assert scanner.finish() == b""


@FAST
@given(sse_streams(), st.lists(st.integers(0, 10**6), max_size=10))
def test_stripping_removes_exactly_the_usage_only_chunks(stream, cuts):
    events, data = stream
    scanner = SSEUsageScanner(True)
    out = run(scanner, chunked(data, cuts))
    kept = [e for e in events if not e.startswith(b'data: {"choices": [], "usage": {')]
    assert out == b"".join(kept)
    usages = [e for e in events if e.startswith(b'data: {"choices": [], "usage": {')]
    if usages:
        last = json.loads(usages[-1].strip()[len(b"data: ") :])["usage"]
        assert scanner.usage == (last["prompt_tokens"], last["completion_tokens"])


@FAST
@given(st.binary(max_size=3000), st.lists(st.integers(0, 10**6), max_size=20), st.booleans())
def test_garbage_never_raises_and_is_relayed_whole(data, cuts, strip):
    scanner = SSEUsageScanner(strip)
    out = run(scanner, chunked(data, cuts))
    if not strip:
        assert out == data
    else:
        # stripping removes only well-formed usage chunks, which random bytes are not
        assert len(out) <= len(data)


class SmallEvents(SSEUsageScanner):
    max_event = 64


class SmallBatches(SSEUsageScanner):
    batch = 16


@FAST
@given(sse_streams(), st.lists(st.integers(0, 10**6), max_size=20), st.booleans())
def test_scanning_in_small_batches_finds_the_same(stream, cuts, strip):
    """The scan works on batches of whole lines: where a batch ends changes nothing."""
    _, data = stream
    whole = SSEUsageScanner(strip)
    expected = run(whole, [data])
    small = SmallBatches(strip)
    assert run(small, chunked(data, cuts)) == expected
    assert (small.usage, small.text_chars) == (whole.usage, whole.text_chars)


@FAST
@given(
    st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=40),
    st.booleans(),
)
def test_an_event_that_never_ends_is_not_held_back_without_bound(pieces, strip):
    scanner = SmallEvents(strip)
    fed = emitted = 0
    for piece in pieces:
        fed += len(piece)
        emitted += len(scanner.feed(piece))
        if strip:
            assert fed - emitted <= SmallEvents.max_event + len(piece)
        else:
            assert fed == emitted
    emitted += len(scanner.finish())
    if strip:
        assert emitted <= fed


def test_deeply_nested_usage_does_not_raise():
    scanner = SSEUsageScanner(True)
    event = b'data: {"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n"
    assert scanner.feed(event) == event and scanner.usage is None


# -- rate-limit header parsers ----------------------------------------------------------------

header_values = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["inf", "-inf", "nan", "1e999", "-1", "0x10", "1_000", "١٢", " 7 ", "6m0s"]),
)


@FAST
@given(header_values)
def test_header_parsers_never_raise_and_never_go_negative(value):
    for parse in (parse_duration, parse_retry_after):
        result = parse(value)
        assert result is None or (isinstance(result, float) and result >= 0), (parse, result)
    n = parse_int(value)
    assert n is None or (isinstance(n, int) and n >= 0)


@FAST
@given(
    st.integers(0, 48),
    st.integers(0, 59),
    st.floats(0, 59.999, allow_nan=False).map(lambda x: round(x, 3)),
    st.integers(0, 999),
)
def test_durations_add_up(h, m, s, ms):
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + f"{s:g}s" + (f"{ms}ms" if ms else "")
    assert math.isclose(parse_duration(text), h * 3600 + m * 60 + s + ms / 1000, abs_tol=1e-6)
    assert math.isclose(parse_duration(text.encode()), parse_duration(text))


@FAST
@given(st.integers(0, 10**12))
def test_integers_and_seconds_read_back(n):
    assert parse_int(str(n)) == n
    assert parse_retry_after(str(n)) == float(n)
    assert parse_retry_after(f"{n}", now=0.0) == float(n)


# -- the config loader -----------------------------------------------------------------------

SECRET = "sk-property-secret-0123456789"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
known = st.sampled_from(_TOP_KEYS)  # every top-level key the loader knows


@st.composite
def near_configs(draw: Any) -> dict[str, Any]:
    """A valid config whose secrets (pool key, admin token, account key) stay put while
    other sections are replaced by arbitrary values: an error about those must not echo
    a secret."""
    config: dict[str, Any] = {
        "upstreams": [
            {
                "name": "u",
                "base_url": "http://127.0.0.1:1/v1",
                "keys": [{"id": "k", "key": SECRET}],
            }
        ],
        "admin": {"token": SECRET + "-admin"},
        "accounts": [{"name": "a", "key": SECRET + "-acct"}],
    }
    for name in draw(st.lists(known, max_size=3)):
        config[name] = draw(values)
    if draw(st.booleans()):
        section = draw(st.sampled_from(["limits", "pool", "failover", "access_log"]))
        config[section] = draw(st.dictionaries(st.text(max_size=15), scalars, max_size=3))
    return config


@FAST
@given(near_configs())
def test_the_loader_accepts_or_names_the_problem_in_one_line(data):
    try:
        config = parse_config(data, "prop.yaml", environ={})
    except ConfigError as e:
        message = str(e)
        assert message.startswith("prop.yaml: ")
        assert "\n" not in message
        assert SECRET not in message
    else:
        assert config.upstreams and config.limits.max_body >= 1


@FAST
@given(values)
def test_any_yaml_document_is_accepted_or_refused_cleanly(data):
    try:
        parse_config(data, "any.yaml", environ={})
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("any.yaml")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_a_file_of_random_bytes_is_refused_in_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "random.yaml"
    path.write_bytes(data)
    try:
        load_config(str(path), environ={})
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@FAST
@given(
    st.integers(1, 2**40),
    st.floats(0.001, 10**6, allow_nan=False),
    st.floats(0.001, 10**6, allow_nan=False),
    st.integers(1, 10**6),
)
def test_limits_read_back(max_body, idle, header, connections):
    text = yaml.safe_dump(
        {
            "upstreams": [{"name": "u", "base_url": "http://h/v1"}],
            "limits": {
                "max_body": max_body,
                "idle_timeout": idle,
                "header_timeout": header,
                "max_connections": connections,
            },
        }
    )
    limits = parse_config(yaml.safe_load(text), "x.yaml", environ={}).limits
    assert (limits.max_body, limits.idle_timeout, limits.header_timeout) == (max_body, idle, header)
    assert limits.max_connections == connections


# -- the client-side HTTP channel -------------------------------------------------------------

_REQUEST = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "DELETE"]),
        "path": st.from_regex(r"/[a-z0-9/_.-]{0,40}(\?[a-z0-9=&]{0,20})?", fullmatch=True),
        "headers": st.lists(
            st.tuples(
                st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True),
                st.from_regex(r"[ -~]{0,60}", fullmatch=True).map(str.strip),
            ),
            max_size=6,
        ),
        "body": st.binary(max_size=300),
        "chunked": st.booleans(),
    }
)


def _wire(req: dict) -> bytes:
    head = [f"{req['method']} {req['path']} HTTP/1.1", "Host: gw"]
    head += [f"{n}: {v}" for n, v in req["headers"]]
    body = req["body"]
    if req["chunked"]:
        head.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def _serve(pieces: list[bytes]) -> list[tuple]:
    from test_channel import Conn, answer

    c = Conn()
    seen = []
    for piece in pieces:
        c.send(piece)
        while len(seen) < len(c.res.requests):  # answer each as it is handed over
            r = c.res.requests[len(seen)]
            seen.append(
                (
                    r.method,
                    r.uri,
                    [(n, v) for n, vs in r.requestHeaders.getAllRawHeaders() for v in vs],
                    r.content.read(),
                )
            )
            answer(r)
    assert not c.transport.disconnecting
    return seen


@FAST
@given(st.lists(_REQUEST, min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=8))
def test_pipelined_requests_read_the_same_however_the_bytes_are_split(requests, cuts):
    data = b"".join(_wire(r) for r in requests)
    whole = _serve([data])
    assert len(whole) == len(requests)
    for got, req in zip(whole, requests, strict=True):
        assert got[0] == req["method"].encode() and got[1] == req["path"].encode()
        assert got[3] == req["body"]
    assert _serve(chunked(data, cuts)) == whole
