"""The access log: the line of a success, a failover and a rejection (text and JSON), with
no key and no body in it; quoting of client-supplied values; the on/off switch."""

from __future__ import annotations

import json

import attrs
import pytest
from test_metrics import ALICE, BOB, Client, key_id, make_gateway
from test_proxy_memory import respond
from twisted.logger import Logger, formatEvent

from yugongd import accesslog
from yugongd.config import AccessLogConfig
from yugongd.model import Call, Outcome, Usage

PROMPT = "PROMPT-TEXT-never-logged"
ANSWER = json.dumps(
    {
        "choices": [{"message": {"content": "ANSWER-TEXT-never-logged"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
).encode()
POOL_SECRETS = ("sk-key-0000000000000000", "sk-key-0000000000000001")


@pytest.fixture
def events(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(accesslog, "log", Logger(namespace="yugongd.access", observer=seen.append))
    return seen


def lines(events) -> list[str]:
    return [formatEvent(e) for e in events]


def assert_clean(line: str) -> None:
    for secret in (*POOL_SECRETS, ALICE, BOB, PROMPT, "ANSWER-TEXT"):
        assert secret not in line
    # not even a recognisable part of a key
    assert "sk-key" not in line and "sk-alice" not in line


def chat(model: str = "gpt-4o-mini") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}]}


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split(" "))


def with_format(gw, fmt: str, enabled: bool = True) -> None:
    gw.config = attrs.evolve(gw.config, access_log=AccessLogConfig(enabled=enabled, format=fmt))


def test_success_line(events):
    gw, clock, agent = make_gateway()
    c = Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    clock.advance(0.2)
    respond(agent.calls[0][4], 200, ANSWER)
    status, headers, _ = c.response()
    assert status == 200
    [line] = lines(events)
    assert_clean(line)
    f = fields(line)
    assert f == {
        "request_id": headers["x-request-id"],
        "client": "127.0.0.1",
        "account": "alice",
        "model": "gpt-4o-mini",
        "method": "POST",
        "endpoint": "/chat/completions",
        "stream": "false",
        "status": "200",
        "code": "-",
        "attempts": "1",
        "key": key_id(gw, agent, 0),
        "prompt_tokens": "3",
        "completion_tokens": "4",
        "estimated": "false",
        "cost_usd": "0.00000285",
        "latency_ms": "200",
        "added_ms": "0",
        "bytes_out": str(len(ANSWER)),
        "client_gone": "false",
    }
    assert events[0]["log_namespace"] == "yugongd.access"
    assert events[0]["access"]["status"] == 200


def test_failover_line_json(events):
    gw, clock, agent = make_gateway()
    with_format(gw, "json")
    c = Client(gw).send("POST", "/v1/chat/completions", chat(), ALICE)
    respond(agent.calls[0][4], 429, b'{"error": {"code": "rate_limit_exceeded"}}')
    clock.advance(0.1)
    respond(agent.calls[1][4], 200, ANSWER)
    assert c.response()[0] == 200
    [line] = lines(events)
    assert_clean(line)
    doc = json.loads(line)
    assert doc["attempts"] == 2
    assert doc["key"] == key_id(gw, agent, 1) != key_id(gw, agent, 0)
    assert doc["status"] == 200 and doc["code"] is None
    assert doc["account"] == "alice"
    assert (doc["prompt_tokens"], doc["completion_tokens"]) == (3, 4)
    assert doc["latency_ms"] == 100.0 and doc["added_ms"] == 0.0
    assert list(doc) == [
        "request_id", "client", "account", "model", "method", "endpoint", "stream", "status",
        "code", "attempts", "key", "prompt_tokens", "completion_tokens", "estimated",
        "cost_usd", "latency_ms", "added_ms", "bytes_out", "client_gone",
    ]  # fmt: skip


def test_rejection_lines(events):
    gw, clock, agent = make_gateway()
    assert (
        Client(gw).send("POST", "/v1/chat/completions", chat(), "sk-wrong-key-12345").response()[0]
        == 401
    )
    assert Client(gw).send("POST", "/v1/chat/completions", chat("gpt-4o"), BOB).response()[0] == 403
    unknown, denied = lines(events)
    for line in (unknown, denied):
        assert_clean(line)
        assert "sk-wrong-key" not in line
    f = fields(unknown)
    assert (f["status"], f["code"], f["account"], f["attempts"], f["key"]) == (
        "401",
        "invalid_api_key",
        "-",
        "0",
        "-",
    )
    f = fields(denied)
    assert (f["status"], f["code"], f["account"], f["model"]) == (
        "403",
        "model_not_allowed",
        "bob",
        "gpt-4o",
    )
    assert not agent.calls


def test_client_supplied_values_cannot_forge_a_line(events):
    gw, clock, agent = make_gateway()
    evil = 'x\nrequest_id=forged status=200 "quoted"'
    assert Client(gw).send("POST", "/v1/chat/completions", chat(evil), BOB).response()[0] == 403
    [line] = lines(events)
    assert "\n" not in line
    assert "model=" + json.dumps(evil) in line
    assert line.count("request_id=") == 2  # the real one, and the one inside the quoted model


def test_long_values_are_cut():
    call = Call(request_id="r", endpoint="/x" * 500, method="GET", client_ip="", started=0.0)
    record = accesslog.access_record(call, Outcome(status=404))
    assert len(record["endpoint"]) == accesslog.MAX_VALUE + 1


def test_record_of_a_request_with_usage():
    call = Call(
        request_id="r1", endpoint="/embeddings", method="POST", client_ip="10.0.0.1", started=0
    )
    outcome = Outcome(
        status=200,
        attempts=1,
        key_id="main-1",
        latency=0.5,
        upstream_latency=0.498,
        usage=Usage(prompt_tokens=10, total_tokens=10, cost_usd=0.0000002),
    )
    line = accesslog.format_text(accesslog.access_record(call, outcome))
    f = fields(line)
    assert f["cost_usd"] == "0.0000002"
    assert f["added_ms"] == "2"
    assert f["latency_ms"] == "500"
    assert f["account"] == "-"


def test_access_log_off(events):
    gw, clock, agent = make_gateway()
    with_format(gw, "text", enabled=False)
    assert Client(gw).send("POST", "/v1/chat/completions", chat(), None).response()[0] == 401
    assert events == []


def test_the_accesslog_plugin_can_be_disabled(events):
    gw, clock, agent = make_gateway()
    gw.pm.set_blocked("accesslog")
    assert Client(gw).send("POST", "/v1/chat/completions", chat(), None).response()[0] == 401
    assert events == []


def test_memoised_log_timestamps_are_twisteds_own(monkeypatch):
    """yugongd.logtime makes twistd's line timestamps once a second; the text must be what
    Twisted writes, also across a daylight-saving change and for other formats."""
    import time as _time

    from twisted.logger._format import formatTime

    from yugongd.logtime import memo_format_time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    _time.tzset()
    try:
        memo = memo_format_time()
        start = 1711846800.0 - 3 * 3600  # 2024-03-31, three hours before the clocks go forward
        seen = set()
        for i in range(0, 6 * 3600 * 4):  # every quarter second over six hours
            when = start + i * 0.25
            assert memo(when) == formatTime(when), when
            seen.add(memo(when)[-5:])
        assert seen == {"+0100", "+0200"}  # the change was crossed
        assert memo(start, "%H:%M:%S.%f") == formatTime(start, "%H:%M:%S.%f")
        assert memo(None) == formatTime(None) == "-"
    finally:
        monkeypatch.delenv("TZ")
        _time.tzset()


def test_twistd_log_observer_uses_the_memo():
    from twisted.logger import _file

    from yugongd import logtime

    logtime.install()
    logtime.install()  # twice is harmless
    assert _file.formatTime.__name__ == "format_time"


def test_access_lines_are_formatted_as_twisted_formats_them():
    """logtime.classic_text skips string.Formatter for access lines; every event must come
    out as Twisted's formatEventAsClassicLogText writes it."""
    from twisted.logger import LogLevel, formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from yugongd.logtime import LINE_FORMAT, classic_text

    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_format": LINE_FORMAT, "log_time": 1711846800.25, "log_level": LogLevel.info}
    events = [
        {**base, "access_line": "request_id=r1 status=200", "log_namespace": "yugongd.access"},
        {**base, "access_line": "two\nlines", "log_namespace": "yugongd.access"},
        {**base, "access_line": ""},
        {**base, "access_line": "no namespace"},
        {**base, "access_line": "no level", "log_level": None},
        {**base, "access_line": "sys", "log_system": "HTTPChannel,3,127.0.0.1"},
        {**base, "access_line": "failed", "log_failure": failure},
        {**base, "access_line": 42},
        {**base, "access_line": "{braces} stay"},
        {**base},  # the field missing
        {"log_format": "other {x}", "x": 1, "log_time": 1.0, "log_level": LogLevel.warn},
        {"log_time": 1.0},
    ]
    for event in events:
        assert classic_text(dict(event)) == formatEventAsClassicLogText(dict(event)), event


def test_twistd_log_observer_formats_access_lines_the_short_way():
    from twisted.logger import _file

    from yugongd import logtime

    logtime.install()
    assert _file.formatEventAsClassicLogText is logtime.classic_text


def test_the_access_event_is_the_one_logger_info_makes(monkeypatch):
    """accesslog.emit builds the event itself (skipping Logger.emit's level check): it must
    carry what log.info(LINE_FORMAT, access_line=..., access=...) would."""
    from yugongd.logtime import LINE_FORMAT

    ours: list[dict] = []
    theirs: list[dict] = []
    monkeypatch.setattr(accesslog, "log", Logger(namespace="yugongd.access", observer=ours.append))
    gw, clock, agent = make_gateway()
    Client(gw).send("POST", "/v1/chat/completions", chat(), None)
    (event,) = ours
    Logger(namespace="yugongd.access", observer=theirs.append).info(
        LINE_FORMAT, access_line=event["access_line"], access=event["access"]
    )
    (expected,) = theirs
    assert set(event) == set(expected)
    for name in expected:
        if name not in ("log_time", "log_logger"):
            assert event[name] == expected[name], name
    assert abs(event["log_time"] - expected["log_time"]) < 5
