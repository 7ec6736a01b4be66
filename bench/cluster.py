"""Cluster mode benchmark: one process on SQLite vs 1..N processes on Redis, one port.

    python bench/cluster.py [--duration 5] [--processes 1,2] [--connections 32]

For each setup it starts the fast fake upstream (bench/fake_upstream.py), a redis-server on
a free loopback port (for the Redis setups) and the yugongd processes (``reuseport:`` on one
port), then measures with wrk (bench/chat.lua): requests/s at ``--connections`` connections
and the latency of a lone request (1 connection). The account has an rpm and a credit
limit, so that every request pays the cluster's admission round trip (the worst case;
an account without limits pays none). The Redis cost per request is read from Redis'
``INFO commandstats``: calls of EVALSHA/EVAL per request and Redis CPU time per call.

It prints one Markdown table and writes it to bench/results/cluster.md (``--output``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as base  # noqa: E402

CONFIG = """\
listen: "{listen}"
state: "{state}"
access_log: {{enabled: false}}
cluster: {{instance: "b{i}", spool_dir: "{workdir}"}}
upstreams:
  - name: fake
    base_url: "http://127.0.0.1:{upport}/v1"
    keys:
      - {{id: k1, key: "sk-bench-key-1-aaaaaaaaaaaa"}}
      - {{id: k2, key: "sk-bench-key-2-bbbbbbbbbbbb"}}
accounts:
  - name: bench
    key: "{account}"
    rpm: 100000000
    credit_usd: 1000000000
"""


def redis_stats(port: int) -> dict[str, tuple[int, float]]:
    """``{command: (calls, usec)}`` from INFO commandstats."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            m = re.match(rb"\$(\d+)\r\n", data)
            if m and len(data) >= m.end() + int(m.group(1)):
                break
            if not chunk:
                break
    out = {}
    for m in re.finditer(rb"cmdstat_(\w+):calls=(\d+),usec=(\d+)", data):
        out[m.group(1).decode()] = (int(m.group(2)), float(m.group(3)))
    return out


def setup(
    name: str, n: int, redis: bool, args: argparse.Namespace, procs: base.Procs, work: str
) -> tuple[str, int | None]:
    """Start the upstream, Redis and ``n`` yugongd processes; the chat URL and Redis port."""
    upport, port = base.free_port(), base.free_port()
    fake = procs.start(
        "fake upstream",
        [sys.executable, os.path.join(HERE, "fake_upstream.py"), "--port", str(upport)],
        os.path.join(work, f"{name}-fake.log"),
    )
    base.wait_http(f"http://127.0.0.1:{upport}/v1/models", fake, 15)
    rport = None
    state = f"sqlite:{os.path.join(work, name + '.db')}"
    if redis:
        rport = base.free_port()
        procs.start(
            "redis",
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", ""],
            os.path.join(work, f"{name}-redis.log"),
        )
        state = f"redis://127.0.0.1:{rport}/0"
        time.sleep(0.3)
    listen = f"reuseport:{port}:interface=127.0.0.1" if redis else f"tcp:{port}:interface=127.0.0.1"
    for i in range(n):
        cfg = os.path.join(work, f"{name}-{i}.yaml")
        with open(cfg, "w") as f:
            f.write(
                CONFIG.format(
                    listen=listen,
                    state=state,
                    i=i,
                    workdir=work,
                    upport=upport,
                    account=base.ACCOUNT_KEY,
                )
            )
        p = procs.start(
            f"yugongd {name} {i}",
            base.twistd_argv() + ["-n", "--pidfile=", "yugongd", "--config", cfg],
            os.path.join(work, f"{name}-{i}.log"),
        )
        base.wait_http(f"http://127.0.0.1:{port}/healthz", p, 30)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with open(os.path.join(HERE, "request.json"), "rb") as f:
        body = f.read()
    deadline = time.monotonic() + 15
    while True:
        status, resp = base.post_json(url, body, base.ACCOUNT_KEY)
        if status == 200:
            break
        if time.monotonic() > deadline:
            raise base.BenchError(f"{name}: smoke request got HTTP {status}: {resp[:300]!r}")
        time.sleep(0.2)
    return url, rport


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--processes", default="1,2", help="Redis setups: process counts (1,2)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--output", default=os.path.join(HERE, "results", "cluster.md"))
    args = p.parse_args(argv)
    if not shutil.which("wrk") or not shutil.which("redis-server"):
        print("needs wrk and redis-server (apt-get install wrk redis-server)", file=sys.stderr)
        return 2
    base.raise_nofile()
    wrk_args = argparse.Namespace(wrk_threads=1, no_pin=True, load_cpus="", proxy_cpus="")
    setups = [("sqlite-1", 1, False)] + [
        (f"redis-{n}", int(n), True) for n in args.processes.split(",")
    ]
    rows: list[dict[str, Any]] = []
    work = tempfile.mkdtemp(prefix="yugongd-cluster-bench-")
    for name, n, redis in setups:
        procs = base.Procs()
        runner = base.Runner(wrk_args, procs, work)
        try:
            url, rport = setup(name, n, redis, args, procs, work)
            target = base.Target(name, url, base.ACCOUNT_KEY)
            runner.wrk(target, args.connections, 1)  # warm-up
            before = redis_stats(rport) if rport else {}
            tput = runner.wrk(target, args.connections, args.duration)
            after = redis_stats(rport) if rport else {}
            lone = runner.wrk(target, 1, args.duration)
            row: dict[str, Any] = {
                "setup": name,
                "rps": tput["rps"],
                "p50": tput["p50_ms"],
                "p99": tput["p99_ms"],
                "lone_p50": lone["p50_ms"],
                "lone_p99": lone["p99_ms"],
                "errors": tput["non2xx"] + tput["socket_errors"],
            }
            if rport:
                calls = usec = 0.0
                for cmd in ("evalsha", "eval"):
                    c1, u1 = after.get(cmd, (0, 0.0))
                    c0, u0 = before.get(cmd, (0, 0.0))
                    calls += c1 - c0
                    usec += u1 - u0
                requests = max(1, tput["requests"])
                row["scripts_per_request"] = calls / requests
                row["redis_usec_per_request"] = usec / requests
            rows.append(row)
            print(row, flush=True)
        finally:
            procs.stop_all()
    head = (
        f"| setup | requests/s (c={args.connections}) | p50 ms | p99 ms | lone request p50 ms | "
        "p99 ms | errors | Redis scripts / request | Redis µs / request |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            "| {setup} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {lone_p50:.2f} | {lone_p99:.2f} | "
            "{errors} | {spr} | {us} |".format(
                **r,
                spr=f"{r['scripts_per_request']:.2f}" if "scripts_per_request" in r else "–",
                us=f"{r['redis_usec_per_request']:.1f}" if "redis_usec_per_request" in r else "–",
            )
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(
                "# Cluster benchmark\n\n"
                f"`python bench/cluster.py --duration {args.duration} --processes "
                f"{args.processes} --connections {args.connections}` on "
                f"{os.cpu_count()} CPUs, everything (wrk, fake upstream, Redis, yugongd) on "
                "one machine, unpinned.\n\n" + table + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
