"""Consistent snapshots of the central store, taken while serving; restore and rebuild start from one.

A snapshot is a directory `<data_dir>/snapshots/<stamp>/` holding a copy of
every agent's central file (`agents/<agent_id>.db`), of `dead_letters.db`, and
a `manifest.json`:

```
{"version": 1, "stamp": "20240101T120000.123Z", "created_at": 1704110400.123, "stream": "AGENT_CHANGES",
 "stream_seq": 4711, "replicator": "0.1.0", "seconds": 0.42,
 "files": [{"path": "agents/a.db", "size": 81920, "sha256": "...", "agent_id": "a", "epoch": "...",
            "watermark": 120}, {"path": "dead_letters.db", "size": 8192, "sha256": "..."}]}
```

`stream_seq` is the consumer's ack floor read *before* the copy starts: every
stream message up to it was committed centrally before it was acked, so the
files hold all of them; messages after it may be in the files too, and replay
as duplicates (watermarks, the relay dedup table). Each file is copied with
SQLite's online backup from its own connection, in one step: one read
transaction, so the copy is consistent while the apply thread keeps writing
(WAL). The copies are written to `snapshots/.tmp-*` and renamed into place
once complete and synced, so a crash never leaves a half snapshot that looks
whole. Snapshots are taken every `interval_s` (skipped when nothing was
applied since the newest one), off the event loop, and pruned to `keep`.
`take(dest)` makes one on demand elsewhere (a backup).

`stage` reads a snapshot (or a backup made of one) back, verifying every
checksum and each copy's SQLite integrity, into a staging directory of the
data directory; `put_in_place` then moves it where the central store lives
(the caller has moved the previous one aside). rebuild and restore use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_client import STREAM_NAME, is_valid_agent_id

from . import central_schema as schema
from ._version import __version__
from .data_dir import DataDir
from .errors import SnapshotFailed
from .feed_log import restart_feed_in_file

log = logging.getLogger("replicator.snapshots")

MANIFEST = "manifest.json"
_STAMP_RE = re.compile(r"\d{8}T\d{6}\.\d{3}Z")
_FILE_RE = r"^(agents/[a-z0-9][a-z0-9_-]{0,63}\.db|dead_letters\.db)$"
_CHUNK = 1024 * 1024
_TMP_PREFIX = ".tmp-"


class SnapshotFile(BaseModel):
    """One file of a snapshot: where it goes, its size and checksum, and (agent files) its replication state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(pattern=_FILE_RE)  # relative, "/"-separated: nothing can point outside the snapshot
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    agent_id: str | None = None
    epoch: str | None = None
    watermark: int | None = Field(default=None, ge=0)


class Manifest(BaseModel):
    """What a snapshot holds and the stream sequence it covers (manifest.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    stamp: str = Field(pattern=f"^{_STAMP_RE.pattern}$")
    created_at: float
    stream: str = STREAM_NAME
    stream_seq: int = Field(ge=0)  # every stream message up to this one is in the files
    replicator: str = __version__
    seconds: float = 0.0  # how long taking it took
    files: tuple[SnapshotFile, ...]
    skipped: tuple[str, ...] = ()  # agent files left out because they were damaged ("agents/x.db: reason")

    @property
    def agents(self) -> tuple[SnapshotFile, ...]:
        return tuple(f for f in self.files if f.agent_id is not None)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        """One line for people: which snapshot, what it covers, how big."""
        text = (
            f"snapshot {self.stamp} (stream seq {self.stream_seq}, {len(self.agents)} "
            f"agent{'' if len(self.agents) == 1 else 's'}, {_size(self.total_bytes)})"
        )
        if self.skipped:
            text += f"; left out as damaged: {'; '.join(self.skipped)}"
        return text


# ---------------------------------------------------------------------------------------------- taking
def stamp_of(now: float) -> str:
    """`20240101T120000.123Z` (UTC, milliseconds): sorts by time, safe as a directory name."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def list_snapshots(data: DataDir) -> list[Path]:
    """The complete snapshots of the data directory, newest first (temp dirs and foreign names ignored)."""
    root = data.snapshots
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STAMP_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def copy_database(src: Path, dest: Path) -> None:
    """A consistent copy of the SQLite database `src` (WAL, being written) as the single file `dest`.

    The online backup runs in one step: one read transaction on `src`, so writers go on (WAL) and the
    copy is the database as of one commit. The copy is switched to a rollback journal, so it is one file.
    """
    source = sqlite3.connect(f"file:{src}?mode=rw", uri=True, timeout=10.0)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()
    finally:
        source.close()


def _is_damaged(exc: sqlite3.Error) -> bool:
    """The source file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB), as opposed to this machine failing."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (11, 26)


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be synced
        _fsync_file(path)


def _read_state(path: Path) -> tuple[str | None, int]:
    """(epoch, watermark) recorded in a central copy that nobody writes (a snapshot's)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        state = schema.load_state(conn)
    finally:
        conn.close()
    epoch = state.get("epoch")
    return (str(epoch) if epoch is not None else None), int(state.get("watermark") or 0)


def write_snapshot(data: DataDir, dest: Path, stream_seq: int, *, now: float | None = None) -> Manifest:
    """Copy the central store into the new directory `dest`, atomically (synchronous; off the event loop).

    Written to a temporary sibling and renamed to `dest` once complete and synced: `dest` either does not
    exist or holds a whole snapshot. Raises SnapshotFailed (nothing left behind) if any part fails.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    if dest.exists():
        raise SnapshotFailed(f"{dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{_TMP_PREFIX}{dest.name}-{secrets.token_hex(4)}"
    try:
        (tmp / "agents").mkdir(parents=True)
        files: list[SnapshotFile] = []
        skipped: list[str] = []
        agent_files = sorted(p for p in data.agents.glob("*.db") if is_valid_agent_id(p.stem))
        for src in agent_files:
            rel = f"agents/{src.name}"
            try:
                copy_database(src, tmp / rel)
            except sqlite3.Error as exc:
                (tmp / rel).unlink(missing_ok=True)
                if not src.exists():  # deleted while we looked (an operator's hand): not part of the store now
                    continue
                if _is_damaged(exc):  # that agent is resynced (quarantine); the others still deserve a snapshot
                    log.error("snapshot: %s left out, it is damaged: %s", src, exc)
                    skipped.append(f"{rel}: {exc}")
                    continue
                raise SnapshotFailed(f"cannot copy {src}: {exc}") from exc
            epoch, watermark = _read_state(tmp / rel)
            size, sha = _digest(tmp / rel)
            files.append(
                SnapshotFile(path=rel, size=size, sha256=sha, agent_id=src.stem, epoch=epoch, watermark=watermark)
            )
        if data.dead_letters_db.exists():
            try:
                copy_database(data.dead_letters_db, tmp / "dead_letters.db")
            except sqlite3.Error as exc:
                raise SnapshotFailed(f"cannot copy {data.dead_letters_db}: {exc}") from exc
            size, sha = _digest(tmp / "dead_letters.db")
            files.append(SnapshotFile(path="dead_letters.db", size=size, sha256=sha))
        manifest = Manifest(
            stamp=dest.name if _STAMP_RE.fullmatch(dest.name) else stamp_of(now),
            created_at=now,
            stream_seq=stream_seq,
            seconds=round(time.monotonic() - started, 3),
            files=tuple(files),
            skipped=tuple(skipped),
        )
        (tmp / MANIFEST).write_bytes(orjson.dumps(manifest.model_dump(), option=orjson.OPT_INDENT_2))
        for f in files:
            _fsync_file(tmp / f.path)
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp / "agents")
        _fsync_dir(tmp)
        tmp.rename(dest)
        _fsync_dir(dest.parent)
        return manifest
    except (OSError, sqlite3.Error) as exc:
        raise SnapshotFailed(f"cannot write a snapshot to {dest}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


Floor = Callable[[], Awaitable[int | None]]


class Snapshots:
    """Periodic snapshots of the central store into `DataDir.snapshots`, the newest `keep` kept.

    Counters for status and metrics: `taken`, `failed`, `skipped`; `last` is the newest manifest written by
    this process, `last_error` why the last attempt failed (None once one succeeds).
    """

    def __init__(
        self,
        data: DataDir,
        ack_floor: Floor,
        *,
        interval_s: float,
        keep: int,
    ) -> None:
        self.data = data
        self._ack_floor = ack_floor
        self.interval_s = interval_s
        self.keep = keep
        self.taken = 0
        self.failed = 0
        self.skipped = 0  # periodic ones not taken: nothing applied since the newest snapshot
        self.last: Manifest | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._remove_leftovers()
        self.prune()  # --snapshots-keep may have been lowered since the last run
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="snapshots")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def take(self, dest: Path | None = None) -> Path:
        """Take a snapshot now: into `snapshots/<stamp>/` (then prune), or into `dest` (which must not exist;
        not counted among the kept ones: a backup). Raises SnapshotFailed."""
        async with self._lock:
            floor = await self._ack_floor()
            if floor is None:
                self.failed += 1
                self.last_error = "the consumer's position in the stream is unknown (is NATS reachable?)"
                raise SnapshotFailed(self.last_error)
            now = time.time()
            target = dest if dest is not None else self._new_dir(now)
            try:
                # Written and pruned on one thread: a cancelled wait (serve stopping) cannot leave one too many.
                manifest = await asyncio.to_thread(self._write_and_prune, target, floor, now, dest is None)
            except SnapshotFailed as exc:
                self.failed += 1
                self.last_error = str(exc)
                raise
            self.taken += 1
            self.last = manifest
            self.last_error = None
            log.info(
                "snapshot %s: stream seq %d, %d agents, %d bytes, %.2fs -> %s",
                manifest.stamp,
                manifest.stream_seq,
                len(manifest.agents),
                manifest.total_bytes,
                manifest.seconds,
                target,
            )
            return target

    def _write_and_prune(self, target: Path, floor: int, now: float, prune: bool) -> Manifest:
        manifest = write_snapshot(self.data, target, floor, now=now)
        if prune:
            self.prune()
        return manifest

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` snapshots; the ones deleted."""
        doomed = list_snapshots(self.data)[self.keep :]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
            log.debug("snapshot %s pruned (--snapshots-keep %d)", path.name, self.keep)
        return doomed

    def _new_dir(self, now: float) -> Path:
        path = self.data.snapshots / stamp_of(now)
        while path.exists():  # two in the same millisecond
            now += 0.001
            path = self.data.snapshots / stamp_of(now)
        return path

    def _remove_leftovers(self) -> None:
        """Temporary directories of snapshots or backups a crash interrupted (never complete)."""
        root = self.data.snapshots
        if root.is_dir():
            for path in root.iterdir():
                if path.name.startswith(".") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)

    async def _unchanged(self) -> bool:
        """Nothing was acked (so nothing applied) since the newest snapshot was taken."""
        newest = next(iter(list_snapshots(self.data)), None)
        if newest is None:
            return False
        try:
            manifest = read_manifest(newest)
        except SnapshotFailed:
            return False
        return await self._ack_floor() == manifest.stream_seq

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if await self._unchanged():
                    self.skipped += 1
                    continue
                await self.take()
            except SnapshotFailed as exc:
                log.error("snapshot failed (next try in %.0fs): %s", self.interval_s, exc)
            except Exception:  # never end the periodic snapshots: say so and try again next time
                self.failed += 1
                log.exception("snapshot failed unexpectedly (next try in %.0fs)", self.interval_s)


# ---------------------------------------------------------------------------------------------- reading back
def read_manifest(source: Path) -> Manifest:
    """The manifest of a snapshot or backup directory (SnapshotFailed if missing or not one of ours)."""
    path = source / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotFailed(f"{source} has no {MANIFEST}: not a snapshot or backup, or an incomplete one") from None
    except OSError as exc:
        raise SnapshotFailed(f"cannot read {path}: {exc}") from exc
    try:
        manifest = Manifest.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[:3]
        raise SnapshotFailed(f"{path} is not a valid manifest: {' '.join(first)}") from None
    paths = [f.path for f in manifest.files]
    if len(set(paths)) != len(paths):
        raise SnapshotFailed(f"{path} lists a file twice")
    for f in manifest.files:
        if f.path.startswith("agents/") != (f.agent_id is not None) or (
            f.agent_id is not None and f.path != f"agents/{f.agent_id}.db"
        ):
            raise SnapshotFailed(f"{path}: entry {f.path!r} does not match its agent id {f.agent_id!r}")
    return manifest


def _check_copy(path: Path, expected: SnapshotFile) -> None:
    """A copied file is an intact SQLite database holding the state the manifest says."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
        if result != [("ok",)]:
            raise SnapshotFailed(f"{expected.path} fails SQLite's integrity check: {result[:3]}")
        if expected.agent_id is not None:
            epoch, watermark = _read_state(path)
            if (epoch, watermark) != (expected.epoch, expected.watermark):
                raise SnapshotFailed(
                    f"{expected.path} holds epoch {epoch} watermark {watermark}, the manifest says "
                    f"{expected.epoch} / {expected.watermark}"
                )
    except sqlite3.Error as exc:
        raise SnapshotFailed(f"{expected.path} is not a readable SQLite database: {exc}") from exc


def _copy_checked(src: Path, dest: Path, expected: SnapshotFile) -> None:
    """Copy one file, checking its size and checksum on the way (SnapshotFailed on any difference)."""
    h = hashlib.sha256()
    size = 0
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except FileNotFoundError:
        raise SnapshotFailed(f"{expected.path} is missing: the snapshot or backup is incomplete") from None
    if size != expected.size or h.hexdigest() != expected.sha256:
        raise SnapshotFailed(
            f"{expected.path} is damaged: {size} bytes with sha256 {h.hexdigest()[:12]}..., the manifest says "
            f"{expected.size} bytes with sha256 {expected.sha256[:12]}..."
        )


def verify(source: Path) -> Manifest:
    """Check a snapshot or backup in place: its manifest, every file's size, checksum and SQLite integrity.

    Raises SnapshotFailed naming what is wrong; reads only (the copies are opened immutable).
    """
    manifest = read_manifest(source)
    for f in manifest.files:
        path = source / f.path
        try:
            size, sha = _digest(path)
        except FileNotFoundError:
            raise SnapshotFailed(f"{f.path} is missing: the snapshot or backup is incomplete") from None
        except OSError as exc:
            raise SnapshotFailed(f"cannot read {path}: {exc}") from exc
        if (size, sha) != (f.size, f.sha256):
            raise SnapshotFailed(f"{f.path} is damaged: its size or checksum differs from the manifest")
        _check_copy(path, f)
    return manifest


def stage(source: Path, data: DataDir) -> tuple[Path, Manifest]:
    """Copy a snapshot or backup into a new staging directory of `data`, verifying it on the way.

    Returns (staging dir, manifest); the staging dir holds `agents/` and maybe `dead_letters.db`, ready for
    `put_in_place`. Raises SnapshotFailed (and leaves nothing behind) if anything is missing or damaged.

    Each agent copy then starts a new change feed (feed_log.py): its history restarts here, so an offset handed
    out before must refetch instead of continuing into units it never saw.
    """
    manifest = read_manifest(source)
    staging = data.staging()
    try:
        (staging / "agents").mkdir(parents=True)
        for f in manifest.files:
            _copy_checked(source / f.path, staging / f.path, f)
            _check_copy(staging / f.path, f)
        for f in manifest.agents:
            _restart_feed(staging / f.path)
        _fsync_dir(staging / "agents")
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SnapshotFailed(f"cannot copy {source} into {data.root}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, manifest


def _restart_feed(path: Path) -> None:
    try:
        restart_feed_in_file(path)
    except sqlite3.Error as exc:
        raise SnapshotFailed(f"cannot start a new change feed in {path.name}: {exc}") from exc


def forget_stream_positions(staging: Path) -> None:
    """Drop what names positions of the old stream (relay dedup, records remembered ahead) from staged copies:
    for a stream that was recreated, those sequence numbers mean other messages now."""
    for path in sorted((staging / "agents").glob("*.db")):
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table in ("_cr_relay_seen", "_cr_ahead"):
                with contextlib.suppress(sqlite3.OperationalError):  # a copy made before the table existed
                    conn.execute(f"DELETE FROM {table}")
            conn.execute("COMMIT")
        finally:
            conn.close()


def put_in_place(staging: Path, data: DataDir) -> None:
    """Move a staged snapshot to where the central store lives (which the caller has moved aside)."""
    if any(path.exists() for path in data.central_files()):
        raise SnapshotFailed(f"{data.root} still holds a central store: move it aside first")
    (staging / "agents").rename(data.agents)
    staged_dead = staging / "dead_letters.db"
    if staged_dead.exists():
        staged_dead.rename(data.dead_letters_db)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(data.root)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
