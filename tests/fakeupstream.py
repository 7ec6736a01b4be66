"""A fake of the OpenAI HTTP API for yugongd's tests.

Start it in-process::

    fake = FakeUpstream().start()
    ...  # point the gateway at fake.url ("http://127.0.0.1:PORT/v1")
    fake.stop()

or standalone: ``python tests/fakeupstream.py --port 8001``.

Replies are deterministic ("echo: " + the last user message, usage derived from character counts)
so tests can predict them.  Requests are recorded in ``received`` before any scripted behaviour
(error status, delay, dropped connection ...) is applied, so failed attempts are visible too.

Request headers understood by the fake:

- ``x-fake-events: N``     number of content events in a stream (default 5)
- ``x-fake-interval: S``   seconds to sleep after each content event (default 0)
- ``x-fake-delay: S``      seconds to sleep before sending the response headers
- ``x-fake-bytes: N``      /v1/audio/speech: a body of N zero bytes (progress in ``sent``)
- ``x-fake-pad: N``        chat streams: each content event carries N more bytes ("pad")

Fault behaviours (see :class:`Behaviour`): a reset before the headers or in the middle of
the body, a hang before the headers or in the middle of a stream (the fake notices the
client leaving while it waits and records it in ``disconnects``), a body trickled one byte
at a time, a 200 with any bytes (malformed SSE, a body that is not JSON), huge headers.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import functools
import hashlib
import json
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Behaviour",
    "FakeUpstream",
    "MODELS",
    "Received",
    "chat_usage",
    "insufficient_quota",
    "rate_limited",
    "server_error",
    "speech_bytes",
    "unauthorized",
]

MODELS = [
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "whisper-1",
    "tts-1",
    "dall-e-3",
    "omni-moderation-latest",
]
MODEL_CREATED = 1_700_000_000
SPEECH_LENGTH = 100_000
DEFAULT_EVENTS = 5

RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "1ms",
}

MODERATION_CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]


# --------------------------------------------------------------------------- data types


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    key: str | None  # bearer token, if any
    json: object | None  # parsed body if it was JSON


@dataclass
class Behaviour:
    """How to answer one request (scripted) or every request (default) for an upstream key.

    ``status == 200`` means "answer normally", still applying ``headers`` (which override the
    fake's default response headers), ``delay`` and ``drop_after_events``.
    """

    status: int = 200
    body: bytes | dict[str, Any] | None = None  # error body (dict -> JSON); None -> OpenAI envelope
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # sleep before sending headers (first-byte delay)
    drop_after_events: int | None = None  # streams: close the socket abruptly after N events
    #                                       (a fixed-length body: after half of it)
    close_before_headers: bool = False  # abort the connection without any response
    hang_before_headers: float = 0.0  # like delay, but also returns when the client leaves
    hang_after_events: int | None = None  # streams: go silent after N content events ...
    hang: float = 30.0  # ... for this long at most (returns early when the client leaves)
    trickle: float | None = None  # send the body one byte every `trickle` seconds
    raw: bytes | None = None  # status 200 with exactly these bytes as the body
    content_type: str = "application/json"  # of `raw`
    chunked: bool = False  # send `raw` with chunked encoding instead of Content-Length
    header_bytes: int = 0  # pad the response headers with this many bytes (x-fake-pad-N)


def error_envelope(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def default_error_body(status: int) -> dict[str, Any]:
    if status == 400:
        return error_envelope("Bad request (fake upstream).", code=None)
    if status == 401:
        return error_envelope(
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    if status == 403:
        return error_envelope("You are not allowed to access this resource.", code=None)
    if status == 404:
        return error_envelope("The model does not exist.", code="model_not_found")
    if status == 429:
        return error_envelope(
            "Rate limit reached (fake upstream).", type_="requests", code="rate_limit_exceeded"
        )
    if status >= 500:
        return error_envelope(
            "The server had an error while processing your request.", type_="server_error"
        )
    return error_envelope(f"Fake upstream error {status}.", code=None)


def rate_limited(retry_after: float | None = None, code: str = "rate_limit_exceeded") -> Behaviour:
    """429 with an OpenAI error body, and ``Retry-After`` (+ ``retry-after-ms``) if given."""
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = f"{retry_after:g}"
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    type_ = "insufficient_quota" if code == "insufficient_quota" else "requests"
    body = error_envelope(f"Rate limit reached ({code}, fake upstream).", type_=type_, code=code)
    return Behaviour(status=429, body=body, headers=headers)


def server_error(status: int = 500) -> Behaviour:
    return Behaviour(status=status, body=default_error_body(status))


def unauthorized() -> Behaviour:
    return Behaviour(status=401, body=default_error_body(401))


def insufficient_quota() -> Behaviour:
    body = error_envelope(
        "You exceeded your current quota, please check your plan and billing details.",
        type_="insufficient_quota",
        code="insufficient_quota",
    )
    return Behaviour(status=429, body=body)


# --------------------------------------------------------------------------- deterministic content


@functools.lru_cache(maxsize=64)
def speech_bytes(text: str, length: int = SPEECH_LENGTH) -> bytes:
    """The audio the fake returns for /v1/audio/speech: a sha256 chain seeded by ``text``."""
    out = bytearray()
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    while len(out) < length:
        out += digest
        digest = hashlib.sha256(digest).digest()
    return bytes(out[:length])


def content_text(content: object) -> str:
    """Text of a message ``content``: a string, or a list of parts whose text is joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    return ""


def prompt_tokens_for(texts: Iterable[str]) -> int:
    return sum(len(t) for t in texts) // 4 + 1


def chat_reply(messages: object) -> str:
    last_user = ""
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user":
                last_user = content_text(m.get("content"))
    return "echo: " + last_user


def chat_usage(messages: object, events: int = DEFAULT_EVENTS) -> dict[str, int]:
    """Usage the fake reports for a chat completion (exported so tests can predict it)."""
    texts = []
    if isinstance(messages, list):
        texts = [content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    prompt = prompt_tokens_for(texts)
    return {"prompt_tokens": prompt, "completion_tokens": events, "total_tokens": prompt + events}


def split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into exactly ``n`` consecutive (possibly empty) pieces."""
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def embedding_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [(b - 128) / 128 for b in digest[:8]]


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Parse multipart/form-data into {field name: (filename or None, raw bytes)}."""
    header = email.parser.HeaderParser().parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart body without boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # closing delimiter
        _, _, piece = piece.partition(b"\r\n")  # rest of the delimiter line (transport padding)
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("malformed multipart part")
        part_headers = email.parser.HeaderParser().parsestr(head.decode("utf-8", "replace"))
        name = part_headers.get_param("name", header="content-disposition")
        filename = part_headers.get_param("filename", header="content-disposition")
        if isinstance(name, str):
            fields[name] = (filename if isinstance(filename, str) else None, data)
    else:
        raise ValueError("multipart body without closing delimiter")
    return fields


# --------------------------------------------------------------------------- server


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


class _Dropped(Exception):
    """We closed the connection on purpose (scripted behaviour)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # many connections at once (the default backlog is 5)

    def __init__(self, address: tuple[str, int], fake: FakeUpstream) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
            self.connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    server: _Server

    # -- plumbing ------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, data: bytes) -> None:
        try:
            if self._trickle is not None:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if self._wait_watching(self._trickle):
                        raise _ClientGone
                return
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise _ClientGone from e

    def _wait_watching(self, seconds: float) -> bool:
        """Sleep ``seconds``, returning early (True) when the client closes the connection."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return True
            except (OSError, ValueError):
                return True
            if readable:
                time.sleep(min(left, 0.05))  # unexpected bytes (pipelining): just wait

    def _abort(self) -> None:
        """Close the connection abruptly, whatever was (not) sent so far."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass
        raise _Dropped

    def _send_head(
        self, status: int, content_type: str, length: int | None, extra: dict[str, str]
    ) -> None:
        """Status line and headers; ``length=None`` means a chunked body."""
        headers: dict[str, str] = {
            "Content-Type": content_type,
            **RATE_LIMIT_HEADERS,
            "x-request-id": "req_" + uuid.uuid4().hex,
            "openai-processing-ms": str(max(1, int((time.monotonic() - self._t0) * 1000))),
            "openai-version": "2020-10-01",
        }
        if self._force_close or self.headers.get("Connection", "").lower() == "close":
            headers["Connection"] = "close"
        else:
            headers["Keep-Alive"] = "timeout=5"
            headers["Connection"] = "keep-alive"
        lower = {k.lower(): k for k in headers}
        for name, value in {**self._behaviour_headers, **extra}.items():
            headers.pop(lower.get(name.lower(), name), None)
            headers[name] = value
        pad = self._header_bytes
        i = 0
        while pad > 0:
            piece = min(pad, 4000)
            headers[f"x-fake-pad-{i}"] = "p" * piece
            pad -= piece
            i += 1
        if length is None:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(length)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        try:
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise _ClientGone from e

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        self._send_head(status, content_type, len(data), extra or {})
        if self._drop_after is not None:
            self._write(data[: len(data) // 2])
            self._abort()
        request_id = self.headers.get("x-request-id") or "?"
        for i in range(0, len(data), 16384):
            self._write(data[i : i + 16384])
            self.server.fake.sent[request_id] = i + len(data[i : i + 16384])

    def _send_json(self, obj: object, status: int = 200) -> None:
        self._send_bytes(status, json.dumps(obj).encode())

    def _send_error(self, status: int, message: str, code: str | None = None) -> None:
        self._send_json(error_envelope(message, code=code), status)

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._t0 = time.monotonic()
        self._behaviour_headers: dict[str, str] = {}
        self._drop_after: int | None = None
        self._force_close = False
        self._trickle: float | None = None
        self._header_bytes = 0
        self._hang_after: int | None = None
        self._hang = 0.0
        fake = self.server.fake
        path, _, query = self.path.partition("?")
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        request_id = headers.get("x-request-id", "?")
        try:
            try:
                body = self._read_body()
            except (ValueError, OSError):
                self._force_close = True
                self._send_error(400, "Malformed request body.")
                return
            auth = headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            parsed: object | None = None
            if body and "json" in headers.get("content-type", "application/json"):
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
            fake._record(Received(self.command, path, query, headers, body, key, parsed))

            behaviour = fake._behaviour_for(key)
            if behaviour is not None:
                if behaviour.close_before_headers:
                    self._abort()
                self._behaviour_headers = dict(behaviour.headers)
                self._drop_after = behaviour.drop_after_events
                self._header_bytes = behaviour.header_bytes
                self._hang_after = behaviour.hang_after_events
                self._hang = behaviour.hang
                if behaviour.hang_before_headers and self._wait_watching(
                    behaviour.hang_before_headers
                ):
                    raise _ClientGone
            delay = (behaviour.delay if behaviour else 0.0) + _float(headers.get("x-fake-delay"))
            if delay > 0:
                time.sleep(delay)
            if behaviour is not None:
                self._trickle = behaviour.trickle
            if behaviour is not None and behaviour.status == 200 and behaviour.raw is not None:
                if behaviour.chunked:
                    self._send_head(200, behaviour.content_type, None, {})
                    self._write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(behaviour.raw), behaviour.raw))
                else:
                    self._send_bytes(200, behaviour.raw, behaviour.content_type)
                return
            if behaviour is not None and behaviour.status != 200:
                err = (
                    behaviour.body
                    if behaviour.body is not None
                    else default_error_body(behaviour.status)
                )
                data = err if isinstance(err, bytes) else json.dumps(err).encode()
                self._send_bytes(behaviour.status, data)
                return
            self._route(path, headers, body)
        except _ClientGone:
            self.close_connection = True
            fake._record_disconnect(request_id)
        except _Dropped:
            self.close_connection = True

    def _route(self, path: str, headers: dict[str, str], body: bytes) -> None:
        method = self.command
        if method == "GET" and path in ("/v1/models", "/models"):
            return self._models()
        if method == "GET" and path.startswith("/v1/models/") and path[11:] in MODELS:
            return self._send_json(_model_obj(path[11:]))
        if method == "POST" and path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            return self._transcription(headers, body)
        if method == "POST" and path == "/v1/files":
            return self._file_upload(headers, body)
        handler = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/v1/moderations": self._moderations,
            "/v1/images/generations": self._images,
            "/v1/audio/speech": self._speech,
            "/v1/responses": self._responses,
        }.get(path)
        if method != "POST" or handler is None:
            return self._send_error(404, f"Unknown request URL: {method} {path}.", "unknown_url")
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._send_error(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON.)",
            )
        handler(req, headers)

    # -- streaming -----------------------------------------------------------------------

    def _stream(
        self,
        head: Iterable[bytes],
        content: Iterable[bytes],
        tail: Iterable[bytes],
        interval: float,
    ) -> None:
        """Send an SSE response: head events, content events (each followed by ``interval``),
        tail events.  ``drop_after_events`` cuts the connection after that many content events."""
        self._send_head(
            200, "text/event-stream; charset=utf-8", None, {"Cache-Control": "no-cache"}
        )

        def send(event: bytes) -> None:
            self._write(b"%x\r\n%s\r\n" % (len(event), event))

        for event in head:
            send(event)
        sent = 0
        for event in content:
            if self._drop_after is not None and sent >= self._drop_after:
                self._abort()
            if self._hang_after is not None and sent >= self._hang_after:
                self._hang_after = None
                if self._wait_watching(self._hang):
                    raise _ClientGone
            send(event)
            sent += 1
            if interval > 0:
                time.sleep(interval)
        if self._drop_after is not None:
            self._abort()
        for event in tail:
            send(event)
        self._write(b"0\r\n\r\n")

    # -- endpoints -----------------------------------------------------------------------

    def _models(self) -> None:
        self._send_json({"object": "list", "data": [_model_obj(m) for m in MODELS]})

    def _chat(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        n = _events(headers)
        messages = req.get("messages")
        model = str(req.get("model") or "gpt-4o-mini")
        reply = chat_reply(messages)
        usage = chat_usage(messages, n)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not req.get("stream"):
            return self._send_json(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "service_tier": "default",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": reply,
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = _include_usage(req)

        def chunk(choices: list[dict[str, Any]], usage_value: object = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = usage_value
            return _sse(obj)

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        head = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
        pad = int(_float(headers.get("x-fake-pad")))
        if pad > 0:
            padding = "x" * pad
            content = (
                chunk(choice({"content": piece}))[:-3] + b', "pad": "%s"}\n\n' % padding.encode()
                for piece in split_text(reply, n)
            )
        else:
            content = (chunk(choice({"content": piece})) for piece in split_text(reply, n))
        tail = [chunk(choice({}, "stop"))]
        if include_usage:
            tail.append(chunk([], usage))
        tail.append(b"data: [DONE]\n\n")
        self._stream(head, content, tail, _float(headers.get("x-fake-interval")))

    def _completions(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        n = _events(headers)
        prompt = req.get("prompt", "")
        prompt_text = (
            "".join(p for p in prompt if isinstance(p, str))
            if isinstance(prompt, list)
            else str(prompt)
        )
        reply = "echo: " + prompt_text
        p_tokens = prompt_tokens_for([prompt_text])
        usage = {"prompt_tokens": p_tokens, "completion_tokens": n, "total_tokens": p_tokens + n}
        model = str(req.get("model") or "gpt-3.5-turbo-instruct")
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def obj(text: str, finish: str | None, usage_value: object = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": usage_value,
            }

        if not req.get("stream"):
            return self._send_json(obj(reply, "stop", usage))
        content = (_sse(obj(piece, None)) for piece in split_text(reply, n))
        tail = [_sse(obj("", "stop"))]
        if _include_usage(req):
            tail.append(_sse({**obj("", None, usage), "choices": []}))
        tail.append(b"data: [DONE]\n\n")
        self._stream([], content, tail, _float(headers.get("x-fake-interval")))

    def _embeddings(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        raw = req.get("input")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        b64 = req.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = embedding_vector(text)
            emb: object = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = prompt_tokens_for(texts)
        self._send_json(
            {
                "object": "list",
                "data": data,
                "model": str(req.get("model") or "text-embedding-3-small"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _moderations(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        raw = req.get("input")
        inputs = raw if isinstance(raw, list) and raw and isinstance(raw[0], str) else [raw]
        result = {
            "flagged": False,
            "categories": {c: False for c in MODERATION_CATEGORIES},
            "category_scores": {c: 0.0001 for c in MODERATION_CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
        }
        self._send_json(
            {
                "id": "modr-" + uuid.uuid4().hex[:24],
                "model": str(req.get("model") or "omni-moderation-latest"),
                "results": [result for _ in inputs],
            }
        )

    def _images(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        n = req.get("n") if isinstance(req.get("n"), int) else 1
        if req.get("response_format") == "b64_json":
            item: dict[str, Any] = {"b64_json": base64.b64encode(b"fake-png").decode()}
        else:
            item = {"url": "https://example.invalid/img.png"}
        self._send_json({"created": int(time.time()), "data": [dict(item) for _ in range(n)]})

    def _speech(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        size = headers.get("x-fake-bytes")
        if size:
            # a large body for backpressure tests: progress is recorded as it is written
            self._send_bytes(200, b"\x00" * int(size), "audio/mpeg")
            return
        self._send_bytes(200, speech_bytes(str(req.get("input", ""))), "audio/mpeg")

    def _responses(self, req: dict[str, Any], headers: dict[str, str]) -> None:
        n = _events(headers)
        raw = req.get("input", "")
        if isinstance(raw, str):
            texts, last_user = [raw], raw
        else:
            items = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
            texts = [content_text(m.get("content")) for m in items]
            users = [content_text(m.get("content")) for m in items if m.get("role") == "user"]
            last_user = users[-1] if users else ""
        if isinstance(req.get("instructions"), str):
            texts.append(req["instructions"])
        reply = "echo: " + last_user
        in_tokens = prompt_tokens_for(texts)
        rid = "resp_" + uuid.uuid4().hex
        mid = "msg_" + uuid.uuid4().hex
        model = str(req.get("model") or "gpt-4o-mini")

        def response(status: str, text: str | None) -> dict[str, Any]:
            output = []
            if text is not None:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                output.append(
                    {
                        "type": "message",
                        "id": mid,
                        "status": "completed",
                        "role": "assistant",
                        "content": [part],
                    }
                )
            usage = None
            if status == "completed":
                usage = {
                    "input_tokens": in_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": n,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": in_tokens + n,
                }
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": req.get("instructions"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "temperature": 1.0,
                "top_p": 1.0,
                "text": {"format": {"type": "text"}},
                "usage": usage,
            }

        if not req.get("stream"):
            return self._send_json(response("completed", reply))
        seq = iter(range(1_000_000))

        def event(type_: str, **fields: Any) -> bytes:
            obj = {"type": type_, "sequence_number": next(seq), **fields}
            return b"event: %s\ndata: %s\n\n" % (type_.encode(), json.dumps(obj).encode())

        head = [
            event("response.created", response=response("in_progress", None)),
            event("response.in_progress", response=response("in_progress", None)),
        ]
        content = (
            event(
                "response.output_text.delta",
                item_id=mid,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
            for piece in split_text(reply, n)
        )
        tail = [
            event(
                "response.output_text.done",
                item_id=mid,
                output_index=0,
                content_index=0,
                text=reply,
                logprobs=[],
            ),
            event("response.completed", response=response("completed", reply)),
        ]
        self._stream(head, content, tail, _float(headers.get("x-fake-interval")))

    def _multipart(
        self, headers: dict[str, str], body: bytes
    ) -> dict[str, tuple[str | None, bytes]]:
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ValueError("expected multipart/form-data")
        return parse_multipart(body, ctype)

    def _transcription(self, headers: dict[str, str], body: bytes) -> None:
        try:
            fields = self._multipart(headers, body)
        except ValueError as e:
            return self._send_error(400, f"Could not parse multipart form: {e}")
        if "file" not in fields:
            return self._send_error(400, "Missing required parameter: 'file'.")
        model = fields.get("model", (None, b""))[1].decode("utf-8", "replace")
        text = f"sha256:{hashlib.sha256(fields['file'][1]).hexdigest()} model:{model}"
        fmt = fields.get("response_format", (None, b"json"))[1].decode("utf-8", "replace")
        if fmt in ("text", "srt", "vtt"):
            return self._send_bytes(200, text.encode(), "text/plain; charset=utf-8")
        self._send_json({"text": text})

    def _file_upload(self, headers: dict[str, str], body: bytes) -> None:
        try:
            fields = self._multipart(headers, body)
        except ValueError as e:
            return self._send_error(400, f"Could not parse multipart form: {e}")
        if "file" not in fields:
            return self._send_error(400, "Missing required parameter: 'file'.")
        filename, data = fields["file"]
        self._send_json(
            {
                "id": "file-" + hashlib.sha256(data).hexdigest()[:24],
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": filename or "upload",
                "purpose": fields.get("purpose", (None, b""))[1].decode("utf-8", "replace"),
                "status": "processed",
            }
        )


def _model_obj(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "openai"}


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def _events(headers: dict[str, str]) -> int:
    try:
        return max(0, int(headers.get("x-fake-events", DEFAULT_EVENTS)))
    except ValueError:
        return DEFAULT_EVENTS


def _include_usage(req: dict[str, Any]) -> bool:
    opts = req.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


# --------------------------------------------------------------------------- public API


class FakeUpstream:
    """An in-process fake OpenAI server; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self.disconnects: list[str] = []
        #: bytes of a fixed-length body written so far, by x-request-id
        self.sent: dict[str, int] = {}
        self._scripts: dict[str, deque[Behaviour]] = {}
        self._defaults: dict[str, Behaviour] = {}
        self._server = _Server((host, port), self)
        self.host = host
        self.port: int = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> FakeUpstream:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fakeupstream-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open (keep-alive) connection."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget received requests and disconnects, scripted and default behaviours."""
        with self._lock:
            self.received.clear()
            self.disconnects.clear()
            self._scripts.clear()
            self._defaults.clear()

    def script(self, key: str, *behaviours: Behaviour) -> None:
        """Queue one-shot behaviours for requests carrying ``Authorization: Bearer <key>``."""
        with self._lock:
            self._scripts.setdefault(key, deque()).extend(behaviours)

    def set_default(self, key: str, behaviour: Behaviour | None) -> None:
        """Persistent behaviour for ``key`` once its script is used up (None = normal)."""
        with self._lock:
            if behaviour is None:
                self._defaults.pop(key, None)
            else:
                self._defaults[key] = behaviour

    def wait_for(self, predicate: Callable[[FakeUpstream], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def requests_for(self, path: str) -> list[Received]:
        """Received requests whose path equals ``path`` (e.g. "/v1/chat/completions")."""
        with self._lock:
            return [r for r in self.received if r.path == path]

    # -- called from handler threads --

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def _record_disconnect(self, request_id: str) -> None:
        with self._lock:
            self.disconnects.append(request_id)

    def _behaviour_for(self, key: str | None) -> Behaviour | None:
        if key is None:
            return None
        with self._lock:
            queue = self._scripts.get(key)
            if queue:
                return queue.popleft()
            return self._defaults.get(key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI upstream for yugongd tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    fake = FakeUpstream(args.host, args.port).start()
    print(fake.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
