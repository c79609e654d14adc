"""Every benchmark, one after the other, with small sizes (a smoke run that prints real figures, in bounded time).

.venv/bin/python bench/run_all.py [--full] [--only NAME ...] [--timeout 240]

Each benchmark runs as its own process with the arguments below (`--full`: its own defaults, the sizes
BENCHMARKS.md quotes); its output is printed as it comes; one that overruns --timeout is stopped (its
process group) and reported. Ends with a table of each benchmark's outcome and time; the exit status is 1
if any failed or overran.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (name, script, small arguments): the order they run in.
BENCHES: list[tuple[str, str, list[str]]] = [
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
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds one benchmark may take")
    args = parser.parse_args()
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    results: list[tuple[str, str, float]] = []
    for name, script, small in BENCHES:
        if args.only and name not in args.only:
            continue
        argv = [sys.executable, str(HERE / script), *([] if args.full else small)]
        outcome, seconds = run(name, argv, args.timeout)
        results.append((name, outcome, seconds))
    print("\n=== summary")
    for name, outcome, seconds in results:
        print(f"  {name:<14} {outcome:<28} {seconds:7.1f} s")
    return 0 if all(outcome == "ok" for _name, outcome, _s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
