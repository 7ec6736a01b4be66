"""One-command benchmark: the same load sent directly to a fast fake upstream and through yugongd.

    python bench/run.py [--duration 10] [--connections 32] [--streams 100] [--quick]

It starts bench/fake_upstream.py and yugongd (``twistd -n yugongd`` with a temporary config and
SQLite state in a temporary directory), waits until both answer, then for each phase measures
the direct target and the yugongd target one after the other:

- ``throughput``: wrk, non-streaming chat completions (~1.2 KB body), at ``--connections``
  connections: requests/s, p50, p99, non-2xx and socket errors;
- ``latency``: the same at 1 connection: the latency yugongd adds to a lone request;
- ``streams``: bench/stream_client.py with ``--streams`` concurrent streams: time to first
  event (p50/p99), delay between events (mean/p99), stream duration.

With two or more CPUs and ``taskset`` available, yugongd runs on CPU 0 and the fake upstream
and the load generators on CPU 1 (``--proxy-cpus``/``--load-cpus``, ``--no-pin``).

It prints one Markdown table (metric | direct | yugongd | difference | ratio) and writes it,
with the machine information, to bench/results/latest.md (``--output``). Everything it
started is stopped at the end, also on Ctrl-C or an error.

``--connections`` and ``--streams`` take comma-separated lists (``--streams 100,1000``); each
value adds its own rows. ``--phases`` selects phases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ACCOUNT_KEY = "sk-bench-account-0123456789"
PHASES = ("throughput", "latency", "streams")

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1:backlog=1024"
state: "sqlite:{state}"
upstreams:
  - name: fake
    base_url: "http://127.0.0.1:{upport}/v1"
    keys:
      - {{id: k1, key: "sk-bench-key-1-aaaaaaaaaaaa"}}
      - {{id: k2, key: "sk-bench-key-2-bbbbbbbbbbbb"}}
accounts:
  - name: bench
    key: "{account}"
"""


class BenchError(Exception):
    pass


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    """Raise the soft open-files limit to the hard one (children inherit it): 1,000 streams
    through a proxy need 2,000+ descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def rss_peak_mb(pid: int, field: str = "VmHWM") -> float | None:
    """Peak resident memory of ``pid`` in MB (``field="VmRSS"``: the current one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: str


class Procs:
    """Background processes, stopped in reverse order by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], log: str, cwd: str = ROOT) -> Proc:
        out = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
        try:
            popen = subprocess.Popen(
                argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            out.close()
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def stop_all(self, grace: float = 10.0) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            left = max(0.1, deadline - time.monotonic())
            try:
                p.popen.wait(left)
            except subprocess.TimeoutExpired:
                print(f"{p.name} did not stop on SIGTERM; killing it", file=sys.stderr)
                p.popen.kill()
                p.popen.wait(5)
        self.procs.clear()


def twistd_argv() -> list[str]:
    """twistd of this interpreter (the one yugongd is installed in)."""
    exe = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    """Until GET ``url`` answers 200, the process dies, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} not ready at {url} after {timeout:g}s ({last}):\n{tail(proc.log)}"
    )


def post_json(url: str, body: bytes, key: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def add_pinning_arguments(p: argparse.ArgumentParser) -> None:
    """``--proxy-cpus``, ``--load-cpus`` and ``--no-pin``, read by :func:`pinning`."""
    p.add_argument("--proxy-cpus", default="0", help="taskset CPU list for yugongd")
    p.add_argument("--load-cpus", default="1", help="taskset CPU list for the rest")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")


def pinning(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``taskset`` prefixes (load generators, proxy) from ``--load-cpus``/``--proxy-cpus``;
    both empty with ``--no-pin``, one CPU, or no ``taskset``."""
    if not args.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", args.load_cpus], ["taskset", "-c", args.proxy_cpus]
    return [], []


# --- load generators -------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # "direct" | "yugongd"
    url: str  # chat completions URL
    key: str | None
    pids: dict[str, int] = field(default_factory=dict)  # processes whose CPU is reported


class Runner:
    def __init__(self, args: argparse.Namespace, procs: Procs, workdir: str) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.load_prefix, self.proxy_prefix = pinning(args)
        self.pinned = bool(self.load_prefix)
        self.raw: list[dict[str, Any]] = []  # every measurement, for the results file

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run a load generator to completion (bounded by ``timeout``); its stdout."""
        try:
            cp = subprocess.run(
                self.load_prefix + argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{shlex.join(argv)} took more than {timeout:g}s") from e
        if cp.returncode not in (0, 1):
            raise BenchError(f"{shlex.join(argv)} exited {cp.returncode}:\n{cp.stderr[-2000:]}")
        return cp.stdout

    def measure(
        self, target: Target, label: str, fn: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run ``fn`` and add the CPU use of the target's processes over it (% of one CPU)."""
        before = {n: cpu_seconds(p) for n, p in target.pids.items()}
        t0 = time.monotonic()
        res = fn()
        wall = time.monotonic() - t0
        for n, p in target.pids.items():
            b, a = before[n], cpu_seconds(p)
            if a is not None and b is not None and wall > 0:
                res[f"cpu_{n}"] = 100.0 * (a - b) / wall
                res[f"cpu_s_{n}"] = a - b
            rss = rss_peak_mb(p, "VmRSS")
            if rss is not None:
                res[f"rss_end_{n}_mb"] = rss
        self.raw.append({"target": target.name, "phase": label, **res})
        return res

    def wrk(self, target: Target, connections: int, duration: int) -> dict[str, Any]:
        threads = max(1, min(self.args.wrk_threads, connections))
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
        argv += ["--timeout", "10s", "-s", os.path.join(HERE, "chat.lua"), target.url]
        env = {"BENCH_BODY": os.path.join(HERE, "request.json"), "BENCH_KEY": target.key or ""}
        out = self.run(argv, timeout=duration + 30, env=env)
        return parse_wrk(out)

    def streams(self, target: Target, n: int) -> dict[str, Any]:
        a = self.args
        timeout = a.events * a.interval + a.ramp + 30.0 + n / 50.0
        argv = [sys.executable, os.path.join(HERE, "stream_client.py"), target.url]
        argv += ["--streams", str(n), "--events", str(a.events), "--interval", str(a.interval)]
        argv += ["--timeout", f"{timeout:g}", "--json", "--ramp", f"{a.ramp:g}"]
        if target.key:
            argv += ["--key", target.key]
        out = self.run(argv, timeout=timeout + 15)
        return json.loads(out.strip().splitlines()[-1])


def parse_wrk(out: str) -> dict[str, Any]:
    """requests/s, latencies (ms) and errors from wrk's output (the chat.lua JSON line, with the
    text lines as a check)."""
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if not m:
        raise BenchError(f"no BENCH_JSON line in wrk output:\n{out[-2000:]}")
    j = json.loads(m.group(1))
    lat = j["latency_us"]
    res: dict[str, Any] = {
        "requests": j["requests"],
        "rps": j["requests"] / (j["duration_us"] / 1e6) if j["duration_us"] else 0.0,
        "p50_ms": lat["p50"] / 1000.0,
        "p90_ms": lat["p90"] / 1000.0,
        "p99_ms": lat["p99"] / 1000.0,
        "max_ms": lat["max"] / 1000.0,
        "non2xx": j["errors"]["status"],
        "socket_errors": sum(j["errors"][k] for k in ("connect", "read", "write", "timeout")),
        "errors": j["errors"],
    }
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if m:
        res["non2xx"] = max(res["non2xx"], int(m.group(1)))
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        res["rps_wrk"] = float(m.group(1))
    return res


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    direct: Any
    yugongd: Any
    kind: str  # "rate" (ratio only) | "time" (difference and ratio) | "info" (neither)


def fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "time":
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.0f}"
    return str(v)


def table(rows: list[Row]) -> str:
    out = [
        "| metric | direct | yugongd | yugongd − direct | yugongd / direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, y = r.direct, r.yugongd
        num = isinstance(d, int | float) and isinstance(y, int | float)
        diff = f"{y - d:+.2f}" if num and r.kind == "time" else ""
        ratio = f"{y / d:.3f}" if num and r.kind in ("rate", "time") and d else ""
        out.append(f"| {r.metric} | {fmt(d, r.kind)} | {fmt(y, r.kind)} | {diff} | {ratio} |")
    return "\n".join(out)


def wrk_rows(tag: str, d: dict[str, Any], y: dict[str, Any]) -> list[Row]:
    return [
        Row(f"non-stream requests/s ({tag})", d["rps"], y["rps"], "rate"),
        Row(f"non-stream p50 latency, ms ({tag})", d["p50_ms"], y["p50_ms"], "time"),
        Row(f"non-stream p99 latency, ms ({tag})", d["p99_ms"], y["p99_ms"], "time"),
        Row(
            f"non-2xx / socket errors ({tag})",
            f"{d['non2xx']} / {d['socket_errors']}",
            f"{y['non2xx']} / {y['socket_errors']}",
            "info",
        ),
        Row(f"yugongd CPU, % of a core ({tag})", None, y.get("cpu_yugongd"), "info"),
        Row(
            f"fake upstream CPU, % of a core ({tag})", d.get("cpu_fake"), y.get("cpu_fake"), "info"
        ),
    ]


def stream_rows(tag: str, d: dict[str, Any], y: dict[str, Any]) -> list[Row]:
    def ok(s: dict[str, Any]) -> str:
        return f"{s['ok']}/{s['streams']}, {s['events']} ev, {s['usage_chunks']} usage"

    return [
        Row(f"stream TTFB p50, ms ({tag})", d["ttfb_p50_ms"], y["ttfb_p50_ms"], "time"),
        Row(f"stream TTFB p99, ms ({tag})", d["ttfb_p99_ms"], y["ttfb_p99_ms"], "time"),
        Row(f"inter-event delay mean, ms ({tag})", d["gap_mean_ms"], y["gap_mean_ms"], "time"),
        Row(f"inter-event delay p99, ms ({tag})", d["gap_p99_ms"], y["gap_p99_ms"], "time"),
        Row(f"stream duration p50, ms ({tag})", d["total_p50_ms"], y["total_p50_ms"], "time"),
        Row(f"stream duration p99, ms ({tag})", d["total_p99_ms"], y["total_p99_ms"], "time"),
        Row(f"streams ok ({tag})", ok(d), ok(y), "info"),
        Row(f"yugongd CPU, % of a core ({tag})", None, y.get("cpu_yugongd"), "info"),
        Row(
            f"yugongd CPU per relayed event, µs ({tag})",
            None,
            (1e6 * y["cpu_s_yugongd"] / y["events"])
            if y.get("cpu_s_yugongd") is not None and y.get("events")
            else None,
            "info",
        ),
    ]


# --- machine information ---------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_basics(command: list[str]) -> list[tuple[str, str]]:
    """Date, command, git revision, CPU, kernel, Python and Twisted versions."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import twisted

        tw = twisted.__version__
    except ImportError:
        tw = "?"
    rev = _cmd(["git", "rev-parse", "--short", "HEAD"])
    if _cmd(["git", "status", "--porcelain", "--untracked-files=no"]):
        rev += " (with uncommitted changes)"
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("command", shlex.join(["python", *command])),
        ("git", rev),
        ("CPU", f"{cpu}, nproc {os.cpu_count()}"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("Twisted", tw),
    ]


def machine_info(runner: Runner) -> list[tuple[str, str]]:
    wrk_v = _cmd(["wrk", "-v"]).splitlines()
    a = runner.args
    return [
        *machine_basics(["bench/run.py", *a.argv]),
        ("wrk", wrk_v[0] if wrk_v else "?"),
        (
            "pinning",
            f"yugongd on CPU {a.proxy_cpus}; fake upstream and load generators on CPU {a.load_cpus}"
            if runner.pinned
            else "none (--no-pin, one CPU, or no taskset)",
        ),
        (
            "load",
            f"wrk {a.duration}s per run (-t{a.wrk_threads}), ~1.2 KB request body; streams of "
            f"{a.events} events {a.interval * 1000:g} ms apart",
        ),
    ]


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="yugongd benchmark: direct vs through yugongd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument(
        "--connections", default="32", help="wrk connections, comma-separated (default 32)"
    )
    p.add_argument(
        "--streams",
        default=None,
        help="concurrent streams, comma-separated (default 1000; 100 with --quick)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="seconds over which the streams are started (default 0: all at once)",
    )
    p.add_argument("--events", type=int, default=50, help="events per stream (default 50)")
    p.add_argument(
        "--interval", type=float, default=0.02, help="seconds between events (default 0.02)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per wrk run")
    p.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds per target")
    add_pinning_arguments(p)
    p.add_argument(
        "--output",
        default=os.path.join(HERE, "results", "latest.md"),
        help="Markdown results file (default bench/results/latest.md); '' for none",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs, db)")
    a = p.parse_args(argv)
    a.argv = argv
    if a.quick:
        a.duration = min(a.duration, 2)
        a.warmup = min(a.warmup, 1)
        a.events = min(a.events, 25)
    if a.streams is None:
        a.streams = "100" if a.quick else "1000"
    a.connection_list = [int(c) for c in a.connections.split(",") if c.strip()]
    a.stream_list = [int(s) for s in a.streams.split(",") if s.strip()]
    a.phase_list = [s.strip() for s in a.phases.split(",") if s.strip()]
    for ph in a.phase_list:
        if ph not in PHASES:
            p.error(f"unknown phase {ph!r}; choose from {', '.join(PHASES)}")
    if a.duration < 1:
        p.error("--duration must be at least 1")
    return a


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not shutil.which("wrk") and ({"throughput", "latency"} & set(args.phase_list)):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    raise_nofile()
    # Ctrl-C and SIGTERM both unwind through the finally below
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored

    workdir = tempfile.mkdtemp(prefix="yugongd-bench-")
    procs = Procs()
    runner = Runner(args, procs, workdir)
    yproc: Proc | None = None
    try:
        upport, port = free_port(), free_port()
        fake = procs.start(
            "fake upstream",
            runner.load_prefix
            + [sys.executable, os.path.join(HERE, "fake_upstream.py"), "--port", str(upport)],
            os.path.join(workdir, "fake_upstream.log"),
        )
        cfg = os.path.join(workdir, "yugongd.yaml")
        with open(cfg, "w") as f:
            f.write(
                CONFIG.format(
                    port=port,
                    upport=upport,
                    state=os.path.join(workdir, "yugongd.db"),
                    account=ACCOUNT_KEY,
                )
            )
        yproc = procs.start(
            "yugongd",
            runner.proxy_prefix + twistd_argv() + ["-n", "--pidfile=", "yugongd", "--config", cfg],
            os.path.join(workdir, "yugongd.log"),
        )
        wait_http(f"http://127.0.0.1:{upport}/v1/models", fake, 15)
        wait_http(f"http://127.0.0.1:{port}/healthz", yproc, 30)

        direct = Target(
            "direct",
            f"http://127.0.0.1:{upport}/v1/chat/completions",
            None,
            {"fake": fake.popen.pid},
        )
        via = Target(
            "yugongd",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            ACCOUNT_KEY,
            {"fake": fake.popen.pid, "yugongd": yproc.popen.pid},
        )
        with open(os.path.join(HERE, "request.json"), "rb") as f:
            body = f.read()
        for t in (direct, via):
            status, resp = post_json(t.url, body, t.key)
            if status != 200:
                raise BenchError(f"{t.name}: smoke request got HTTP {status}: {resp[:300]!r}")

        print(f"fake upstream :{upport}, yugongd :{port}, work dir {workdir}", flush=True)
        time.sleep(1.0)
        idle_rss = rss_peak_mb(yproc.popen.pid, "VmRSS")
        if args.warmup and ({"throughput", "latency"} & set(args.phase_list)):
            for t in (direct, via):
                print(f"warm-up {t.name} ({args.warmup}s)", flush=True)
                runner.wrk(t, max(args.connection_list + [1]), args.warmup)

        rows: list[Row] = []
        results: dict[str, dict[str, Any]] = {}
        for phase in args.phase_list:
            if phase == "throughput":
                specs = [(f"{c} conn", c) for c in args.connection_list]
            elif phase == "latency":
                specs = [("1 conn", 1)]
            else:
                specs = [(f"{n} streams", n) for n in args.stream_list]
            for tag, n in specs:
                pair = {}
                for t in (direct, via):
                    print(f"{phase}: {t.name}, {tag} ...", flush=True)
                    if phase == "streams":
                        fn = lambda t=t, n=n: runner.streams(t, n)  # noqa: E731
                    else:
                        fn = lambda t=t, n=n: runner.wrk(t, n, args.duration)  # noqa: E731
                    pair[t.name] = runner.measure(t, tag, fn)
                    if yproc.popen.poll() is not None:
                        raise BenchError(f"yugongd died:\n{tail(yproc.log)}")
                results[tag] = pair
                make = stream_rows if phase == "streams" else wrk_rows
                rows += make(tag, pair["direct"], pair["yugongd"])

        rss = rss_peak_mb(yproc.popen.pid)
        rows.append(
            Row("yugongd idle RSS (started, 2 requests served), MB", None, idle_rss, "info")
        )
        rows.append(Row("yugongd peak RSS over the whole run, MB", None, rss, "info"))
        rows.append(
            Row("yugongd RSS at the end, MB", None, rss_peak_mb(yproc.popen.pid, "VmRSS"), "info")
        )
        md = table(rows)
        problems = find_problems(runner.raw, yproc.log)
        print()
        print(md)
        if problems:
            print("\nproblems:\n" + "\n".join(f"- {p}" for p in problems))
        if args.output:
            write_results(args.output, runner, md, problems)
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
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            print(f"logs, config and state kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def find_problems(raw: list[dict[str, Any]], ylog: str) -> list[str]:
    out = []
    for r in raw:
        where = f"{r['target']}, {r['phase']}"
        if r.get("non2xx"):
            out.append(f"{where}: {r['non2xx']} non-2xx responses")
        if r.get("socket_errors"):
            out.append(f"{where}: socket errors {r['errors']}")
        if r.get("failed"):
            out.append(f"{where}: {r['failed']} streams failed: {r['errors']}")
    try:
        with open(ylog, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        out.append(f"yugongd logged {tracebacks} tracebacks")
    errs = [ln for ln in text.splitlines() if re.search(r"\b(error|unhandled)\b", ln, re.I)]
    if errs:
        out.append(f"yugongd logged {len(errs)} error lines, e.g. {errs[0][:300]!r}")
    return out


def write_results(path: str, runner: Runner, md: str, problems: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = ["# yugongd benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info(runner)]
    lines += ["", md, ""]
    lines += ["## Problems", ""]
    lines += [f"- {p}" for p in problems] or ["none seen (no non-2xx, socket errors or log errors)"]
    lines += ["", "## Raw measurements", "", "```json"]
    lines += [json.dumps(r, sort_keys=True) for r in runner.raw]
    lines += ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
