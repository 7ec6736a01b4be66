"""A fast fake OpenAI upstream for the benchmark (not for the tests: see tests/fakeupstream.py).

A raw asyncio HTTP/1.1 server with keep-alive and the least parsing that works: the request
head up to ``\\r\\n\\r\\n``, then a ``Content-Length`` (or chunked) body. It answers

- ``POST /v1/chat/completions`` (and any other ``POST``):
  - without ``"stream": true`` in the body: a fixed chat.completion JSON (~0.7 KB) with usage;
  - with ``"stream": true``: ``text/event-stream``, chunked, ``x-bench-events`` events
    (default 50) ``x-bench-interval`` seconds apart (default 0.02), then a usage chunk when
    ``stream_options.include_usage`` is true, then ``data: [DONE]``;
- ``GET /v1/models``: a small model list;
- anything else: 404 in OpenAI's error envelope.

It is written so that it is never the bottleneck of the benchmark: the bodies are
prebuilt bytes, the body is searched with a regular expression rather than parsed as JSON,
and streams are plain coroutines, so 1,000+ concurrent streams cost little.

Run: ``python bench/fake_upstream.py --port 9001`` (``--host``, default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
import time

DEFAULT_EVENTS = 50
DEFAULT_INTERVAL = 0.02
MAX_EVENTS = 100_000
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')

PROMPT_TOKENS = 300
COMPLETION_TOKENS = 120


def _completion(model: str) -> bytes:
    content = (
        "This is a canned answer from the benchmark's fake upstream. It is long enough to look "
        "like a real short reply: a few sentences about nothing in particular, so that the "
        "response body is close to what a chat completion of a hundred tokens or so would be, "
        "without costing the fake server anything to produce. The end."
    )
    doc = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _chunk_event(model: str, delta: dict, finish: str | None = None, usage: dict | None = None):
    doc: dict = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Canned:
    """Prebuilt response bytes, per model name (cached: the bench uses one or two models)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
        models = {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "bench"}
                for m in ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
            ],
        }
        self.models = json.dumps(models, separators=(",", ":")).encode()

    def get(self, model: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """(completion JSON, first chunk, token chunk, finish chunk, usage chunk) for ``model``."""
        c = self._cache.get(model)
        if c is None:
            usage = {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            }
            c = (
                _completion(model),
                _chunked(_chunk_event(model, {"role": "assistant", "content": ""})),
                _chunked(_chunk_event(model, {"content": " token"})),
                _chunked(_chunk_event(model, {}, finish="stop")),
                _chunked(_chunk_event(model, {}, usage=usage)),
            )
            if len(self._cache) < 64:
                self._cache[model] = c
        return c


CANNED = Canned()
NOT_FOUND = (
    b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'
)
DONE = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _head(status: bytes, ctype: bytes, length: int | None, close: bool) -> bytes:
    lines = [
        b"HTTP/1.1 " + status,
        b"Content-Type: " + ctype,
        b"x-request-id: req_bench",
        b"x-ratelimit-limit-requests: 1000000",
        b"x-ratelimit-remaining-requests: 999999",
        b"x-ratelimit-limit-tokens: 1000000000",
        b"x-ratelimit-remaining-tokens: 999999999",
    ]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    else:
        lines.append(b"Content-Length: %d" % length)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Request:
    __slots__ = ("method", "path", "headers", "body", "close")

    def __init__(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        conn = headers.get(b"connection", b"").lower()
        self.close = conn == b"close"


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive; requests on one connection are answered in order."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task | None = None
        self.closed = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    # --- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.stats["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        if self.streaming is not None:
            self.streaming.cancel()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.streaming is None:
            self._process()

    # --- parsing -----------------------------------------------------------------------
    def _process(self) -> None:
        while not self.closed and self.streaming is None:
            req = self._parse_one()
            if req is None:
                return
            self._handle(req)

    def _parse_one(self) -> Request | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._fail(b"431 Request Header Fields Too Large")
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        try:
            method, path, _version = lines[0].split(b" ", 2)
        except ValueError:
            self._fail(b"400 Bad Request")
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            got = self._parse_chunked(start)
            if got is None:
                return None
            body, consumed = got
            del buf[:consumed]
        else:
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                self._fail(b"400 Bad Request")
                return None
            if length > MAX_BODY:
                self._fail(b"413 Payload Too Large")
                return None
            if len(buf) - start < length:
                return None
            body = bytes(buf[start : start + length])
            del buf[: start + length]
        return Request(method, path, headers, body)

    def _parse_chunked(self, pos: int) -> tuple[bytes, int] | None:
        buf = self.buf
        parts = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            except ValueError:
                self._fail(b"400 Bad Request")
                return None
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n", pos)  # no trailers expected; skip to the final CRLF
                if end < 0:
                    return None
                return b"".join(parts), end + 2
            if len(buf) < pos + size + 2:
                return None
            parts.append(bytes(buf[pos : pos + size]))
            pos += size + 2

    def _fail(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_head(status, b"text/plain", 0, True))
        self.transport.close()
        self.closed = True

    # --- answering ---------------------------------------------------------------------
    def _handle(self, req: Request) -> None:
        assert self.transport is not None
        self.stats["requests"] += 1
        path = req.path.split(b"?", 1)[0]
        if req.method == b"GET" and path == b"/v1/models":
            self._send(b"200 OK", b"application/json", CANNED.models, req.close)
        elif req.method == b"GET" and path in (b"/healthz", b"/"):
            self._send(b"200 OK", b"text/plain", b"ok\n", req.close)
        elif req.method == b"POST" and path.startswith(b"/v1/"):
            m = _MODEL.search(req.body)
            model = m.group(1).decode() if m else "gpt-4o-mini"
            canned = CANNED.get(model)
            if _STREAM_TRUE.search(req.body):
                self.stats["streams"] += 1
                events, interval = self._stream_params(req.headers)
                usage = bool(_INCLUDE_USAGE.search(req.body))
                self.streaming = asyncio.ensure_future(
                    self._stream(canned, events, interval, usage, req.close)
                )
            else:
                self._send(b"200 OK", b"application/json", canned[0], req.close)
        else:
            body = NOT_FOUND
            self._send(b"404 Not Found", b"application/json", body, req.close)

    @staticmethod
    def _stream_params(headers: dict[bytes, bytes]) -> tuple[int, float]:
        try:
            events = int(headers.get(b"x-bench-events", DEFAULT_EVENTS))
        except ValueError:
            events = DEFAULT_EVENTS
        try:
            interval = float(headers.get(b"x-bench-interval", DEFAULT_INTERVAL))
        except ValueError:
            interval = DEFAULT_INTERVAL
        return max(1, min(events, MAX_EVENTS)), max(0.0, min(interval, 60.0))

    def _send(self, status: bytes, ctype: bytes, body: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(_head(status, ctype, len(body), close) + body)
        if close:
            self.transport.close()
            self.closed = True

    async def _stream(self, canned, events: int, interval: float, usage: bool, close: bool):
        """``events`` events (the first carries the role, the last the finish reason)."""
        assert self.transport is not None
        t = self.transport
        try:
            t.write(_head(b"200 OK", b"text/event-stream", None, close) + canned[1])
            loop = asyncio.get_running_loop()
            due = loop.time()
            for i in range(1, events):
                due += interval
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not self.can_write.is_set():
                    await self.can_write.wait()
                if self.closed:
                    return
                t.write(canned[3] if i == events - 1 else canned[2])
            tail = (canned[4] if usage else b"") + DONE
            t.write(tail)
            if close:
                t.close()
                self.closed = True
        except asyncio.CancelledError:
            return
        finally:
            self.streaming = None
        if not self.closed and self.buf:
            asyncio.get_running_loop().call_soon(self._process)


async def serve(host: str, port: int, ready_file: str | None = None) -> None:
    stats = {"connections": 0, "requests": 0, "streams": 0}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HTTPProtocol(stats), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream listening on http://{host}:{bound}/v1", flush=True)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(bound))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    async with server:
        await stop.wait()
    print(
        f"fake upstream stopping after {time.monotonic() - started:.1f}s: "
        f"{stats['connections']} connections, {stats['requests']} requests, "
        f"{stats['streams']} streams",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    p.add_argument("--ready-file", help="write the bound port here once listening")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.ready_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
