"""Disk used on the HTPC by a week of writes under the default retention (--stream-max-age 7d, --snapshots-keep 3):
measured on a sample, extrapolated to a week.

.venv/bin/python bench/retention_disk.py [--changes 100000] [--rates 1 10 100]

A real agent (AgentStorage) writes `--changes` changes through a real nats-server and `replicator serve`: a
realistic mix of transactions of 1-20 changes on the `events` table (60% inserts of 60-200 byte payloads, 25%
updates, 15% deletes), each transaction acknowledged before the next (one record per transaction, as at a
steady rate; --burst lets the publisher pack several into one record). Measured once everything is applied:

- the stream: bytes JetStream reports for AGENT_CHANGES, and what its directory takes on disk, per change;
- the central copy: the agent's file (after serve stopped: WAL checkpointed), per live row;
- a snapshot: what `replicator backup` (the same code as the periodic snapshots) writes.

Extrapolation (linear, stated as such): at R changes/s the stream holds R * 604,800 changes (a week, the
default --stream-max-age) at the measured bytes per change; the central copy holds the rows that mix leaves
alive after a week at the measured bytes per row; three snapshots (--snapshots-keep 3) are at most three
copies of it. Rebuild backups (--rebuild-backups-keep 2) exist only after a rebuild or restore and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import BIN, Replicator, bench_dir, nats_server, open_storage, report

from agent_client import STREAM_NAME, AgentStorage

WEEK_S = 7 * 86_400
AGENT = "disk-agent"


def du(path: Path) -> int:
    """Bytes allocated on disk under `path` (files only)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def write_mix(st: AgentStorage, changes: int, *, paced: bool, seed: int = 1) -> tuple[int, int, int]:
    """Write about `changes` changes; (inserts, updates, deletes). `paced`: each transaction is acknowledged by
    JetStream before the next (one record per transaction, as at a steady rate of a few per second)."""
    rng = random.Random(seed)
    live: list[int] = []
    next_id = 1
    counts = [0, 0, 0]
    done = 0
    while done < changes:
        size = min(rng.randint(1, 20), changes - done)
        async with st.transaction() as tx:
            for _ in range(size):
                roll = rng.random()
                if roll < 0.60 or len(live) < 10:
                    payload = rng.randbytes(rng.randint(30, 100)).hex()
                    await tx.execute(
                        "INSERT INTO events (id, kind, payload, score) VALUES (?, ?, ?, ?)",
                        (next_id, rng.choice(["click", "view", "job", "note"]), payload, rng.random() * 1000),
                    )
                    live.append(next_id)
                    next_id += 1
                    counts[0] += 1
                elif roll < 0.85:
                    await tx.execute(
                        "UPDATE events SET score = ?, kind = 'updated' WHERE id = ?",
                        (rng.random(), rng.choice(live)),
                    )
                    counts[1] += 1
                else:
                    victim = live.pop(rng.randrange(len(live)))
                    await tx.execute("DELETE FROM events WHERE id = ?", (victim,))
                    counts[2] += 1
        done += size
        if paced:
            await st.flush(timeout=30)
    return counts[0], counts[1], counts[2]


async def wait_applied(url: str, seq: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            resp = await client.get(f"/relay/agents/{AGENT}")
            if resp.status_code == 200 and resp.json()["watermark"] >= seq:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"not applied up to {seq} within {timeout}s")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base:
        with nats_server(base / "js") as (url, _proc):
            rep = Replicator(base / "htpc", url)
            rep.start()
            try:
                st = await open_storage(base / "agent", AGENT, url)
                try:
                    started = time.perf_counter()
                    inserts, updates, deletes = await write_mix(st, args.changes, paced=not args.burst)
                    last = await st.last_committed_seq()
                    await st.flush(timeout=300)
                    await wait_applied(rep.url, last)
                    elapsed = time.perf_counter() - started
                finally:
                    await st.close()
                nc = await nats.connect(url)
                try:
                    state = (await nc.jetstream().stream_info(STREAM_NAME)).state
                finally:
                    await nc.close()
                backup_dir = base / "backup"
                result = subprocess.run(
                    [str(BIN / "replicator"), "backup", "--url", rep.url, "--to", str(backup_dir)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode != 0:
                    raise RuntimeError(f"replicator backup failed: {result.stderr}")
            finally:
                rep.stop()
            stream_disk = du(base / "js")
        central = file_bytes(base / "htpc" / "agents")
        snapshot = file_bytes(backup_dir)

    changes = inserts + updates + deletes
    live = inserts - deletes
    mode = "burst" if args.burst else "one record per transaction"
    print(
        f"\nsample ({mode}): {changes:,} changes ({inserts:,} inserts, {updates:,} updates, {deletes:,} deletes; "
        f"agent seq {last:,}) written and applied in {elapsed:.1f} s; {live:,} rows alive"
    )
    report("stream: bytes JetStream reports", state.bytes, "B")
    report("stream: messages (records)", state.messages, "msgs")
    report("stream: bytes per change (JetStream)", state.bytes / changes, "B")
    report("stream: bytes on disk per change (file store, du)", stream_disk / changes, "B")
    report("central copy: file bytes", central, "B")
    report("central copy: bytes per live row", central / live, "B")
    report("snapshot (replicator backup): bytes", snapshot, "B")

    per_change = max(state.bytes, stream_disk) / changes
    live_fraction = live / changes
    per_row = central / live
    print(
        "\nextrapolated to one week (LINEAR EXTRAPOLATION of the sample above, not a week-long run): stream = "
        "rate x 604,800 s x bytes/change on disk; central = live rows after a week x bytes/row; "
        "snapshots = 3 x central (--snapshots-keep 3, upper bound)"
    )
    print(f"  {'changes/s':>10} {'changes/week':>14} {'stream':>12} {'central':>12} {'3 snapshots':>12} {'total':>12}")
    for rate in args.rates:
        week = rate * WEEK_S
        stream_week = week * per_change
        central_week = week * live_fraction * per_row
        snaps = 3 * central_week
        print(
            f"  {rate:>10,g} {week:>14,.0f} {human(stream_week):>12} {human(central_week):>12} "
            f"{human(snaps):>12} {human(stream_week + central_week + snaps):>12}"
        )
    print(
        "  (the stream stays at its week's size; the central copy and the snapshots keep growing as long as the\n"
        "   mix keeps adding rows: that part is the data itself, not retention)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument(
        "--burst",
        action="store_true",
        help="write as fast as possible (the publisher packs many transactions per record: fewer stream bytes)",
    )
    asyncio.run(main(parser.parse_args()))
