"""`replicator rebuild`: a fresh central store from the newest snapshot plus the stream (serve must be stopped).

The previous central store is moved aside (`rebuild-backup-<stamp>/`, the
newest `--rebuild-backups-keep` kept). The newest snapshot that verifies
(`snapshots/<stamp>/`, checksums and SQLite integrity) is put in its place and
the stream is replayed from the sequence after the one it covers; without a
usable snapshot (or with `full=True`) the whole stream is replayed into an
empty store. It uses the service's wiring (`start_nats`, `open_store`,
`new_consumer`) with a throwaway consumer, then points the service's durable
consumer just past the last message it replayed.

What the stream no longer holds (retention: `--stream-max-age`,
`--stream-max-bytes`) cannot be replayed: rebuild says which messages aged out
and which agents now wait for changes that will not come; once serving, the
HTPC resyncs those from the live agents.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agent_client import STREAM_NAME, consumer_config

from .errors import SnapshotFailed
from .service import ReplicatorService
from .settings import Settings
from .snapshots import Manifest, forget_stream_positions, list_snapshots, put_in_place, stage

REBUILD_BATCH = 512


class Progress:
    """A progress report on stderr, counted in stream sequences: on a terminal one line redrawn at most twice
    a second; otherwise (a pipe, a log file) a plain line every `PIPE_EVERY_S` seconds, never a carriage return.

    `first..last` is the part of the stream to replay; messages published meanwhile move `last` on, so the
    position shown never passes the total (redeliveries are not counted twice: positions are).
    """

    PIPE_EVERY_S = 10.0

    def __init__(self, first: int, last: int, *, out: bool = True) -> None:
        self.first = first
        self.last = max(last, first - 1)
        self.position = first - 1  # the highest stream sequence replayed
        self.messages = 0  # deliveries handled (a redelivered message counts again)
        self.started = time.monotonic()
        self.out = out
        self.live = out and sys.stderr.isatty()
        self._last_print = 0.0 if self.live else self.started
        self._drawn = False

    @property
    def done(self) -> int:
        return self.position - self.first + 1

    @property
    def total(self) -> int:
        return self.last - self.first + 1

    def update(self, position: int, messages: int) -> None:
        self.messages += messages
        self.position = max(self.position, position)
        self.last = max(self.last, self.position)
        now = time.monotonic()
        if not self.out or now - self._last_print < (0.5 if self.live else self.PIPE_EVERY_S):
            return
        self._last_print = now
        if self.live:
            print(f"\r{self.line()}\x1b[K", end="", file=sys.stderr, flush=True)
            self._drawn = True
        else:
            print(self.line(), file=sys.stderr, flush=True)

    def end_line(self) -> str:
        """What starts the line after the progress: on a terminal, clear the redrawn line."""
        return "\r\x1b[K" if self._drawn else ""

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total > 0 else 100.0
        rate = self.messages / max(time.monotonic() - self.started, 1e-9)
        return f"rebuild: {self.done}/{self.total} messages ({pct:5.1f}%), {rate:,.0f} msg/s"


async def point_consumer(js: JetStreamContext, durable: str, start_seq: int) -> None:
    """Make the service's durable consumer start at stream sequence `start_seq` (serve stopped)."""
    with contextlib.suppress(Exception):
        await js.delete_consumer(STREAM_NAME, durable)
    await js.add_consumer(
        STREAM_NAME,
        consumer_config(durable, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)),
    )


def replay_start(covered: int, first_seq: int, last_seq: int, what: str) -> tuple[int, list[str]]:
    """Where to resume after `covered` (what a snapshot or backup holds) in a stream holding `first_seq..last_seq`,
    and what to tell the operator about it."""
    notes: list[str] = []
    if covered > last_seq:
        notes.append(
            f"{what} covers stream seq {covered} but the stream ends at {last_seq}: it is not the stream this was "
            f"taken from (or it was recreated); its stream positions are dropped and the whole stream is read "
            f"(changes already held are skipped)"
        )
        return max(first_seq, 1), notes
    start = covered + 1
    if start < first_seq:
        notes.append(
            f"stream seq {start}..{first_seq - 1} aged out of the stream (--stream-max-age / --stream-max-bytes): "
            f"agents with changes among them wait for changes that will not come; `replicator serve` resyncs "
            f"them from the live agents"
        )
    return start, notes


def staged_replay_start(
    staging: Path, manifest: Manifest, first_seq: int, last_seq: int, what: str
) -> tuple[int, list[str]]:
    """`replay_start` after the staged snapshot or backup (`what`) described by `manifest`; a copy that covers
    more than the stream holds (another stream, or a recreated one) first forgets that stream's positions."""
    start, notes = replay_start(manifest.stream_seq, first_seq, last_seq, f"{what} {manifest.stamp}")
    if manifest.stream_seq > last_seq:
        forget_stream_positions(staging)
    return start, notes


def prune_set_aside(settings: Settings, say: Callable[[str], None]) -> None:
    """Remove the set-aside central stores beyond `--rebuild-backups-keep` (oldest first), saying which."""
    keep = settings.rebuild_backups_keep
    for path in settings.data.prune_rebuild_backups(keep):
        say(f"removed {path.name} (--rebuild-backups-keep {keep})")


def stamp_now() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _say(text: str) -> None:
    print(f"rebuild: {text}", file=sys.stderr, flush=True)


def _stage_newest(settings: Settings) -> tuple[Path, Manifest] | None:
    """The newest snapshot that verifies, copied into a staging directory (older ones tried in turn)."""
    for path in list_snapshots(settings.data):
        try:
            return stage(path, settings.data)
        except SnapshotFailed as exc:
            _say(f"snapshot {path.name} cannot be used: {exc}")
    return None


async def rebuild(settings: Settings, *, full: bool = False) -> int:
    """Rebuild the central store (see the module doc); `full`: ignore snapshots and replay the whole stream."""
    service = ReplicatorService(settings)
    data = settings.data
    staged: tuple[Path, Manifest] | None = None
    try:
        js = await service.start_nats(name="replicator-rebuild")
        state = (await js.stream_info(STREAM_NAME)).state
        first_seq, last_seq = state.first_seq, state.last_seq
        staged = None if full else _stage_newest(settings)
        if staged is not None:
            staging, manifest = staged
            start, notes = staged_replay_start(staging, manifest, first_seq, last_seq, "snapshot")
        else:
            start, notes = max(first_seq, 1), []
            if first_seq > 1:
                notes.append(
                    f"no snapshot to start from, and stream seq 1..{first_seq - 1} aged out of the stream "
                    f"(--stream-max-age / --stream-max-bytes): agents whose history starts there get no copy "
                    f"from this rebuild; `replicator serve` resyncs them from the live agents"
                )
        aside = data.set_aside(stamp_now())
        if aside is not None:
            _say(f"previous central store moved to {aside}")
        if staged is not None:
            put_in_place(staged[0], data)
            staged = None
            _say(f"restored {manifest.describe()}; replaying the stream from seq {start}")
        else:
            _say(f"no snapshot used{' (--full)' if full else ''}: replaying the whole stream from seq {start}")
        for note in notes:
            _say(note)
        store, dead = service.open_store()
        durable = f"rebuild-{int(time.time())}"
        consumer = service.new_consumer(
            durable, batch=REBUILD_BATCH, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        )
        progress = Progress(start, last_seq)
        consumer.on_batch = lambda n: progress.update(consumer.max_stream_seq, n)
        await consumer.run(until_idle=True)
        resume = max(consumer.max_stream_seq, start - 1) + 1
        await consumer.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, durable)
        await point_consumer(js, settings.durable, resume)
        elapsed = time.monotonic() - progress.started
        waiting = sorted(a.agent_id for a in store.view.agents.values() if a.waiting)
        replayed = (
            f"replayed stream seq {start}..{resume - 1} ({progress.messages} messages)"
            if resume > start
            else "nothing to replay"
        )
        print(
            f"{progress.end_line()}rebuild: {replayed} in {elapsed:.1f}s; {_count(len(store.view.agents), 'agent')}; "
            f"{_count(dead.total(), 'dead letter')}; "
            f"consumer {settings.durable!r} resumes at stream seq {resume}",
            file=sys.stderr,
        )
        if waiting:
            _say(
                f"{_count(len(waiting), 'agent')} wait{'s' if len(waiting) == 1 else ''} for changes the stream no "
                f"longer holds ({', '.join(waiting[:20])}"
                f"{', ...' if len(waiting) > 20 else ''}): they are resynced from the live agents once serving"
            )
        prune_set_aside(settings, _say)
        return 0
    finally:
        if staged is not None:
            shutil.rmtree(staged[0], ignore_errors=True)
        await service.stop()
