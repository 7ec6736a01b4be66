"""Before/after on a noisy machine: bench/run.py on two git revisions, taking turns.

    python bench/ab.py BEFORE [AFTER] [--rounds 3] [-- run.py options...]

On a shared virtual machine the same run moves by 10–30% from one minute to the next, so a
"before" measured yesterday and an "after" measured today compare the machine as much as the
code. This checks BEFORE out into a temporary git worktree (AFTER defaults to the working
tree) and runs ``bench/run.py`` of each revision against its own code, alternately, for
``--rounds`` rounds; it prints (and writes with ``--output``) a table of each round's figures
side by side with the after/before ratio, and the median of the ratios.

Options after ``--`` go to ``bench/run.py`` of both (e.g. ``-- --phases streams``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: (label, phase, key in run.py's raw measurements, higher is better)
METRICS = [
    ("requests/s, 32 conn", "32 conn", "rps", True),
    ("p50 latency ms, 1 conn", "1 conn", "p50_ms", False),
    ("p99 latency ms, 1 conn", "1 conn", "p99_ms", False),
    ("requests/s, 1 conn", "1 conn", "rps", True),
    ("stream TTFB p50 ms", "streams", "ttfb_p50_ms", False),
    ("stream duration p50 ms", "streams", "total_p50_ms", False),
    ("CPU µs per relayed event", "streams", "cpu_per_event_us", False),
]


def git(*args: str, cwd: str = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_bench(tree: str, extra: list[str]) -> dict[tuple[str, str], float]:
    """One bench/run.py run of ``tree`` against its own code; {(target, phase): figures}."""
    with tempfile.NamedTemporaryFile(suffix=".md", delete=False) as f:
        out = f.name
    env = {**os.environ, "PYTHONPATH": tree}
    argv = [sys.executable, os.path.join(tree, "bench", "run.py"), "--output", out, *extra]
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/run.py failed in {tree}:\n{proc.stdout[-3000:]}{proc.stderr}")
    figures: dict = {}
    with open(out) as fh:
        text = fh.read()
    os.unlink(out)
    raw = text.split("```json", 1)[1].split("```", 1)[0]
    for line in raw.strip().splitlines():
        rec = json.loads(line)
        if rec.get("target") != "yugongd":
            continue
        phase = "streams" if "streams" in rec["phase"] else rec["phase"]
        if phase == "streams" and rec.get("events") and rec.get("cpu_s_yugongd") is not None:
            rec["cpu_per_event_us"] = rec["cpu_s_yugongd"] / rec["events"] * 1e6
        figures[phase] = rec
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="git revision measured as 'before'")
    p.add_argument("after", nargs="?", help="git revision for 'after' (default: working tree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default="", help="also write the Markdown here")
    args = p.parse_args(argv)

    trees: dict[str, str] = {}
    made: list[str] = []
    try:
        for label, rev in (("before", args.before), ("after", args.after)):
            if rev is None:
                trees[label] = ROOT
                continue
            path = tempfile.mkdtemp(prefix=f"yugongd-ab-{label}-")
            git("worktree", "add", "--detach", path, rev)
            made.append(path)
            trees[label] = path
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):
            this = {}
            for label in ("before", "after"):
                print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                this[label] = run_bench(trees[label], extra)
            rounds.append(this)
    finally:
        for path in made:
            subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT)

    desc_after = args.after or f"working tree ({git('rev-parse', '--short', 'HEAD')}+)"
    lines = [
        "# yugongd before/after, taking turns",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"- before: {args.before} ({git('rev-parse', '--short', args.before)}); after: {desc_after}",
        f"- command: python bench/ab.py {shlex.join(sys.argv[1:])}",
        "- each round runs bench/run.py of 'before', then of 'after' (yugongd figures only)",
        "",
        "| metric | "
        + " | ".join(f"round {i + 1} before → after" for i in range(len(rounds)))
        + " | median after/before |",
        "|---|" + "---:|" * (len(rounds) + 1),
    ]
    for label, phase, key, _higher in METRICS:
        cells = []
        ratios = []
        for rnd in rounds:
            b = rnd["before"].get(phase, {}).get(key)
            a = rnd["after"].get(phase, {}).get(key)
            if b is None or a is None:
                cells.append("-")
                continue
            cells.append(f"{b:,.2f} → {a:,.2f}")
            if b:
                ratios.append(a / b)
        if not ratios:
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.median(ratios):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
