"""Bad and hostile client input, in memory: the daemon answers clearly and stays up."""

from __future__ import annotations

import json

import pytest
from test_proxy_memory import CHAT, OK, Client, make_gateway, respond

from yugongd.config import AccountConfig


def raw(client: Client, data: bytes) -> tuple[int, dict[str, str], bytes]:
    client.proto.dataReceived(data)
    return client.response()


def post(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../admin/keys",
        b"/v1/%2e%2e/admin/keys",
        b"/v1/%2E%2E/admin/keys",
        b"/v1/chat%2fcompletions",
        b"/v1/./chat/completions",
        b"/v1/..%2fadmin/keys",
    ],
)
def test_path_tricks_never_reach_admin_or_the_upstream(path):
    gw, clock, agent = make_gateway()
    status, _, body = raw(Client(gw), post(path, json.dumps(CHAT).encode()))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_path"
    assert not agent.calls


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"model": "gpt-4o-mini", "x": "\xff\xfe"}',
        b'{"model": "gpt-4o-mini",',
        b"\x00\x01\x02",
    ],
    ids=["deep-list", "deep-object", "not-utf8", "truncated", "binary"],
)
def test_bad_json_is_400_invalid_json(body):
    gw, clock, agent = make_gateway()
    status, headers, out = raw(Client(gw), post(b"/v1/chat/completions", body))
    assert status == 400, out
    assert json.loads(out)["error"]["code"] == "invalid_json"
    assert headers["x-request-id"]
    assert not agent.calls
    # and the next request on a new connection is served
    c = Client(gw)
    c.post("/v1/chat/completions", CHAT)
    respond(agent.calls[0][4], 200, OK)
    assert c.response()[0] == 200


def test_a_model_that_is_not_a_string_is_forwarded_for_the_upstream_to_judge():
    gw, clock, agent = make_gateway()
    c = Client(gw)
    c.post("/v1/chat/completions", {**CHAT, "model": ["gpt-4o", "x"]})
    assert len(agent.calls) == 1


def test_huge_max_tokens_does_not_break_admission():
    gw, clock, agent = make_gateway()
    c = Client(gw)
    c.post("/v1/chat/completions", {**CHAT, "max_tokens": 10**30})
    assert len(agent.calls) == 1


def test_unknown_and_wrong_keys_get_identical_errors():
    gw, clock, agent = make_gateway(
        settings={"accounts": (AccountConfig(name="a", key="sk-real-account-key-000001"),)}
    )
    answers = []
    for auth in (
        b"Bearer sk-real-account-key-000002",
        b"Bearer nothing-like-it",
        b"Basic abc",
        None,
    ):
        header = b"Authorization: " + auth + b"\r\n" if auth else b""
        status, headers, body = raw(
            Client(gw), post(b"/v1/chat/completions", json.dumps(CHAT).encode(), header)
        )
        answers.append((status, json.loads(body)["error"]))
    assert all(a == answers[0] for a in answers), answers
    assert answers[0][0] == 401 and answers[0][1]["code"] == "invalid_api_key"
    assert "sk-real" not in json.dumps(answers)


def test_crlf_in_a_forwarded_header_value_cannot_split_the_upstream_request():
    gw, clock, agent = make_gateway()
    c = Client(gw)
    # a raw CR inside a header value is not valid HTTP: refused, or at least never forwarded raw
    c.proto.dataReceived(
        post(b"/v1/chat/completions", json.dumps(CHAT).encode(), b"X-Custom: a\rInjected: yes\r\n")
    )
    for _, _, headers, _, _ in agent.calls:
        for name, values in headers.getAllRawHeaders():
            assert name.lower() != b"injected"
            assert all(b"\r" not in v and b"\n" not in v for v in values)


# -- oversized and non-UTF-8 input, in memory ---------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/models?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(600))
        + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        + b"\r\n",
    ],
    ids=["long-url", "long-header", "many-headers", "headers-over-16k"],
)
def test_oversized_request_heads_are_refused_and_closed(request_bytes, request):
    gw, clock, agent = make_gateway()
    c = Client(gw)
    c.proto.dataReceived(request_bytes)
    status = {"long-url": b"414 ", "long-header": b"431 "}.get(request.node.callspec.id, b"400 ")
    assert c.transport.value().startswith(b"HTTP/1.1 " + status)
    assert c.transport.disconnecting
    assert not agent.calls


@pytest.mark.parametrize(
    "auth",
    [b"Bearer \xff\xfe\xfd", b"Bearer sk-\x80\x81", b"\xff\xff", b"Bearer " + "ключ".encode()],
)
def test_non_utf8_keys_get_the_same_401(auth):
    gw, clock, agent = make_gateway(
        settings={"accounts": (AccountConfig(name="a", key="sk-real-account-key-000001"),)}
    )
    body = json.dumps(CHAT).encode()
    status, _, out = raw(
        Client(gw), post(b"/v1/chat/completions", body, b"Authorization: " + auth + b"\r\n")
    )
    assert status == 401 and json.loads(out)["error"]["code"] == "invalid_api_key"
    assert not agent.calls


def test_non_utf8_bytes_in_the_path_do_not_break_the_router():
    gw, clock, agent = make_gateway()
    status, _, out = raw(Client(gw), post(b"/admin/\xff\xfe", b"{}"))
    assert status in (400, 404) and b"key" not in out
    status, _, out = raw(Client(gw), post(b"/v1/chat/completions\xc3\x28", b"{}"))
    assert status in (400, 404)
    assert not agent.calls


def test_a_multipart_model_that_is_not_utf8_is_forwarded():
    gw, clock, agent = make_gateway()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-\xff\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n\x00\x01\r\n'
        b"--b--\r\n"
    )
    c = Client(gw)
    c.proto.dataReceived(
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gw\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    assert len(agent.calls) == 1 and agent.calls[0][3] == body


def test_secrets_are_compared_in_constant_time():
    """The admin token and account keys go through hmac.compare_digest, never ``==``."""
    import inspect
    import re
    from pathlib import Path

    from yugongd.accounts import AccountStore
    from yugongd.admin import AdminAPI

    assert "hmac.compare_digest(" in inspect.getsource(AdminAPI.authorized)
    assert "hmac.compare_digest(" in inspect.getsource(AccountStore.lookup)
    core = Path(__file__).resolve().parent.parent / "yugongd"
    for path in core.rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not re.search(r"(token|key_hash|digest)\s*[!=]=\s*\w", line), (path, line)
