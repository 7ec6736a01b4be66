"""Pool efficiency: how much of the upstream keys' true capacity yugongd turns into answers.

    python bench/pool_efficiency.py [--quick] [--duration 60] [--overload 1.2]

bench/limited_upstream.py enforces OpenAI-style limits per organisation: 4 keys (key1 and
key2 in org-a, key3 in org-b, key4 in org-c), each organisation ``--requests`` R requests and
``--tokens`` T tokens per ``--window`` W seconds (a scaled-down minute), refilling
continuously, 429 ``rate_limit_exceeded`` with ``retry-after`` and ``x-ratelimit-*`` headers
past that. For each ``--strategies`` entry (default ``least-loaded,round-robin``) it starts a
fresh fake (full buckets) and yugongd (``state: memory``, no accounts, the 4 keys with their
organisations, ``pool: {strategy: …, queue_timeout: 1}``), then an open-loop client sends
non-streamed chat completions (~1.2 KB, ``max_tokens`` ``--max-tokens``) at a constant rate
for ``--duration`` D seconds: ``--overload`` × the pool's true capacity over D.

True capacity over the window in which the upstream admitted requests (from the start to the
last admission, at least D) is, per organisation, the initial full bucket plus its refill,
for requests (R + R/W·span) and for tokens ((T + T/W·span) / tokens per request); the smaller
counts. Reported per strategy: successes, capacity, successes / capacity (goal ≥ 0.95),
client-visible errors other than honest 429s (goal 0; honest: 429 ``pool_exhausted`` from
yugongd or the upstream's 429 ``rate_limit_exceeded`` passed through), upstream 429s per
success (goal < 0.05), p50/p99 latency of successes. It prints a Markdown table and writes
bench/results/pool_efficiency.md (``--output``).

CPU pinning as bench/run.py: yugongd on ``--proxy-cpus`` (0), the fake and this client on
``--load-cpus`` (1). Every phase is bounded in time; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from limited_upstream import KEYS, request_cost
from run import (
    BenchError,
    Procs,
    _interrupt,
    add_pinning_arguments,
    cpu_seconds,
    free_port,
    machine_basics,
    pinning,
    post_json,
    raise_nofile,
    rss_peak_mb,
    tail,
    twistd_argv,
    wait_http,
)
from stream_client import percentile

HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = ("least-loaded", "round-robin", "weighted", "random")
REQUEST_TIMEOUT = 30.0  # one client request, seconds
MAX_CONNECTIONS = 512

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
state: memory
upstreams:
  - name: fake
    base_url: "http://127.0.0.1:{upport}/v1"
    timeouts: {{connect: 5, first_byte: 20, idle: 20}}
    keys:
{keys}
pool:
  strategy: {strategy}
  queue_timeout: {queue_timeout}
"""


def request_body(max_tokens: int) -> bytes:
    """bench/request.json, compact, non-streamed, with ``max_tokens``."""
    with open(os.path.join(HERE, "request.json"), "rb") as f:
        doc = json.loads(f.read())
    doc["max_tokens"] = max_tokens
    doc.pop("stream", None)
    return json.dumps(doc, separators=(",", ":")).encode()


# --- capacity --------------------------------------------------------------------------------


def orgs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kid, org in KEYS.values():
        out.setdefault(org, []).append(kid)
    return out


def capacity(args: argparse.Namespace, tokens_per_request: int, span: float) -> dict[str, Any]:
    """The pool's true capacity over ``span`` seconds from full buckets, in requests."""
    per_org = {}
    for org in orgs():
        by_req = args.requests + args.requests / args.window * span
        by_tok = (args.tokens + args.tokens / args.window * span) / tokens_per_request
        per_org[org] = {"requests": by_req, "tokens": by_tok, "binds": min(by_req, by_tok)}
    total = sum(o["binds"] for o in per_org.values())
    binding = sorted(
        {"requests" if o["requests"] <= o["tokens"] else "tokens" for o in per_org.values()}
    )
    return {"span": span, "per_org": per_org, "total": total, "binding": "+".join(binding)}


# --- the open-loop client --------------------------------------------------------------------


@dataclass
class Result:
    sent_at: float  # seconds from the start of the run
    outcome: str  # "ok" | "429 pool_exhausted" | "429 rate_limit_exceeded" | error text
    latency: float = 0.0
    status: int = 0


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Client:
    """Keep-alive connections to one host; a request takes an idle one or opens one."""

    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    idle: list[Conn] = field(default_factory=list)
    opened: int = 0
    open_now: int = 0

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        head = [f"POST {u.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(self.body)}"]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + self.body

    async def _conn(self) -> Conn:
        if self.idle:
            return self.idle.pop()
        if self.open_now >= MAX_CONNECTIONS:
            raise BenchError(f"client: more than {MAX_CONNECTIONS} connections busy")
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        self.open_now += 1
        return Conn(reader, writer)

    def _drop(self, conn: Conn) -> None:
        self.open_now -= 1
        conn.writer.close()

    async def send(self, sent_at: float) -> Result:
        t0 = time.perf_counter()
        conn: Conn | None = None
        try:
            conn = await self._conn()
            status, body, keep = await asyncio.wait_for(self._exchange(conn), REQUEST_TIMEOUT)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ValueError,
            IndexError,
        ) as e:
            if conn is not None:
                self._drop(conn)
            what = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            return Result(sent_at, f"connection error: {what}", time.perf_counter() - t0)
        except BenchError as e:
            return Result(sent_at, f"not sent: {e}", 0.0)
        latency = time.perf_counter() - t0
        if keep:
            self.idle.append(conn)
        else:
            self._drop(conn)
        return Result(sent_at, classify(status, body), latency, status)

    async def _exchange(self, conn: Conn) -> tuple[int, bytes, bool]:
        conn.writer.write(self.request)
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        keep = hdrs.get("connection", "").lower() != "close"
        if "content-length" in hdrs:
            body = await conn.reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await conn.reader.readuntil(b"\r\n")
                    break
                parts.append((await conn.reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        else:
            body = await conn.reader.read(1 << 20)
            keep = False
        return status, body, keep


def classify(status: int, body: bytes) -> str:
    if status == 200:
        return "ok" if b'"chat.completion"' in body else "200 without a completion"
    code = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        code = json.loads(body)["error"]["code"]
    return f"{status} {code}" if code else f"{status}"


HONEST = ("429 pool_exhausted", "429 rate_limit_exceeded")


async def offer(url: str, body: bytes, rate: float, duration: float) -> tuple[list[Result], float]:
    """Send at ``rate``/s for ``duration`` s, whatever the answers (open loop); then wait for
    the stragglers, at most REQUEST_TIMEOUT + 5 s. (results, seconds the sending took)."""
    client = Client(url, body)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Result]] = []
    n = int(rate * duration)
    start = loop.time()
    for i in range(n):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.send(loop.time() - start)))
    sending = loop.time() - start
    _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    results = []
    for t in tasks:
        if t in pending or t.cancelled():
            results.append(Result(0.0, "connection error: not finished"))
        else:
            results.append(t.result())
    for conn in client.idle:
        conn.writer.close()
    return results, sending


# --- one strategy ----------------------------------------------------------------------------


def get_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def run_strategy(
    args: argparse.Namespace, strategy: str, workdir: str, body: bytes, tpr: int
) -> dict[str, Any]:
    load_prefix, proxy_prefix = pinning(args)
    procs = Procs()
    sub = os.path.join(workdir, strategy)
    os.makedirs(sub, exist_ok=True)
    try:
        upport, port = free_port(), free_port()
        fake = procs.start(
            "limited fake upstream",
            load_prefix
            + [
                sys.executable,
                os.path.join(HERE, "limited_upstream.py"),
                "--port",
                str(upport),
                "--requests",
                str(args.requests),
                "--tokens",
                str(args.tokens),
                "--window",
                str(args.window),
                "--latency",
                str(args.latency),
                "--header-time",
                args.header_time,
            ],
            os.path.join(sub, "fake_upstream.log"),
        )
        keys = "\n".join(
            f'      - {{id: {kid}, key: "{secret}", organization: {org}}}'
            for secret, (kid, org) in KEYS.items()
        )
        cfg = os.path.join(sub, "yugongd.yaml")
        with open(cfg, "w") as f:
            f.write(
                CONFIG.format(
                    port=port,
                    upport=upport,
                    keys=keys,
                    strategy=strategy,
                    queue_timeout=args.queue_timeout,
                )
            )
        yproc = procs.start(
            "yugongd",
            proxy_prefix + twistd_argv() + ["-n", "--pidfile=", "yugongd", "--config", cfg],
            os.path.join(sub, "yugongd.log"),
        )
        fake_base = f"http://127.0.0.1:{upport}"
        wait_http(f"{fake_base}/v1/models", fake, 15)
        wait_http(f"http://127.0.0.1:{port}/healthz", yproc, 30)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        status, resp = post_json(url, body, None)
        if status != 200:
            raise BenchError(f"{strategy}: smoke request got HTTP {status}: {resp[:300]!r}")
        get_json(f"{fake_base}/bench/reset", "POST")  # full buckets, zero counters: time 0

        cap_d = capacity(args, tpr, args.duration)
        rate = args.overload * cap_d["total"] / args.duration
        print(
            f"{strategy}: offering {rate:.1f} req/s for {args.duration:g}s "
            f"({args.overload:g} × capacity {cap_d['total']:.0f})",
            flush=True,
        )
        cpu0 = cpu_seconds(yproc.popen.pid)
        t0 = time.monotonic()
        results, sending = asyncio.run(offer(url, body, rate, args.duration))
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(yproc.popen.pid)
        stats = get_json(f"{fake_base}/bench/stats")
        if yproc.popen.poll() is not None:
            raise BenchError(f"yugongd died:\n{tail(yproc.log)}")
        rss = rss_peak_mb(yproc.popen.pid)
        procs.stop_all()
        log_problems = scan_log(yproc.log)
    finally:
        procs.stop_all()
    return summarize(
        args, strategy, results, stats, tpr, rate, sending, wall, cpu0, cpu1, rss, log_problems
    )


def scan_log(path: str) -> dict[str, Any]:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    lines = text.splitlines()
    failed = [ln for ln in lines if "failed: HTTP 429" in ln]
    errs = [
        ln
        for ln in lines
        if ("Traceback" in ln or " error" in ln.lower() or "unhandled" in ln.lower())
        and "attempt" not in ln
        and "status=" not in ln
    ]
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "attempt_429_lines": len(failed),
        "error_lines": errs[:5],
    }


def summarize(
    args: argparse.Namespace,
    strategy: str,
    results: list[Result],
    stats: dict[str, Any],
    tpr: int,
    rate: float,
    sending: float,
    wall: float,
    cpu0: float | None,
    cpu1: float | None,
    rss: float | None,
    log_problems: dict[str, Any],
) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    ok = [r for r in results if r.outcome == "ok"]
    lat = [r.latency * 1000.0 for r in ok]
    errors = {k: v for k, v in outcomes.items() if k != "ok" and k not in HONEST}
    upstream_429 = sum(k["429_requests"] + k["429_tokens"] for k in stats["keys"].values())
    accepted = sum(k["accepted"] for k in stats["keys"].values())
    span = max(args.duration, stats["last_accept"])
    cap = capacity(args, tpr, span)
    # when and where the upstream's 429s happened
    hot = []
    for kid, tl in stats["timeline"].items():
        for sec, (_acc, n429) in tl.items():
            if n429:
                hot.append((n429, int(sec), kid))
    hot.sort(reverse=True)
    return {
        "strategy": strategy,
        "offered": len(results),
        "rate": rate,
        "sending_s": sending,
        "wall_s": wall,
        "ok": len(ok),
        "outcomes": outcomes,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "pool_exhausted": outcomes.get("429 pool_exhausted", 0),
        "passed_429": outcomes.get("429 rate_limit_exceeded", 0),
        "upstream_accepted": accepted,
        "upstream_429": upstream_429,
        "upstream_429_per_ok": upstream_429 / len(ok) if ok else None,
        "capacity": cap,
        "efficiency": len(ok) / cap["total"] if cap["total"] else None,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "yugongd_cpu_pct": (
            100.0 * (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None
        ),
        "yugongd_rss_mb": rss,
        "keys": stats["keys"],
        "fake_errors": stats["errors"],
        "hot_429_seconds": [{"second": s, "key": k, "429s": n} for n, s, k in hot[:8]],
        "timeline": stats["timeline"],
        "log": log_problems,
    }


# --- reporting -------------------------------------------------------------------------------


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[dict[str, Any]]) -> str:
    def goal(ok: bool) -> str:
        return "✓" if ok else "✗"

    head = ["metric"] + [r["strategy"] for r in runs]
    rows = [
        ("offered requests (req/s)", [f"{r['offered']} ({r['rate']:.1f}/s)" for r in runs]),
        ("successes (200)", [str(r["ok"]) for r in runs]),
        (
            "true capacity (span s, binding)",
            [
                f"{r['capacity']['total']:.0f} ({r['capacity']['span']:.1f} s, "
                f"{r['capacity']['binding']})"
                for r in runs
            ],
        ),
        (
            "successes / capacity (goal ≥ 0.95)",
            [f"{_f(r['efficiency'], '.3f')} {goal((r['efficiency'] or 0) >= 0.95)}" for r in runs],
        ),
        (
            "client-visible non-429 errors (goal 0)",
            [f"{r['errors']} {goal(r['errors'] == 0)}" for r in runs],
        ),
        (
            "honest 429s: pool_exhausted / upstream passed through",
            [f"{r['pool_exhausted']} / {r['passed_429']}" for r in runs],
        ),
        ("upstream 429s", [str(r["upstream_429"]) for r in runs]),
        (
            "upstream 429s per success (goal < 0.05)",
            [
                f"{_f(r['upstream_429_per_ok'], '.4f')} "
                f"{goal(r['upstream_429_per_ok'] is not None and r['upstream_429_per_ok'] < 0.05)}"
                for r in runs
            ],
        ),
        (
            "success latency p50 / p99, ms",
            [f"{_f(r['p50_ms'], '.0f')} / {_f(r['p99_ms'], '.0f')}" for r in runs],
        ),
        (
            "upstream admissions per key (key1+key2 / key3 / key4)",
            [
                "{}+{} / {} / {}".format(
                    *(r["keys"][k]["accepted"] for k in ("key1", "key2", "key3", "key4"))
                )
                for r in runs
            ],
        ),
        ("yugongd CPU, % of a core", [_f(r["yugongd_cpu_pct"], ".0f") for r in runs]),
    ]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(runs)]
    out += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    return "\n".join(out)


def findings(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in runs:
        s = r["strategy"]
        if r["error_kinds"]:
            out.append(f"{s}: client-visible errors {r['error_kinds']}")
        if r["upstream_429"]:
            per_key = {
                k: v["429_requests"] + v["429_tokens"]
                for k, v in r["keys"].items()
                if v["429_requests"] + v["429_tokens"]
            }
            by_limit = {
                "requests": sum(v["429_requests"] for v in r["keys"].values()),
                "tokens": sum(v["429_tokens"] for v in r["keys"].values()),
            }
            hot = ", ".join(
                f"{h['key']}@{h['second']}s: {h['429s']}" for h in r["hot_429_seconds"][:5]
            )
            out.append(
                f"{s}: upstream 429s by key {per_key}, by limit {by_limit}; busiest seconds {hot}"
            )
        if r["fake_errors"]:
            out.append(f"{s}: the fake upstream refused requests: {r['fake_errors']}")
        if r["ok"] != r["upstream_accepted"]:
            out.append(
                f"{s}: {r['ok']} successes at the client but {r['upstream_accepted']} admissions "
                "at the upstream"
            )
        log = r["log"]
        if log.get("tracebacks"):
            out.append(f"{s}: yugongd logged {log['tracebacks']} tracebacks")
        if log.get("error_lines"):
            out.append(f"{s}: yugongd error lines, e.g. {log['error_lines'][0][:300]!r}")
    return out


def write_results(
    path: str,
    args: argparse.Namespace,
    md: str,
    notes: list[str],
    runs: list[dict[str, Any]],
    tpr: int,
    body: bytes,
) -> None:
    pin = pinning(args)
    info = machine_basics(["bench/pool_efficiency.py", *args.argv])
    info += [
        (
            "pinning",
            f"yugongd on CPU {args.proxy_cpus}; fake upstream and client on CPU {args.load_cpus}"
            if pin[0]
            else "none",
        ),
        (
            "limits",
            f"per organisation R={args.requests} requests and T={args.tokens} tokens per "
            f"W={args.window:g}s; 4 keys: key1+key2 → org-a, key3 → org-b, key4 → org-c",
        ),
        (
            "load",
            f"D={args.duration:g}s at {args.overload:g} × capacity, non-streamed, "
            f"{len(body)} B body + max_tokens {args.max_tokens} = {tpr} tokens a request; "
            f"upstream latency {args.latency:g}s; headers taken at {args.header_time}; "
            f"pool.queue_timeout {args.queue_timeout:g}",
        ),
    ]
    lines = ["# yugongd pool efficiency", ""]
    lines += [f"- {k}: {v}" for k, v in info]
    lines += ["", md, "", "## Notes", ""]
    lines += [f"- {n}" for n in notes] or ["none: no upstream 429s, no errors"]
    lines += ["", "## Raw measurements", "", "```json"]
    for r in runs:
        lines.append(json.dumps({k: v for k, v in r.items() if k != "timeline"}, sort_keys=True))
    lines += [
        "```",
        "",
        "Per-second upstream timeline, `second: [accepted, 429s]` per key:",
        "",
        "```json",
    ]
    for r in runs:
        lines.append(
            json.dumps({"strategy": r["strategy"], "timeline": r["timeline"]}, sort_keys=True)
        )
    lines += ["```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="yugongd pool efficiency under OpenAI-style per-organisation limits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=60, help="R: requests per window per org (60)")
    p.add_argument("--tokens", type=int, default=30000, help="T: tokens per window per org (30000)")
    p.add_argument("--window", type=float, default=6.0, help="W: the limits' window, s (6)")
    p.add_argument("--duration", type=float, default=60.0, help="D: seconds of load (60)")
    p.add_argument("--quick", action="store_true", help="D = 15 s")
    p.add_argument("--overload", type=float, default=1.2, help="offered / capacity (1.2)")
    p.add_argument("--max-tokens", type=int, default=100, help="max_tokens of each request")
    p.add_argument("--latency", type=float, default=0.2, help="upstream seconds per 200 (0.2)")
    p.add_argument(
        "--header-time",
        choices=("admission", "response"),
        default="admission",
        help="when the fake takes its x-ratelimit-* values (admission)",
    )
    p.add_argument("--queue-timeout", type=float, default=1.0, help="pool.queue_timeout (1)")
    p.add_argument(
        "--strategies",
        default="least-loaded,round-robin",
        help="comma-separated pool.strategy values (least-loaded,round-robin)",
    )
    add_pinning_arguments(p)
    p.add_argument(
        "--output",
        default=os.path.join(HERE, "results", "pool_efficiency.md"),
        help="Markdown results file; '' for none",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    a = p.parse_args(argv)
    a.argv = argv
    if a.quick:
        a.duration = min(a.duration, 15.0)
    a.strategy_list = [s.strip() for s in a.strategies.split(",") if s.strip()]
    for s in a.strategy_list:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    if not 1 <= a.duration <= 3600:
        p.error("--duration must be between 1 and 3600")
    if a.requests < 1 or a.tokens < 1 or a.window <= 0 or a.overload <= 0 or a.max_tokens < 1:
        p.error("--requests, --tokens, --window, --overload and --max-tokens must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load_prefix, _ = pinning(args)
    if load_prefix and hasattr(os, "sched_setaffinity"):
        # this process is the client: it shares the load CPUs with the fake
        with contextlib.suppress(OSError, ValueError):
            cpus = {int(c) for c in args.load_cpus.split(",") if c.strip().isdigit()}
            if cpus:
                os.sched_setaffinity(0, cpus)
    body = request_body(args.max_tokens)
    tpr = request_cost(body)
    workdir = tempfile.mkdtemp(prefix="yugongd-pool-bench-")
    runs = []
    try:
        for strategy in args.strategy_list:
            runs.append(run_strategy(args, strategy, workdir, body, tpr))
        md = table(runs)
        notes = findings(runs)
        print()
        print(md)
        if notes:
            print("\nnotes:\n" + "\n".join(f"- {n}" for n in notes))
        if args.output:
            write_results(args.output, args, md, notes, runs, tpr, body)
            print(f"\nwritten to {os.path.relpath(args.output, os.getcwd())}")
        return 0
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        args.keep = True
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"logs and configs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
