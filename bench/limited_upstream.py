"""A fake OpenAI upstream that enforces per-organisation rate limits the way OpenAI does.

Built on bench/fake_upstream.py (same HTTP/1.1 parsing and keep-alive). Each known API key
belongs to an organisation (default: key1, key2 → org-a; key3 → org-b; key4 → org-c); each
organisation has two continuously refilling buckets: ``--requests`` R requests and
``--tokens`` T tokens per ``--window`` W seconds (OpenAI: per minute). A chat completion is
charged at admission, like OpenAI: one request, and ``len(body) // 4 + max_tokens`` tokens
(``max_completion_tokens`` too). Past either limit it answers 429 with OpenAI's
``rate_limit_exceeded`` error body and ``retry-after`` (whole seconds, rounded up).

Every response (200 or 429) carries ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` (time until the bucket is
full again, as ``20ms`` / ``1.5s`` / ``1m2.5s``) and the same ``-tokens`` headers, taken at
admission (``--header-time response``: when the response is sent). A 200 is sent
``--latency`` seconds after admission; its usage equals the charge (the completion used all
of ``max_tokens``), so a gateway that settles with the real usage keeps the same books.

An unknown key gets 401 ``invalid_api_key``; an ``OpenAI-Organization`` header that is not
the key's organisation gets 401 ``mismatched_organization`` (both counted as errors).

Bench endpoints: ``POST /bench/reset`` refills every bucket and zeroes the counters (the
run's time 0); ``GET /bench/stats`` returns JSON: per key accepted and 429s (by limit), per
second of the run per key ``[accepted, 429s]``, the time of the last admission, errors.

Run alone: ``python bench/limited_upstream.py --port 9002 --requests 60 --tokens 30000
--window 6``; keys are ``sk-pool-key-1`` … ``sk-pool-key-4`` (``KEYS`` below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import sys
import time

from fake_upstream import CANNED, HTTPProtocol, Request, _head

#: API key → (key id, organisation)
KEYS = {
    "sk-pool-key-1-aaaaaaaaaaaa": ("key1", "org-a"),
    "sk-pool-key-2-bbbbbbbbbbbb": ("key2", "org-a"),
    "sk-pool-key-3-cccccccccccc": ("key3", "org-b"),
    "sk-pool-key-4-dddddddddddd": ("key4", "org-c"),
}
MAX_SECONDS = 3600  # timeline length bound

_MAX_TOKENS = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d{1,9})')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,100})"')


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``0s``, ``20ms``, ``1.5s``, ``6m0s``; rounded up to 1 ms."""
    ms = math.ceil(max(0.0, seconds) * 1000.0 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    sec = f"{rest / 1000.0:.3f}".rstrip("0").rstrip(".")
    return (f"{minutes}m" if minutes else "") + f"{sec}s"


def request_cost(body: bytes) -> int:
    """Tokens charged at admission: ~4 bytes of body a token plus the completion limit."""
    m = _MAX_TOKENS.search(body)
    return len(body) // 4 + (int(m.group(1)) if m else 0)


class Bucket:
    """``limit`` units per ``window`` seconds, refilling continuously, starting full."""

    __slots__ = ("limit", "rate", "level", "at")

    def __init__(self, limit: float, window: float, now: float) -> None:
        self.limit = float(limit)
        self.rate = self.limit / window
        self.level = self.limit
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + self.rate * (now - self.at))
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is there (after :meth:`refill`)."""
        return max(0.0, (amount - self.level) / self.rate)

    def headers(self, kind: bytes) -> list[bytes]:
        return [
            b"x-ratelimit-limit-%s: %d" % (kind, int(self.limit)),
            b"x-ratelimit-remaining-%s: %d" % (kind, max(0, int(self.level))),
            b"x-ratelimit-reset-%s: %s"
            % (kind, format_duration((self.limit - self.level) / self.rate).encode()),
        ]


class Limits:
    """The organisations' buckets and the counters of the run."""

    def __init__(self, requests: int, tokens: int, window: float, header_time: str) -> None:
        self.requests = requests
        self.tokens = tokens
        self.window = window
        self.header_time = header_time
        self.reset()

    def reset(self) -> None:
        now = time.monotonic()
        self.t0 = now
        orgs = sorted({org for _, org in KEYS.values()})
        self.buckets = {
            org: (
                Bucket(self.requests, self.window, now),
                Bucket(self.tokens, self.window, now),
            )
            for org in orgs
        }
        self.keys = {
            kid: {"org": org, "accepted": 0, "429_requests": 0, "429_tokens": 0, "tokens": 0}
            for kid, org in KEYS.values()
        }
        self.timeline: dict[str, dict[int, list[int]]] = {kid: {} for kid, _ in KEYS.values()}
        self.last_accept = 0.0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def headers(self, org: str, now: float) -> bytes:
        req, tok = self.buckets[org]
        req.refill(now)
        tok.refill(now)
        return b"\r\n".join(req.headers(b"requests") + tok.headers(b"tokens"))

    def admit(self, key_id: str, org: str, cost: int) -> tuple[bool, float, str, bytes]:
        """(admitted, seconds to wait if not, which limit, rate-limit header lines)."""
        now = time.monotonic()
        req, tok = self.buckets[org]
        req.refill(now)
        tok.refill(now)
        second = min(MAX_SECONDS, int(now - self.t0))
        slot = self.timeline[key_id].setdefault(second, [0, 0])
        stats = self.keys[key_id]
        if req.level >= 1.0 and tok.level >= cost:
            req.level -= 1.0
            tok.level -= cost
            stats["accepted"] += 1
            stats["tokens"] += cost
            slot[0] += 1
            self.last_accept = now - self.t0
            return True, 0.0, "", self.headers(org, now)
        slot[1] += 1
        wait_r = req.wait_for(1.0)
        wait_t = tok.wait_for(min(cost, tok.limit))
        which = "requests" if wait_r >= wait_t else "tokens"
        stats["429_" + which] += 1
        return False, max(wait_r, wait_t), which, self.headers(org, now)

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "window": self.window,
            "elapsed": time.monotonic() - self.t0,
            "last_accept": self.last_accept,
            "keys": self.keys,
            "timeline": {
                k: {str(s): v for s, v in sorted(t.items())} for k, t in self.timeline.items()
            },
            "errors": self.errors,
        }


def _error(message: str, type_: str, code: str) -> bytes:
    doc = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return json.dumps(doc, separators=(",", ":")).encode()


class LimitedProtocol(HTTPProtocol):
    """fake_upstream's protocol with OpenAI's rate limits in front of chat completions."""

    limits: Limits
    latency: float

    def _handle(self, req: Request) -> None:
        path = req.path.split(b"?", 1)[0]
        if path == b"/bench/stats":
            self._send(
                b"200 OK", b"application/json", json.dumps(self.limits.stats()).encode(), req.close
            )
            return
        if path == b"/bench/reset" and req.method == b"POST":
            self.limits.reset()
            self._send(b"200 OK", b"application/json", b'{"reset":true}', req.close)
            return
        if not (req.method == b"POST" and path.startswith(b"/v1/")):
            super()._handle(req)  # /v1/models, /healthz, 404
            return
        self.stats["requests"] += 1
        auth = req.headers.get(b"authorization", b"").decode("latin-1")
        known = KEYS.get(auth[7:] if auth.startswith("Bearer ") else "")
        if known is None:
            self.limits.error("401 invalid_api_key")
            body = _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            self._send(b"401 Unauthorized", b"application/json", body, req.close)
            return
        key_id, org = known
        sent_org = req.headers.get(b"openai-organization")
        if sent_org is not None and sent_org.decode("latin-1") != org:
            self.limits.error(f"401 mismatched_organization ({key_id})")
            body = _error(
                "OpenAI-Organization header should match organization for API key.",
                "invalid_request_error",
                "mismatched_organization",
            )
            self._send(b"401 Unauthorized", b"application/json", body, req.close)
            return
        m = _MODEL.search(req.body)
        model = m.group(1).decode() if m else "gpt-4o-mini"
        cost = request_cost(req.body)
        ok, wait, which, rl = self.limits.admit(key_id, org, cost)
        if not ok:
            lim = self.limits
            limit = lim.requests if which == "requests" else lim.tokens
            unit = "requests per min (RPM)" if which == "requests" else "tokens per min (TPM)"
            msg = (
                f"Rate limit reached for {model} in organization {org} on {unit}: "
                f"Limit {limit}, Requested {1 if which == 'requests' else cost}. "
                f"Please try again in {format_duration(wait)}."
            )
            body = _error(
                msg, "requests" if which == "requests" else "tokens", "rate_limit_exceeded"
            )
            extra = rl + b"\r\nretry-after: %d" % max(1, math.ceil(wait))
            self._send_with(b"429 Too Many Requests", extra, body, req.close)
            return
        body = self._completion(model, cost, req.body)
        if self.latency <= 0:
            self._send_with(b"200 OK", rl, body, req.close)
            return
        self.streaming = asyncio.ensure_future(self._later(org, rl, body, req.close))

    def _completion(self, model: str, cost: int, reqbody: bytes) -> bytes:
        prompt = len(reqbody) // 4
        doc = json.loads(CANNED.get(model)[0])
        doc["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": cost - prompt,
            "total_tokens": cost,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def _send_with(self, status: bytes, extra: bytes, body: bytes, close: bool) -> None:
        assert self.transport is not None
        head = _head(status, b"application/json", len(body), close)
        # fake_upstream's head has generous fixed rate-limit headers: replace them
        lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.startswith(b"x-ratelimit-")]
        self.transport.write(b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n\r\n" + body)
        if close:
            self.transport.close()
            self.closed = True

    async def _later(self, org: str, rl: bytes, body: bytes, close: bool) -> None:
        try:
            await asyncio.sleep(self.latency)
            if self.closed:
                return
            if self.limits.header_time == "response":
                rl = self.limits.headers(org, time.monotonic())
            self._send_with(b"200 OK", rl, body, close)
        except asyncio.CancelledError:
            return
        finally:
            self.streaming = None
        if not self.closed and self.buf:
            asyncio.get_running_loop().call_soon(self._process)


async def serve(args: argparse.Namespace) -> None:
    stats = {"connections": 0, "requests": 0, "streams": 0}
    limits = Limits(args.requests, args.tokens, args.window, args.header_time)

    def factory() -> LimitedProtocol:
        p = LimitedProtocol(stats)
        p.limits = limits
        p.latency = args.latency
        return p

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, args.host, args.port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(
        f"limited fake upstream on http://{args.host}:{bound}/v1: per organisation "
        f"{args.requests} requests and {args.tokens} tokens per {args.window:g}s",
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(f"limited fake upstream stopping: {json.dumps(limits.keys)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--requests", type=int, default=60, help="R: requests per window per org")
    p.add_argument("--tokens", type=int, default=30000, help="T: tokens per window per org")
    p.add_argument("--window", type=float, default=6.0, help="W: seconds (OpenAI: 60)")
    p.add_argument("--latency", type=float, default=0.2, help="seconds before a 200 is sent")
    p.add_argument(
        "--header-time",
        choices=("admission", "response"),
        default="admission",
        help="when the x-ratelimit-* values of a 200 are taken (default admission)",
    )
    args = p.parse_args(argv)
    if args.requests < 1 or args.tokens < 1 or args.window <= 0:
        p.error("--requests, --tokens and --window must be positive")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
