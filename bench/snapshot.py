"""How long a snapshot of the central store takes, against the floor of a plain sqlite3 backup of the same file.

.venv/bin/python bench/snapshot.py [--rows 100000 1000000] [--repeat 3] [--writer]

For each size, one central agent file (a real `CentralStore` replica, WAL, the table `events` of the other
benchmarks: ~100 bytes a row) is filled, then, alternately in the same run:

- `replicator.snapshots.write_snapshot`: the online backup of every file, switched to one file, sha256,
  fsync, manifest, atomic rename (what serve does every --snapshot-interval, and `replicator backup`);
- the floor: `sqlite3.Connection.backup` of the same file into a fresh file and nothing else;
- for scale, `shutil.copyfile` of the same file (a byte copy, not consistent while written).

Medians of --repeat runs. With --writer, a thread commits one row per transaction to the file throughout
(the apply thread of a serving replicator), and the rows it committed during each copy are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, report

from replicator.central_store import CentralStore
from replicator.data_dir import DataDir
from replicator.snapshots import stamp_of, write_snapshot


def fill(data: DataDir, rows: int) -> CentralStore:
    store = CentralStore(data)
    rep = store.replica("bench-agent")
    rep.begin()
    rep.conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")
    rep.commit()
    batch = 10_000
    for start in range(0, rows, batch):
        rep.begin()
        rep.conn.executemany(
            "INSERT INTO events (id, kind, payload, score) VALUES (?, ?, ?, ?)",
            [(i, "click", f"payload {i} " + "x" * 60, i * 0.5) for i in range(start, min(rows, start + batch))],
        )
        rep.state.watermark = min(rows, start + batch)
        rep.commit()
    rep.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store


def plain_backup(src: Path, dest: Path) -> None:
    source = sqlite3.connect(src)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


class Writer:
    """Commits one row per transaction into the replica until stopped (the apply thread's part)."""

    def __init__(self, store: CentralStore, first_id: int) -> None:
        self.rep = store.replicas["bench-agent"]
        self.next_id = first_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.rep.begin()
            self.rep.conn.execute(
                "INSERT INTO events (id, kind, payload, score) VALUES (?, 'w', 'written meanwhile', 0.0)",
                (self.next_id,),
            )
            self.rep.state.watermark += 1
            self.rep.commit()
            self.next_id += 1


def measure(rows: int, repeat: int, with_writer: bool) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        data = DataDir(Path(tmp) / "data")
        started = time.perf_counter()
        store = fill(data, rows)
        src = data.agent_db("bench-agent")
        size = src.stat().st_size
        print(f"\n{rows:,} rows: file {size / 2**20:,.1f} MiB, filled in {time.perf_counter() - started:.1f} s")
        writer = Writer(store, rows) if with_writer else None
        if writer is not None:
            writer.thread.start()
        times: dict[str, list[float]] = {"snapshot": [], "backup": [], "copy": []}
        during: list[int] = []
        try:
            for i in range(repeat):
                out = Path(tmp) / f"run{i}"
                out.mkdir()
                before = writer.next_id if writer else 0
                t = time.perf_counter()
                write_snapshot(data, out / stamp_of(time.time()), 0)
                times["snapshot"].append(time.perf_counter() - t)
                if writer:
                    during.append(writer.next_id - before)
                t = time.perf_counter()
                plain_backup(src, out / "plain.db")
                times["backup"].append(time.perf_counter() - t)
                t = time.perf_counter()
                shutil.copyfile(src, out / "copy.db")
                times["copy"].append(time.perf_counter() - t)
                shutil.rmtree(out)
        finally:
            if writer is not None:
                writer.stop.set()
                writer.thread.join()
            store.close()
        snap, floor, copy = (statistics.median(times[k]) for k in ("snapshot", "backup", "copy"))
        report("snapshot (write_snapshot: backup, sha256, fsync, manifest)", snap * 1000, "ms")
        report("floor: plain sqlite3 backup of the same file", floor * 1000, "ms")
        report("byte copy of the file (shutil.copyfile)", copy * 1000, "ms")
        report("snapshot / plain backup", snap / floor, "x")
        report("snapshot throughput", size / 2**20 / snap, "MiB/s")
        if during:
            report("rows committed by the writer during each snapshot (median)", statistics.median(during), "rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--writer", action="store_true", help="commit rows into the file throughout")
    args = parser.parse_args()
    print(f"machine: {machine()}; SQLite {sqlite3.sqlite_version}")
    for rows in args.rows:
        measure(rows, args.repeat, args.writer)


if __name__ == "__main__":
    main()
