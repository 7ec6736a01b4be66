"""The SSE usage scanner, JSON usage, and prices."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from yugongd.config import Price
from yugongd.usage import PriceTable, SSEUsageScanner, make_usage, usage_from_json


def chunk(content=None, usage=None, choices=True):
    doc = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    doc["choices"] = [{"index": 0, "delta": {"content": content}}] if choices else []
    doc["usage"] = usage
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
STREAM = (
    chunk("Hel")
    + chunk("lo, ")
    + chunk("world")
    + chunk(None, usage=USAGE, choices=False)
    + b"data: [DONE]\n\n"
)
WITHOUT_USAGE = chunk("Hel") + chunk("lo, ") + chunk("world") + b"data: [DONE]\n\n"


def relay(scanner, pieces):
    out = b"".join(scanner.feed(p) for p in pieces)
    return out + scanner.finish()


def test_usage_found_and_kept_when_client_asked():
    s = SSEUsageScanner(strip_usage=False)
    assert relay(s, [STREAM]) == STREAM
    assert s.usage == (11, 7)


def test_usage_chunk_removed_when_yugongd_asked():
    s = SSEUsageScanner(strip_usage=True)
    assert relay(s, [STREAM]) == WITHOUT_USAGE
    assert s.usage == (11, 7)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12), st.booleans())
def test_any_split_gives_the_same_result(cuts, strip):
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=False)]
    s = SSEUsageScanner(strip_usage=strip)
    assert relay(s, pieces) == (WITHOUT_USAGE if strip else STREAM)
    assert s.usage == (11, 7)


def test_every_single_byte_split():
    s = SSEUsageScanner(strip_usage=True)
    out = relay(s, [STREAM[i : i + 1] for i in range(len(STREAM))])
    assert out == WITHOUT_USAGE
    assert s.usage == (11, 7)


def test_stream_without_usage_counts_text_for_the_estimate():
    s = SSEUsageScanner(strip_usage=True)
    relay(s, [WITHOUT_USAGE])
    assert s.usage is None
    assert s.text_chars == len("Hello, world")


def test_crlf_events():
    stream = STREAM.replace(b"\n\n", b"\r\n\r\n")
    s = SSEUsageScanner(strip_usage=True)
    assert relay(s, [stream]) == WITHOUT_USAGE.replace(b"\n\n", b"\r\n\r\n")
    assert s.usage == (11, 7)


def test_responses_api_usage_event():
    event = (
        b"event: response.completed\ndata: "
        + json.dumps(
            {
                "type": "response.completed",
                "response": {"usage": {"input_tokens": 5, "output_tokens": 9}},
            }
        ).encode()
        + b"\n\n"
    )
    s = SSEUsageScanner(strip_usage=False)
    relay(s, [event])
    assert s.usage == (5, 9)


def test_usage_from_json_shapes():
    assert usage_from_json(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == (3, 4)
    assert usage_from_json(b'{"usage": {"prompt_tokens": 8, "total_tokens": 8}}') == (8, 0)
    assert usage_from_json(b'{"usage": {"input_tokens": 2, "output_tokens": 5}}') == (2, 5)
    assert usage_from_json(b"not json") is None
    assert usage_from_json(b"[1]") is None


def test_prices_exact_dated_glob_and_config_override():
    table = PriceTable({"gpt-4o-mini": Price(input=1.0, output=2.0), "my-*": Price(request=0.5)})
    assert table.cost("gpt-4o-mini", 1_000_000, 500_000) == 2.0
    assert table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == 1.0
    assert table.cost("my-model", 10, 10) == 0.5
    assert table.cost("gpt-4o", 1_000_000, 0) == 2.5  # shipped default
    assert table.cost("unknown-model", 1000, 1000) == 0.0


def test_make_usage_marks_estimates():
    table = PriceTable({})
    counted = make_usage(table, "gpt-4o-mini", (10, 20), (99, 99))
    assert (counted.prompt_tokens, counted.completion_tokens, counted.estimated) == (10, 20, False)
    estimated = make_usage(table, "gpt-4o-mini", None, (99, 1))
    assert (estimated.total_tokens, estimated.estimated) == (100, True)
