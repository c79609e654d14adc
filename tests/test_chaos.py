"""Fault harness: SIGKILL and restart the agent, the replicator and nats-server at random moments.

An agent process (tests/support/chaos_agent.py) writes random transactions without
pause and logs every committed state. At random points the central copy must
equal one of those states (a committed prefix: order and atomicity); at the
end it must equal the agent's replicated tables row for row, with the
watermark at the agent's last sequence. CI runs CHAOS_CYCLES=8; `make chaos`
runs 200. CHAOS_SEED replays a run; CHAOS_REPORT=path writes the figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos_agent import STATE_QUERIES, checksum_rows
from tests.support.htpc import HtpcProcess
from tests.support.nats_server import NatsServer

AGENT_ID = "chaos-agent"
REPO = Path(__file__).resolve().parent.parent
CYCLES = int(os.environ.get("CHAOS_CYCLES", "8"))


class AgentProcess:
    def __init__(self, data_dir: Path, nats_url: str, history: Path, log: Path) -> None:
        self.data_dir, self.nats_url, self.history, self.log = data_dir, nats_url, history, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.seed = 0

    def _argv(self, *extra: str) -> list[str]:
        self.seed += 1
        return [
            sys.executable,
            "-m",
            "tests.support.chaos_agent",
            str(self.data_dir),
            AGENT_ID,
            self.nats_url,
            str(self.history),
            str(self.seed),
            *extra,
        ]

    def start(self) -> None:
        """Start and wait until this process says `ready` (its SIGTERM handler is installed by then)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self._argv(),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if b"ready" in self.log.read_bytes()[offset:]:
                return
            assert self.proc.poll() is None, f"agent died at start:\n{self.log.read_text()[-2000:]}"
            time.sleep(0.05)
        raise AssertionError("agent not ready in 30 s")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()[-2000:]

    def flush(self) -> None:
        """Publish whatever the killed/stopped agent left in its log (a process that only flushes)."""
        with self.log.open("ab") as out:
            code = subprocess.run(
                self._argv("--flush-and-exit"),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
            ).returncode
        assert code == 0, self.log.read_text()[-2000:]


def _rows(conn: sqlite3.Connection) -> list[list[tuple[Any, ...]]]:
    out = []
    for query in STATE_QUERIES:
        try:
            out.append([tuple(r) for r in conn.execute(query)])
        except sqlite3.OperationalError:  # the table's schema change is not applied yet
            out.append([])
    return out


def central_state(path: Path) -> tuple[int, str, list[list[tuple[Any, ...]]]] | None:
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for the watermark and the rows
        row = conn.execute("SELECT value FROM _cr_state WHERE key = 'watermark'").fetchone()
        rows = _rows(conn)
        conn.execute("COMMIT")
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return (int(row[0]) if row else 0), checksum_rows(rows), rows


def local_state(path: Path) -> tuple[int, str, list[list[tuple[Any, ...]]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN")
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'").fetchone()
        rows = _rows(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return int(seq[0]), checksum_rows(rows), rows


def read_history(path: Path) -> dict[int, str]:
    history: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a SIGKILL can leave a torn last line
            history[int(parts[0])] = parts[1]
    return history


def test_chaos_kill_restart_converges(tmp_path: Path, nats_server: NatsServer) -> None:
    seed = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    print(f"\nchaos: seed {seed}, {CYCLES} cycles")
    htpc = HtpcProcess(tmp_path / "htpc", nats_server.url)
    agent = AgentProcess(tmp_path / "agent", nats_server.url, tmp_path / "history.txt", tmp_path / "agent.log")
    central_db = tmp_path / "htpc" / "agents" / f"{AGENT_ID}.db"
    faults: Counter[str] = Counter()
    checks: Counter[str] = Counter()

    def check_prefix() -> None:
        state = central_state(central_db)
        if state is None or state[0] == 0:
            checks["not_started"] += 1
            return
        watermark, checksum, _rows = state
        expected = read_history(agent.history).get(watermark)
        if expected is None:
            checks["unverifiable"] += 1  # that state's history line died with a SIGKILLed agent, or a DDL step
            return
        assert checksum == expected, f"central copy at seq {watermark} is not the agent's committed state (seed {seed})"
        checks["prefix_ok"] += 1

    htpc.start()
    agent.start()
    try:
        started = time.monotonic()
        for _cycle in range(CYCLES):
            time.sleep(rng.uniform(0.2, 1.0))
            check_prefix()
            victim = rng.choice(["agent", "replicator", "nats"])
            faults[victim] += 1
            if victim == "agent":
                agent.kill()
                time.sleep(rng.uniform(0, 0.3))
                agent.start()
            elif victim == "replicator":
                htpc.kill()
                time.sleep(rng.uniform(0, 0.3))
                htpc.start()
            else:
                nats_server.kill()
                time.sleep(rng.uniform(0, 0.5))
                nats_server.start()
            for _ in range(rng.randint(1, 3)):
                time.sleep(rng.uniform(0.05, 0.3))
                check_prefix()
        run_seconds = time.monotonic() - started
        agent.stop()
        agent.flush()
        last_fault = time.monotonic()
        local_seq, local_sum, local_rows = local_state(tmp_path / "agent" / f"{AGENT_ID}.db")
        deadline = time.monotonic() + 90
        state = central_state(central_db)
        while time.monotonic() < deadline:
            state = central_state(central_db)
            if state is not None and state[0] == local_seq and state[1] == local_sum:
                break
            time.sleep(0.05)
        converge_s = time.monotonic() - last_fault
        assert state is not None, "the central copy was never created"
        watermark, central_sum, central_rows = state
        local_set = {(i, r) for i, t in enumerate(local_rows) for r in t}
        central_list = [(i, r) for i, t in enumerate(central_rows) for r in t]
        lost = len(local_set - set(central_list))
        duplicated = len(central_list) - len(set(central_list)) + len(set(central_list) - local_set)
        history = read_history(agent.history)
        report = {
            "seed": seed,
            "cycles": CYCLES,
            "faults": dict(faults),
            "transactions_logged": len(history),
            "last_seq": local_seq,
            "rows_compared": len(local_set),
            "rows_lost": lost,
            "rows_duplicated": duplicated,
            "prefix_checks": dict(checks),
            "run_seconds": round(run_seconds, 1),
            "converge_seconds_after_last_fault": round(converge_s, 2),
        }
        print("chaos report:", json.dumps(report))
        if os.environ.get("CHAOS_REPORT"):
            Path(os.environ["CHAOS_REPORT"]).write_text(json.dumps(report, indent=2))
        assert lost == 0 and duplicated == 0, report
        assert watermark == local_seq, f"watermark {watermark} != agent's last sequence {local_seq} ({report})"
        assert central_sum == local_sum, report
        assert checks["prefix_ok"] >= 1, f"no committed-prefix check could be verified ({report})"
        # nothing private crossed: the central store has no such table
        conn = sqlite3.connect(f"file:{central_db}?mode=ro", uri=True)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.close()
        assert "secrets" not in names
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()
        htpc.close()


pytestmark = [pytest.mark.chaos, pytest.mark.timeout(3600)]
