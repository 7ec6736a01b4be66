"""Concurrent SSE streaming client for the benchmark (asyncio, raw sockets, stdlib only).

Opens ``--streams`` concurrent ``POST`` requests with ``"stream": true`` against one URL, each
on its own connection, all started together, and records per stream: the time to the
response head, the time to the first SSE event, the arrival time of every event, the total
time and the event count. It prints a summary (TTFB p50/p99, inter-event delay mean/p99, total
time, counts of failures) as text or, with ``--json``, as one JSON object on stdout.

The whole run is bounded by ``--timeout`` seconds: streams still open then count as timed out.

Run: ``python bench/stream_client.py http://127.0.0.1:9001/v1/chat/completions --streams 100``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))


def default_body(model: str = "gpt-4o-mini") -> bytes:
    """The ~1.2 KB chat request of bench/request.json, with streaming and usage turned on."""
    with open(os.path.join(HERE, "request.json"), "rb") as f:
        doc = json.loads(f.read())
    doc["model"] = model
    doc["stream"] = True
    doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class StreamRecord:
    """One stream's timings, in seconds from the moment its request was written."""

    status: int = 0
    head: float | None = None  # response head received
    events: list[float] = field(default_factory=list)  # arrival of each SSE event
    total: float | None = None  # stream finished (terminating chunk or connection close)
    done: bool = False  # saw "data: [DONE]"
    usage: bool = False  # saw a usage-only chunk ("choices": []), not counted in events
    error: str | None = None

    @property
    def ttfb(self) -> float | None:
        """Time to the first SSE event (not just the head: a proxy may send the head early)."""
        return self.events[0] if self.events else None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


class _Closed(Exception):
    pass


async def _read_until(reader: asyncio.StreamReader, sep: bytes) -> bytes:
    try:
        return await reader.readuntil(sep)
    except asyncio.IncompleteReadError as e:
        raise _Closed(f"connection closed ({len(e.partial)} bytes pending)") from None


async def one_stream(
    host: str, port: int, path: str, headers: dict[str, str], body: bytes, rec: StreamRecord
) -> None:
    """Run one streaming request, filling ``rec`` as events arrive."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += [
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        t0 = time.perf_counter()
        await writer.drain()

        raw = await _read_until(reader, b"\r\n\r\n")
        rec.head = time.perf_counter() - t0
        lines = raw.decode("latin-1").split("\r\n")
        rec.status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        chunked = hdrs.get("transfer-encoding", "").lower() == "chunked"
        length = int(hdrs["content-length"]) if "content-length" in hdrs else None

        pending = b""

        def feed(data: bytes) -> None:
            nonlocal pending
            now = time.perf_counter() - t0
            pending += data
            while True:
                # SSE events end with a blank line; accept \n\n and \r\n\r\n
                i = pending.find(b"\n\n")
                j = pending.find(b"\r\n\r\n")
                if i < 0 and j < 0:
                    return
                if j >= 0 and (i < 0 or j < i):
                    event, pending = pending[:j], pending[j + 4 :]
                else:
                    event, pending = pending[:i], pending[i + 2 :]
                if not event.strip():
                    continue
                if event.strip() == b"data: [DONE]":
                    rec.done = True
                    continue
                if b'"choices":[]' in event:  # the usage chunk follows the last one at once
                    rec.usage = True
                    continue
                rec.events.append(now)

        if rec.status != 200:
            # read the (error) body for the record, then stop
            if length is not None:
                data = await reader.readexactly(min(length, 65536))
            else:
                data = await reader.read(65536)
            rec.error = f"HTTP {rec.status}: {data[:200].decode('utf-8', 'replace')}"
            return
        if chunked:
            while True:
                size_line = await _read_until(reader, b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                try:
                    data = await reader.readexactly(size + 2)
                except asyncio.IncompleteReadError:
                    raise _Closed("connection closed inside a chunk") from None
                feed(data[:-2])
        elif length is not None:
            left = length
            while left > 0:
                data = await reader.read(min(left, 65536))
                if not data:
                    raise _Closed("connection closed before Content-Length")
                left -= len(data)
                feed(data)
        else:
            while data := await reader.read(65536):
                feed(data)
        rec.total = time.perf_counter() - t0
        if not rec.done:
            rec.error = "stream ended without data: [DONE]"
    except (_Closed, OSError, ValueError, IndexError) as e:
        rec.error = rec.error or f"{type(e).__name__}: {e}"
    finally:
        writer.close()


async def run_streams(
    url: str,
    streams: int = 100,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 60.0,
    ramp: float = 0.0,
) -> list[StreamRecord]:
    """Open ``streams`` concurrent streaming requests to ``url``; at most ``timeout`` seconds.

    With ``ramp`` > 0 the starts are spread evenly over ``ramp`` seconds (stream ``i`` starts
    at ``i * ramp / streams``) instead of all at once; each stream's timings still count from
    its own request."""
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError("only http:// URLs are supported")
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    body = body if body is not None else default_body()
    records = [StreamRecord() for _ in range(streams)]

    async def later(delay: float, r: StreamRecord) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await one_stream(host, port, path, headers or {}, body, r)

    step = ramp / streams if streams else 0.0
    tasks = [asyncio.ensure_future(later(i * step, r)) for i, r in enumerate(records)]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    for t, r in zip(tasks, records, strict=True):
        if t in pending:
            r.error = r.error or f"timed out after {timeout:g}s"
        elif t.exception() is not None:
            r.error = r.error or f"{type(t.exception()).__name__}: {t.exception()}"
    if pending:
        await asyncio.wait(pending, timeout=2)
    return records


def summarize(records: list[StreamRecord], wall: float | None = None) -> dict[str, Any]:
    """Aggregate the records: times in milliseconds."""
    ok = [r for r in records if r.error is None]
    ttfb = [r.ttfb for r in records if r.ttfb is not None]
    heads = [r.head for r in records if r.head is not None]
    gaps = [b - a for r in records for a, b in zip(r.events, r.events[1:], strict=False)]
    totals = [r.total for r in ok if r.total is not None]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error[:120]
            errors[key] = errors.get(key, 0) + 1

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 3)

    return {
        "streams": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "statuses": statuses,
        "errors": errors,
        "events": sum(len(r.events) for r in records),
        "events_per_stream_min": min((len(r.events) for r in records), default=0),
        "usage_chunks": sum(r.usage for r in records),
        "head_p50_ms": ms(percentile(heads, 50)),
        "ttfb_p50_ms": ms(percentile(ttfb, 50)),
        "ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "ttfb_min_ms": ms(min(ttfb, default=None)),
        "ttfb_max_ms": ms(max(ttfb, default=None)),
        "gap_mean_ms": ms(statistics.fmean(gaps) if gaps else None),
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
        "gap_max_ms": ms(max(gaps, default=None)),
        "total_p50_ms": ms(percentile(totals, 50)),
        "total_p99_ms": ms(percentile(totals, 99)),
        "wall_s": None if wall is None else round(wall, 3),
    }


def format_summary(s: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"streams {s['streams']}: {s['ok']} ok, {s['failed']} failed, statuses {s['statuses']}",
        f"events {s['events']} (min per stream {s['events_per_stream_min']}), "
        f"usage chunks {s['usage_chunks']}",
        f"TTFB (first event) ms: min {f(s['ttfb_min_ms'])}  p50 {f(s['ttfb_p50_ms'])}  "
        f"p99 {f(s['ttfb_p99_ms'])}  max {f(s['ttfb_max_ms'])}",
        f"inter-event delay ms: mean {f(s['gap_mean_ms'])}  p50 {f(s['gap_p50_ms'])}  "
        f"p99 {f(s['gap_p99_ms'])}  max {f(s['gap_max_ms'])}",
        f"stream total ms: p50 {f(s['total_p50_ms'])}  p99 {f(s['total_p99_ms'])}; "
        f"wall {s['wall_s']}s",
    ]
    for e, n in s["errors"].items():
        lines.append(f"  {n} x {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url", help="e.g. http://127.0.0.1:8080/v1/chat/completions")
    p.add_argument("--streams", type=int, default=100, help="concurrent streams (default 100)")
    p.add_argument("--key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--events", type=int, help="x-bench-events for the fake upstream")
    p.add_argument("--interval", type=float, help="x-bench-interval (seconds) for the fake")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--timeout", type=float, default=60.0, help="bound of the whole run (s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ramp", type=float, default=0.0, help="spread the starts over S seconds")
    args = p.parse_args(argv)

    headers = {}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    if args.events is not None:
        headers["x-bench-events"] = str(args.events)
    if args.interval is not None:
        headers["x-bench-interval"] = str(args.interval)

    async def go() -> dict[str, Any]:
        t = time.perf_counter()
        recs = await run_streams(
            args.url,
            args.streams,
            headers=headers,
            body=default_body(args.model),
            timeout=args.timeout,
            ramp=args.ramp,
        )
        return summarize(recs, time.perf_counter() - t)

    s = asyncio.run(go())
    print(json.dumps(s) if args.json else format_summary(s), flush=True)
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
