"""What the metrics and the access log cost per request: yugongd with and without them.

    python bench/feature_cost.py [--duration 10] [--rounds 3] [--quick]

Starts bench/fake_upstream.py and, one after the other, yugongd with the default plugins
(``default``), with ``plugins.disable: [metrics]`` (``no-metrics``), with
``[accesslog]`` (``no-accesslog``) and with both off (``neither``); each variant is
measured ``--rounds`` times, interleaved (A B C D A B C D ...) so that drift in the
machine's speed spreads over all of them. Each measurement is wrk at 32 connections
(requests/s, and from yugongd's CPU time the CPU microseconds per request) and at one
connection (p50 latency). The figures are medians and minima over the rounds; the cost
of a feature is the difference in CPU µs per request between the variant with it and
without it. On a shared or virtual machine the rounds of one variant can differ by 25%,
more than the features cost: the minimum (the run least disturbed) is the better guide.

Before the daemons, it times the plugins' per-request hooks in this process (the best of
5 × 20,000 calls, with a log observer writing to /dev/null like twistd's): precise figures
for what each feature adds, free of that noise.

Writes bench/results/feature_cost.md (``--output``). Pinning as bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (bench/run.py: processes, wrk, machine info)

VARIANTS = {
    "default": [],
    "no-metrics": ["metrics"],
    "no-accesslog": ["accesslog"],
    "neither": ["metrics", "accesslog"],
}


def config(port: int, upport: int, state: str, disable: list[str]) -> str:
    text = run.CONFIG.format(port=port, upport=upport, state=state, account=run.ACCOUNT_KEY)
    if disable:
        text += "plugins:\n  disable: [" + ", ".join(disable) + "]\n"
    return text


def micro() -> dict[str, float]:
    """µs per request of the metrics, access-log and accounting hooks, timed in-process."""
    import timeit

    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from yugongd import logtime
    from yugongd.config import default_config
    from yugongd.gateway import Gateway
    from yugongd.httpclient import ResponseHeaders
    from yugongd.model import Account, Call, Outcome, Usage
    from yugongd.state import MemoryState

    sink = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sink)], discardBuffer=True, redirectStandardIO=False
    )
    logtime.install()
    gw = Gateway(
        default_config({"OPENAI_API_KEY": "sk-bench"}), MemoryReactorClock(), MemoryState()
    )
    gw.apply_config(gw.config)
    key = next(iter(gw.pool.keys.values()))
    call = Call(
        request_id="req-0123456789abcdef",
        endpoint="/v1/chat/completions",
        method="POST",
        client_ip="127.0.0.1",
        started=1.0,
        account=Account(id="a1", name="bench", key_hash="x"),
        model="gpt-4o-mini",
    )
    outcome = Outcome(
        status=200,
        code=None,
        attempts=1,
        key_id=key.id,
        latency=0.0012,
        first_byte_latency=0.001,
        bytes_out=700,
        client_gone=False,
        usage=Usage(300, 100, 400, 0.0001234, False),
        upstream_latency=0.0004,
        upstream_first_byte=0.0003,
    )

    class _Response:
        code = 200
        headers = ResponseHeaders([(b"x-ratelimit-remaining-requests", b"9999")])

    n = 20000
    out: dict[str, float] = {}
    for name in ("metrics", "accesslog", "accounting"):
        plugin = gw.pm.get_plugin(name)
        best = min(
            timeit.repeat(
                lambda p=plugin: p.yugongd_request_finished(call=call, outcome=outcome),
                number=n,
                repeat=5,
            )
        )
        if hasattr(plugin, "yugongd_upstream_response"):
            best += min(
                timeit.repeat(
                    lambda p=plugin: p.yugongd_upstream_response(
                        call=call, key=key, response=_Response
                    ),
                    number=n,
                    repeat=5,
                )
            )
        out[name] = best / n * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per variant (default 3)")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    run.add_pinning_arguments(p)
    p.add_argument("--output", default=os.path.join(run.HERE, "results", "feature_cost.md"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.duration, args.rounds = 2, 1
    hooks = micro()
    print(
        "in-process, µs per request: "
        + ", ".join(f"{name} {us:.1f}" for name, us in hooks.items()),
        flush=True,
    )
    # what run.Runner reads from its args
    args.wrk_threads = 1
    args.events, args.interval, args.ramp = 50, 0.02, 0.0
    run.raise_nofile()
    workdir = tempfile.mkdtemp(prefix="yugongd-feature-cost-")
    procs = run.Procs()
    runner = run.Runner(args, procs, workdir)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        upport = run.free_port()
        fake = procs.start(
            "fake upstream",
            runner.load_prefix
            + [sys.executable, os.path.join(run.HERE, "fake_upstream.py"), "--port", str(upport)],
            os.path.join(workdir, "fake_upstream.log"),
        )
        run.wait_http(f"http://127.0.0.1:{upport}/v1/models", fake, 15)
        for rnd in range(args.rounds):
            for name, disable in VARIANTS.items():
                port = run.free_port()
                cfg = os.path.join(workdir, f"{name}.yaml")
                state = os.path.join(workdir, f"{name}-{rnd}.db")
                with open(cfg, "w") as f:
                    f.write(config(port, upport, state, disable))
                y = procs.start(
                    f"yugongd {name}",
                    runner.proxy_prefix
                    + run.twistd_argv()
                    + ["-n", "--pidfile=", "yugongd", "--config", cfg],
                    os.path.join(workdir, f"{name}-{rnd}.log"),
                )
                run.wait_http(f"http://127.0.0.1:{port}/healthz", y, 30)
                target = run.Target(
                    "yugongd",
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    run.ACCOUNT_KEY,
                    {"yugongd": y.popen.pid},
                )
                runner.wrk(target, 32, 2)  # warm-up
                print(f"round {rnd + 1}: {name} ...", flush=True)
                many = runner.measure(
                    target, f"{name} 32", lambda t=target: runner.wrk(t, 32, args.duration)
                )
                one = runner.measure(
                    target, f"{name} 1", lambda t=target: runner.wrk(t, 1, args.duration)
                )
                results[name].append(
                    {
                        "rps": many["rps"],
                        "cpu_us": 1e6 * many["cpu_s_yugongd"] / max(1, many["requests"]),
                        "p50_1": one["p50_ms"],
                        "errors": many["non2xx"] + many["socket_errors"],
                    }
                )
                y.popen.terminate()
                y.popen.wait(20)
                procs.procs.remove(y)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name])

    def low(name: str, field: str) -> float:
        return min(r[field] for r in results[name])

    base_min = low("default", "cpu_us")
    lines = [
        "| variant | requests/s (32 conn), median | CPU µs per request, median / min | "
        "min vs default | p50 latency at 1 conn, ms, median | non-2xx + socket errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        cpu, cpu_min = med(name, "cpu_us"), low(name, "cpu_us")
        lines.append(
            f"| {name} | {med(name, 'rps'):,.0f} | {cpu:.0f} / {cpu_min:.0f} | "
            f"{cpu_min - base_min:+.0f} µs ({100 * (cpu_min - base_min) / base_min:+.1f}%) | "
            f"{med(name, 'p50_1'):.2f} | {sum(r['errors'] for r in results[name])} |"
        )
    table = "\n".join(lines)
    summary = (
        "In-process, per request: "
        + "; ".join(
            f"{name} {us:.1f} µs ({100 * us / base_min:.1f}% of the default's least "
            f"disturbed {base_min:.0f} µs)"
            for name, us in hooks.items()
        )
        + "."
    )
    print()
    print(table)
    print()
    print(summary)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        info = run.machine_basics(["bench/feature_cost.py", *(argv or sys.argv[1:])])
        out = ["# yugongd: what metrics and the access log cost", ""]
        out += [f"- {k}: {v}" for k, v in info]
        out += [
            f"- pinning: yugongd on CPU {args.proxy_cpus}; fake upstream and wrk on CPU "
            f"{args.load_cpus}"
            if runner.pinned
            else "- pinning: none",
            f"- load: wrk {args.duration}s per run, ~1.2 KB chat request; {args.rounds} "
            "rounds, variants interleaved, medians shown",
            "",
            table,
            "",
            summary,
            "",
            "## Raw measurements",
            "",
            "```",
            *(f"{n}: {results[n]}" for n in VARIANTS),
            "```",
            "",
        ]
        with open(args.output, "w") as f:
            f.write("\n".join(out))
        print(f"\nwritten to {os.path.relpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
