"""Every benchmark, one after the other, with small sizes (a smoke run that prints real figures, in bounded time).

.venv/bin/python bench/run_all.py [--full] [--only NAME ...] [--timeout SECONDS]   (make bench [BENCH_ARGS=--full])

Each benchmark runs as its own process with the arguments below (`--full`: its own defaults, the sizes
BENCHMARKS.md quotes); its output is printed as it comes; one that overruns --timeout is stopped (its
process group) and reported. Ends with a table of each benchmark's outcome and time, then ONE table of
every speed figure beside the floor measured in the same run, their ratio, the target and whether it is
met (the benchmarks append those rows, `_common.summary`, to a file named by $BENCH_SUMMARY_FILE). The
exit status is 1 if any benchmark failed or overran (a target not met is a figure, not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SUMMARY_ENV, fmt

HERE = Path(__file__).resolve().parent

#: (name, script, small arguments): the order they run in.
BENCHES: list[tuple[str, str, list[str]]] = [
    ("write_speed", "write_speed.py", ["--writes", "5000", "--rounds", "5", "--seconds", "3"]),
    ("lag", "lag.py", ["--seconds", "5"]),
    (
        "apply_speed",
        "apply_speed.py",
        ["--batch-rows", "30000", "--agents", "100", "--per-agent", "50", "--catchup-rows", "300000"],
    ),
    ("many_agents", "many_agents.py", ["--seconds", "10", "--idle-seconds", "10"]),
    (
        "agent_writes",
        "agent_writes.py",
        ["--writes", "500", "--seconds", "1", "--txs", "50", "--rows", "100", "--drain-rows", "5000"],
    ),
    ("end_to_end", "end_to_end.py", ["--seconds", "1", "--rows", "10000", "--catchup-rows", "10000"]),
    ("gap_flood", "gap_flood.py", ["--records", "2000", "--probes", "10"]),
    (
        "http_flood",
        "http_flood.py",
        ["--seconds", "4", "--timeout-s", "2", "--slowloris", "50", "--idle", "100"],
    ),
    ("snapshot", "snapshot.py", ["--rows", "10000", "--repeat", "1"]),
    ("retention_disk", "retention_disk.py", ["--changes", "5000"]),
    ("resync", "resync.py", ["--rows", "5000"]),
    # issue 12: live change feeds
    ("feed_lag", "feed_lag.py", ["--seconds", "5"]),
    ("feed_idle", "feed_idle.py", ["--idle-seconds", "5"]),
    ("network_query", "network_query.py", ["--runs", "50", "--warmup", "5"]),
]


def run(name: str, argv: list[str], timeout: float) -> tuple[str, float]:
    """Run one benchmark, its output passed through; (outcome, seconds)."""
    print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=HERE.parent, start_new_session=True)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"stopped after {timeout:g} s", time.monotonic() - started
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark's own (full) sizes, not the small ones")
    parser.add_argument("--only", nargs="+", choices=[b[0] for b in BENCHES], help="run just these")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds one benchmark may take (default 240, 900 with --full)"
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 900.0 if args.full else 240.0
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    results: list[tuple[str, str, float]] = []
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", prefix="bench-summary-") as rows_file:
        os.environ[SUMMARY_ENV] = rows_file.name
        for name, script, small in BENCHES:
            if args.only and name not in args.only:
                continue
            argv = [sys.executable, str(HERE / script), *([] if args.full else small)]
            outcome, seconds = run(name, argv, args.timeout)
            results.append((name, outcome, seconds))
        rows = [json.loads(line) for line in rows_file.read().splitlines() if line.strip()]
    print("\n=== benchmarks")
    for name, outcome, seconds in results:
        print(f"  {name:<14} {outcome:<28} {seconds:7.1f} s")
    print_table(rows)
    return 0 if all(outcome == "ok" for _name, outcome, _s in results) else 1


def print_table(rows: list[dict[str, object]]) -> None:
    """The summary: each figure beside its floor (same run), ratio figure/floor, target, verdict."""
    header = ("figure", "value", "unit", "floor", "ratio", "target", "verdict")
    table = [header]
    for r in rows:
        verdict = "WRONG DATA" if not r["valid"] else ("met" if r["met"] else "NOT MET")
        table.append(
            (
                str(r["name"]),
                fmt(r["figure"]),  # type: ignore[arg-type]
                str(r["unit"]),
                fmt(r["floor"]),  # type: ignore[arg-type]
                fmt(r["ratio"], "x"),  # type: ignore[arg-type]
                str(r["target"]),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("\n=== speed summary (floor measured in the same run; ratio = value / floor)")
    for i, row in enumerate(table):
        cells = [c.rjust(w) if k in (1, 3, 4) else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(cells).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
