"""Self-tests of the fake OpenAI upstream (talking to it directly, not through the gateway)."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from fakeupstream import (
        Behaviour,
        FakeUpstream,
        chat_usage,
        rate_limited,
        speech_bytes,
    )
except ImportError:  # tests/ imported as a package
    from tests.fakeupstream import (
        Behaviour,
        FakeUpstream,
        chat_usage,
        rate_limited,
        speech_bytes,
    )


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.stop()


def request(
    fake: FakeUpstream,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    key: str = "sk-test",
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if isinstance(body, dict):
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, "/v1" + path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def test_models_and_headers(fake: FakeUpstream) -> None:
    status, headers, body = request(fake, "GET", "/models")
    assert status == 200
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert "gpt-4o-mini" in ids and "whisper-1" in ids
    for name in ("x-ratelimit-remaining-requests", "x-request-id", "openai-processing-ms"):
        assert name in headers
    assert headers["keep-alive"] == "timeout=5"
    assert fake.received[0].key == "sk-test"
    assert fake.received[0].path == "/v1/models"


def test_chat_json_and_errors(fake: FakeUpstream) -> None:
    status, _, body = request(fake, "POST", "/chat/completions?x=1", CHAT)
    assert status == 200
    obj = json.loads(body)
    assert obj["choices"][0]["message"]["content"] == "echo: hello there"
    assert obj["usage"] == chat_usage(CHAT["messages"])
    assert fake.received[0].query == "x=1"
    assert fake.received[0].json == CHAT

    status, _, body = request(fake, "POST", "/chat/completions", b"{nope")
    assert status == 400 and "error" in json.loads(body)
    status, _, body = request(fake, "GET", "/nowhere")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"


def test_chat_stream_with_usage(fake: FakeUpstream) -> None:
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, body = request(fake, "POST", "/chat/completions", req, {"x-fake-events": "3"})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 3 + 1 + 1
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == chat_usage(CHAT["messages"], 3)


def test_transcription_and_speech(fake: FakeUpstream) -> None:
    audio = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    boundary = "----fake" + uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ctype = f"multipart/form-data; boundary={boundary}"
    status, _, resp = request(fake, "POST", "/audio/transcriptions", body, {"Content-Type": ctype})
    assert status == 200
    expected = f"sha256:{hashlib.sha256(audio).hexdigest()} model:whisper-1"
    assert json.loads(resp) == {"text": expected}

    status, headers, resp = request(
        fake, "POST", "/audio/speech", {"model": "tts-1", "input": "hi"}
    )
    assert status == 200 and headers["content-type"] == "audio/mpeg"
    assert resp == speech_bytes("hi") and len(resp) == 100_000


def test_scripted_429_once(fake: FakeUpstream) -> None:
    fake.script("sk-a", rate_limited(retry_after=2))
    status, headers, body = request(fake, "POST", "/chat/completions", CHAT, key="sk-a")
    assert status == 429 and headers["retry-after"] == "2"
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert request(fake, "POST", "/chat/completions", CHAT, key="sk-a")[0] == 200
    assert request(fake, "POST", "/chat/completions", CHAT, key="sk-b")[0] == 200
    assert [r.key for r in fake.received] == ["sk-a", "sk-a", "sk-b"]

    fake.set_default("sk-b", Behaviour(status=503))
    assert request(fake, "POST", "/chat/completions", CHAT, key="sk-b")[0] == 503
    assert request(fake, "POST", "/chat/completions", CHAT, key="sk-b")[0] == 503
    fake.set_default("sk-b", None)
    assert request(fake, "POST", "/chat/completions", CHAT, key="sk-b")[0] == 200

    fake.script("sk-c", Behaviour(close_before_headers=True))
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        request(fake, "POST", "/chat/completions", CHAT, key="sk-c")


def test_drop_after_events(fake: FakeUpstream) -> None:
    fake.script("sk-a", Behaviour(drop_after_events=2))
    req = {**CHAT, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(req),
        headers={"Authorization": "Bearer sk-a", "x-fake-events": "10"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    received = info.value.partial
    conn.close()
    events = received.decode().strip().split("\n\n")
    assert len(events) == 1 + 2  # role chunk + two content chunks, no [DONE]
    assert "[DONE]" not in received.decode()


def test_client_disconnect_is_recorded(fake: FakeUpstream) -> None:
    req = json.dumps({**CHAT, "stream": True}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
        "Content-Type: application/json\r\nx-request-id: rid-1\r\nx-fake-events: 200\r\n"
        f"x-fake-interval: 0.02\r\nContent-Length: {len(req)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", fake.port))
    sock.sendall(head + req)
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert fake.wait_for(lambda f: "rid-1" in f.disconnects, timeout=3)


def test_openai_sdk_compat(fake: FakeUpstream) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.url, api_key="sk-test", max_retries=0)
    try:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
        assert reply.choices[0].message.content == "echo: hello there"
        assert reply.usage is not None and reply.usage.completion_tokens == 5

        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT["messages"],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: hello there"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

        emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [len(d.embedding) for d in emb.data] == [8, 8]
        assert emb.data[0].embedding != emb.data[1].embedding

        audio = b"RIFF" + bytes(1000)
        tr = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
        assert tr.text == f"sha256:{hashlib.sha256(audio).hexdigest()} model:whisper-1"

        resp = client.responses.create(model="gpt-4o-mini", input="yo")
        assert resp.output_text == "echo: yo"
    finally:
        client.close()
