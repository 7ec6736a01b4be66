"""Soak test: a real ``twistd -n yugongd`` under minutes of mixed load with faults.

Two modes:

- default: ``--minutes N`` (default 15) of mixed load — chat completions streamed and not,
  embeddings, requests an account may not make, clients that leave mid-request — over a
  pool with a healthy key, a flaky key (500s, resets before the headers, 429s, streams cut
  after the first byte, hangs past the first-byte timeout) and a key whose upstream refuses
  connections. Every ``--interval`` seconds (default 10) it samples the daemon's RSS, open
  file descriptors, open upstream and client connections and requests in flight, and at
  the end reports start / after warm-up / peak / end / after drain, checks that every
  request has its ledger row, and writes Markdown to ``bench/results/soak.md``.
- ``--clients-not-reading N --seconds S``: N streams (default 1000) whose clients read
  nothing for S seconds (default 30), against ``bench/fake_upstream.py`` sending as fast as
  it may; reports the daemon's RSS growth (``bench/results/soak_not_reading.md``).

The fake upstream of the default mode is ``tests/fakeupstream.py`` (threaded, scriptable
faults), in this process; the load generator is threads in this process too. Run::

    python bench/soak.py --minutes 15
    python bench/soak.py --minutes 5 --concurrency 8
    python bench/soak.py --clients-not-reading 1000 --seconds 30

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakeupstream import Behaviour, FakeUpstream, rate_limited, server_error  # noqa: E402

ADMIN = "admin-soak-0123456789abcdef"
KEY_A = "sk-soak-a-0000000000000000000"
KEY_B = "sk-soak-b-0000000000000000000"
KEY_DEAD = "sk-soak-dead-000000000000000"
ACCOUNTS = {f"acct{i}": f"sk-soak-account-{i}-0123456789abcdef" for i in range(4)}
TWISTD = str(Path(sys.executable).parent / "twistd")


# --------------------------------------------------------------------------- /proc


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def socket_inodes(pid: int) -> tuple[int, set[str]]:
    """(open fds, inodes of the sockets among them)."""
    fds = 0
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return fds, inodes


def tcp_connections(inodes: set[str]) -> list[tuple[int, int]]:
    """(local port, remote port) of the non-listening TCP sockets with these inodes."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] == "0A" or f[9] not in inodes:
                continue
            out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)))
    return out


def sample(pid: int, daemon_port: int, upstream_port: int | None) -> dict[str, int]:
    fds, inodes = socket_inodes(pid)
    conns = tcp_connections(inodes)
    return {
        "rss_kb": rss_kb(pid),
        "fds": fds,
        "upstream_conns": sum(1 for _, r in conns if upstream_port and r == upstream_port),
        "client_conns": sum(1 for loc, _ in conns if loc == daemon_port),
    }


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "yugongd.yaml").write_text(config.replace("{port}", str(self.port)))
        self.log = open(workdir / "twistd.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "yugongd", "--config", str(workdir / "yugongd.yaml")],
            cwd=workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"yugongd exited: see {workdir / 'twistd.log'}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("yugongd did not start") from None
                time.sleep(0.1)

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return bytes(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# --------------------------------------------------------------------------- load


def faults(rng: random.Random, n: int) -> list[Behaviour]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(server_error(rng.choice([500, 502, 503])))
        elif r < 0.13:
            out.append(Behaviour(close_before_headers=True))
        elif r < 0.18:
            out.append(rate_limited(retry_after=0.5))
        elif r < 0.24:
            out.append(Behaviour(drop_after_events=1))
        elif r < 0.26:
            out.append(Behaviour(hang_before_headers=3))  # past first_byte: 1
        else:
            out.append(Behaviour())
    return out


class Load:
    """Worker threads sending random requests until told to stop."""

    def __init__(self, port: int, concurrency: int, seed: int) -> None:
        self.port = port
        self.concurrency = concurrency
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.sent = 0
        self.threads = [
            threading.Thread(target=self._worker, args=(i,), daemon=True)
            for i in range(concurrency)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _worker(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                outcome = self._one(rng, f"soak-{n}-{i}")
            except (OSError, http.client.HTTPException) as e:
                outcome = f"client error {type(e).__name__}"
            with self.lock:
                self.outcomes[outcome] += 1

    def _one(self, rng: random.Random, request_id: str) -> str:
        account = rng.choice(list(ACCOUNTS))
        kind = rng.choices(["chat", "stream", "embed", "denied"], [50, 38, 8, 4])[0]
        leave = rng.random() < 0.05
        headers = {
            "Authorization": f"Bearer {ACCOUNTS[account]}",
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            "x-fake-events": str(rng.randint(1, 20)),
        }
        if kind == "stream":
            headers["x-fake-interval"] = "0.01"
        if kind == "embed":
            path, doc = "/v1/embeddings", {"model": "text-embedding-3-small", "input": "soak"}
        else:
            doc = {
                "model": "gpt-4o" if kind == "denied" else "gpt-4o-mini",
                "messages": [{"role": "user", "content": "s" * rng.randint(1, 400)}],
                "stream": kind == "stream",
            }
            path = "/v1/chat/completions"
            if kind == "denied":
                headers["Authorization"] = f"Bearer {ACCOUNTS['acct0']}"
        if leave and kind != "stream":
            headers["x-fake-delay"] = "0.2"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, json.dumps(doc), headers)
            with self.lock:
                self.sent += 1
            if leave:
                if kind == "stream":
                    conn.getresponse().readline()
                else:
                    time.sleep(0.05)
                conn.sock.shutdown(socket.SHUT_RDWR)
                return "client left"
            resp = conn.getresponse()
            try:
                resp.read()
            except http.client.IncompleteRead:
                return f"{resp.status} cut"
            return str(resp.status)
        finally:
            conn.close()


# --------------------------------------------------------------------------- the soak


SOAK_CONFIG = f"""
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{ADMIN}"}}
pool: {{cooldown: 2, max_cooldown: 5, queue_timeout: 2, probe_interval: 30}}
access_log: {{enabled: false}}
upstreams:
  - name: dead
    base_url: "http://127.0.0.1:DEAD/v1"
    timeouts: {{connect: 1, first_byte: 1, idle: 2}}
    keys:
      - {{id: key-dead, key: "{KEY_DEAD}"}}
  - name: fake
    base_url: "URL"
    timeouts: {{connect: 1, first_byte: 1, idle: 2}}
    keys:
      - {{id: key-a, key: "{KEY_A}"}}
      - {{id: key-b, key: "{KEY_B}"}}
accounts:
""" + "".join(
    f'  - {{name: {name}, key: "{key}"'
    + (', models: ["gpt-4o-mini", "text-embedding-3-small"]' if name == "acct0" else "")
    + "}\n"
    for name, key in ACCOUNTS.items()
)


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def run_soak(args: argparse.Namespace) -> int:
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(60.0, duration / 5)
    workdir = Path(tempfile.mkdtemp(prefix="yugongd-soak-"))
    fake = FakeUpstream().start()
    config = SOAK_CONFIG.replace("URL", fake.url).replace("DEAD", str(free_port()))
    daemon = Daemon(workdir, config)
    pid = daemon.proc.pid
    samples: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    load = Load(daemon.port, args.concurrency, args.seed)
    refill_stop = threading.Event()

    def refill() -> None:
        while not refill_stop.wait(0.5):
            with fake._lock:
                queued = len(fake._scripts.get(KEY_B, ()))
            if queued < 300:
                fake.script(KEY_B, *faults(rng, 300))

    def take(t: float, phase: str) -> None:
        s: dict[str, Any] = {"t": round(t), "phase": phase, **sample(pid, daemon.port, fake.port)}
        text = daemon.get("/metrics").decode()
        s["in_flight"] = int(metric(text, "yugongd_requests_in_flight"))
        s["ledger_pending"] = int(metric(text, "yugongd_ledger_pending_rows"))
        with load.lock:
            s["requests"] = sum(load.outcomes.values())
        samples.append(s)
        print(
            f"[{s['t']:>5}s {phase:>7}] rss {mb(s['rss_kb'])} MB  fds {s['fds']}  "
            f"upstream conns {s['upstream_conns']}  client conns {s['client_conns']}  "
            f"in flight {s['in_flight']}  requests {s['requests']}",
            flush=True,
        )

    refill_thread = threading.Thread(target=refill, daemon=True)
    fake.script(KEY_B, *faults(rng, 300))
    status = 0
    try:
        started = time.monotonic()
        take(0, "start")
        refill_thread.start()
        load.start()
        next_at = started + args.interval
        while True:
            now = time.monotonic()
            if now >= started + duration:
                break
            time.sleep(max(0.0, min(next_at, started + duration) - now))
            if time.monotonic() >= next_at:
                t = time.monotonic() - started
                take(t, "warm-up" if t < warmup else "load")
                next_at += args.interval
        take(time.monotonic() - started, "load")
        load.join()
        refill_stop.set()
        load_seconds = time.monotonic() - started
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline:
            text = daemon.get("/metrics").decode()
            if (
                metric(text, "yugongd_requests_in_flight") == 0
                and metric(text, "yugongd_ledger_pending_rows") == 0
            ):
                break
            time.sleep(0.2)
        time.sleep(args.settle)
        take(time.monotonic() - started, "drained")
        daemon.stop()
        rows = ledger_rows(workdir / "yugongd.db")
        status = report(args, samples, warmup, load, load_seconds, rows)
    finally:
        load.stop.set()
        refill_stop.set()
        daemon.stop()
        fake.stop()
    print(f"(daemon log and state in {workdir})")
    return status


def ledger_rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])
    finally:
        conn.close()


def report(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    warmup: float,
    load: Load,
    load_seconds: float,
    rows: int,
) -> int:
    start = samples[0]
    during = [s for s in samples if s["phase"] in ("warm-up", "load")]
    warm = next((s for s in during if s["t"] >= warmup), during[-1])
    peak = max(during, key=lambda s: s["rss_kb"])
    end = [s for s in samples if s["phase"] == "load"][-1]
    drained = samples[-1]
    growth = (end["rss_kb"] - warm["rss_kb"]) / warm["rss_kb"] * 100
    total = sum(load.outcomes.values())
    flat = abs(growth) <= 10
    fd_leak = drained["fds"] - start["fds"] - drained["upstream_conns"]
    nothing_lost = rows == load.sent
    verdicts = [
        f"- memory: end {mb(end['rss_kb'])} MB vs {mb(warm['rss_kb'])} MB after warm-up "
        f"({growth:+.1f}%): {'flat (within 10%)' if flat else 'NOT within 10%'}",
        f"- descriptors: {start['fds']} at start, {drained['fds']} after drain, of which "
        f"{drained['upstream_conns']} pooled keep-alive upstream connections and "
        f"{drained['client_conns']} client connections: "
        f"{'no leak' if fd_leak <= 1 and drained['client_conns'] == 0 else f'{fd_leak} unexplained'}",
        f"- ledger: {rows} rows for {load.sent} requests sent: "
        f"{'nothing lost' if nothing_lost else 'MISMATCH'}",
    ]
    lines = [
        "# Soak",
        "",
        f"`python bench/soak.py --minutes {args.minutes:g} --concurrency {args.concurrency} "
        f"--interval {args.interval:g}` on {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Load: chat completions (streamed and not), embeddings, denied requests, 5% of clients "
        "leaving early; key-b fails ~26% of its attempts (5xx, resets, 429, streams cut "
        "after the first byte, hangs past the 1 s first-byte timeout); key-dead refuses "
        "connections (disabled after 5 strikes, probed every 30 s).",
        "",
        f"{total} requests in {load_seconds:.0f} s ({total / load_seconds:.0f}/s) with "
        f"{args.concurrency} client threads:",
        "",
        "| outcome | requests |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(load.outcomes.items())],
        "",
        "| point | t (s) | RSS (MB) | fds | upstream conns | client conns | in flight |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (
        ("start", start),
        ("after warm-up", warm),
        ("peak", peak),
        ("end of load", end),
        ("after drain", drained),
    ):
        lines.append(
            f"| {name} | {s['t']} | {mb(s['rss_kb'])} | {s['fds']} | {s['upstream_conns']} | "
            f"{s['client_conns']} | {s['in_flight']} |"
        )
    lines += ["", *verdicts, "", "All samples:", "", "```"]
    for s in samples:
        lines.append(
            f"{s['t']:>5}s {s['phase']:>7}  rss {mb(s['rss_kb']):>6} MB  fds {s['fds']:>4}  "
            f"upstream {s['upstream_conns']:>3}  clients {s['client_conns']:>3}  "
            f"in flight {s['in_flight']:>3}  requests {s['requests']}"
        )
    lines += ["```", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0 if (flat and nothing_lost) else 1


# --------------------------------------------------------------------------- not reading


NOT_READING_CONFIG = f"""
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "memory"
admin: {{token: "{ADMIN}"}}
limits: {{max_connections: MAXCONN}}
access_log: {{enabled: false}}
upstreams:
  - name: bench
    base_url: "URL"
    timeouts: {{connect: 5, first_byte: 30, idle: 300}}
    keys:
      - {{id: key-a, key: "{KEY_A}"}}
"""


def run_not_reading(args: argparse.Namespace) -> int:
    n, seconds = args.clients_not_reading, args.seconds
    workdir = Path(tempfile.mkdtemp(prefix="yugongd-notreading-"))
    ready = workdir / "fake.port"
    fake = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "fake_upstream.py"),
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = None
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while not (ready.exists() and ready.read_text().strip()):
            if time.monotonic() > deadline:
                raise SystemExit("bench/fake_upstream.py did not start")
            time.sleep(0.05)
        fake_port = int(ready.read_text())
        config = NOT_READING_CONFIG.replace("URL", f"http://127.0.0.1:{fake_port}/v1").replace(
            "MAXCONN", str(n + 100)
        )
        daemon = Daemon(workdir, config)
        pid = daemon.proc.pid
        body = json.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x" * 200}],
                "stream": True,
            }
        ).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            "x-bench-events: 100000\r\nx-bench-interval: 0\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        time.sleep(1)
        before = sample(pid, daemon.port, fake_port)
        print(f"before: rss {mb(before['rss_kb'])} MB, fds {before['fds']}", flush=True)
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", daemon.port))
            s.sendall(head + body)
            socks.append(s)
        opened = time.monotonic()
        series = []
        while time.monotonic() - opened < seconds:
            time.sleep(min(5.0, seconds - (time.monotonic() - opened)))
            cur = sample(pid, daemon.port, fake_port)
            cur["t"] = round(time.monotonic() - opened)
            series.append(cur)
            print(
                f"[{cur['t']:>3}s] rss {mb(cur['rss_kb'])} MB  fds {cur['fds']}  "
                f"upstream conns {cur['upstream_conns']}  client conns {cur['client_conns']}",
                flush=True,
            )
        for s in socks:
            s.close()
        socks = []
        time.sleep(3)
        after = sample(pid, daemon.port, fake_port)
        peak = max(series, key=lambda s: s["rss_kb"])
        growth = peak["rss_kb"] - before["rss_kb"]
        lines = [
            "# Clients that read nothing",
            "",
            f"`python bench/soak.py --clients-not-reading {n} --seconds {seconds:g}` on "
            f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"{n} streamed chat completions through yugongd to `bench/fake_upstream.py` "
            "(100,000 events each, sent as fast as the connection takes them); the clients "
            f"send their request and then read nothing for {seconds:g} s (receive buffer "
            "4 kB), then close.",
            "",
            "| point | RSS (MB) | fds | upstream conns | client conns |",
            "|---|---:|---:|---:|---:|",
            f"| before | {mb(before['rss_kb'])} | {before['fds']} | {before['upstream_conns']} | "
            f"{before['client_conns']} |",
            *[
                f"| {s['t']} s | {mb(s['rss_kb'])} | {s['fds']} | {s['upstream_conns']} | "
                f"{s['client_conns']} |"
                for s in series
            ],
            f"| 3 s after closing | {mb(after['rss_kb'])} | {after['fds']} | "
            f"{after['upstream_conns']} | {after['client_conns']} |",
            "",
            f"RSS growth at the peak: {mb(growth)} MB for {n} streams "
            f"({growth / n:.0f} kB a stream): the upstream reads pause while a client's "
            "buffer is full (backpressure) instead of the response piling up in memory.",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        return 0
    finally:
        for s in socks:
            s.close()
        if daemon is not None:
            daemon.stop()
        fake.terminate()
        fake.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="length of the soak (default 15)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=None, help="seconds (default min(60, 20%%))")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last sample")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients-not-reading", type=int, default=0, metavar="N")
    p.add_argument("--seconds", type=float, default=30.0, help="with --clients-not-reading")
    p.add_argument("--output", default=None, help="Markdown results ('' for none)")
    args = p.parse_args(argv)
    if args.output is None:
        name = "soak_not_reading.md" if args.clients_not_reading else "soak.md"
        args.output = str(ROOT / "bench" / "results" / name)
    if args.clients_not_reading:
        return run_not_reading(args)
    return run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
