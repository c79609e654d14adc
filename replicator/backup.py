"""Online backups of a running HTPC (`replicator backup --to DIR`) and restoring one (`replicator restore --from DIR`).

- `backup_response(service)` is what `POST /relay/admin/backup` (operators only) answers: a fresh
  snapshot (snapshots.py: consistent per file, with the stream sequence it covers), streamed as an
  uncompressed tar (`agents/<id>.db`, `dead_letters.db`, and `manifest.json` last, so a cut stream
  lacks it), then deleted.
- `backup(url, token, dest)` is the client side: it receives the tar, unpacks only the names a snapshot
  can hold (no links, no paths outside `dest`), verifies every checksum and each database's integrity,
  and only then renames the result to `dest`.
- `restore(settings, source)` (serve stopped) verifies the backup while copying it into the data
  directory, points the durable consumer just after the stream sequence the backup covers, moves the
  current central store aside (`rebuild-backup-<stamp>/`) and puts the backup in its place. `serve`
  then catches up from the stream: what arrived after the backup replays, what it already holds is
  skipped. Anything wrong with the backup is refused with a named error before anything changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import re
import secrets
import shutil
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import httpx
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from agent_client import STREAM_NAME

from .errors import SnapshotFailed
from .rebuild import point_consumer, prune_set_aside, staged_replay_start, stamp_now
from .service import ReplicatorService
from .settings import Settings
from .snapshots import MANIFEST, Manifest, put_in_place, read_manifest, stage, verify

log = logging.getLogger("replicator.backup")

BACKUP_ROUTE = "/relay/admin/backup"
_CHUNK = 1024 * 1024
_MEMBER_RE = re.compile(r"manifest\.json|dead_letters\.db|agents/[a-z0-9][a-z0-9_-]{0,63}\.db")
_DONE = object()


# ------------------------------------------------------------------------------------------------ server side
async def backup_response(service: ReplicatorService) -> StreamingResponse:
    """A fresh snapshot of the central store as a tar stream (deleted once sent or abandoned)."""
    snapshots = service.snapshots
    if snapshots is None:
        raise SnapshotFailed("the replicator is not serving yet: no backup can be taken")
    path = await snapshots.take(service.data.snapshots / f".backup-{secrets.token_hex(6)}")
    try:
        manifest = read_manifest(path)
    except SnapshotFailed:
        shutil.rmtree(path, ignore_errors=True)
        raise
    names = [f.path for f in manifest.files] + [MANIFEST]
    return StreamingResponse(
        _tar_stream(path, names),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="replicator-backup-{manifest.stamp}.tar"',
            "X-Snapshot-Stamp": manifest.stamp,
            "X-Snapshot-Stream-Seq": str(manifest.stream_seq),
        },
        background=BackgroundTask(shutil.rmtree, path, ignore_errors=True),
    )


class _Abandoned(Exception):
    """The receiver went away: stop writing the tar."""


class _Pipe(io.RawIOBase):
    """A writable file whose writes become items of a bounded queue (the tar writer's side)."""

    def __init__(self, out: queue.Queue[object], stop: threading.Event) -> None:
        self._out = out
        self._stop = stop

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        data = bytes(b)
        _put(self._out, data, self._stop)
        return len(data)


def _put(out: queue.Queue[object], item: object, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Abandoned
        try:
            out.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


async def _tar_stream(root: Path, names: list[str]) -> AsyncIterator[bytes]:
    """The files `names` of `root` as a tar, written on a worker thread, read here chunk by chunk; `root` is
    deleted at the end, however the stream ends."""
    chunks: queue.Queue[object] = queue.Queue(maxsize=8)
    stop = threading.Event()

    def produce() -> None:
        try:
            with tarfile.open(fileobj=_Pipe(chunks, stop), mode="w|", bufsize=_CHUNK, format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    tar.add(root / name, arcname=name, recursive=False)
            _put(chunks, _DONE, stop)
        except _Abandoned:
            return
        except BaseException as exc:  # handed to the reader, which ends the response
            with contextlib.suppress(_Abandoned):
                _put(chunks, exc, stop)

    producer = asyncio.get_running_loop().run_in_executor(None, produce)
    try:
        while True:
            item = await asyncio.to_thread(chunks.get)
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                log.error("backup: writing the tar failed: %s", item)
                raise SnapshotFailed(f"writing the backup failed: {item}")
            assert isinstance(item, bytes)
            yield item
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await producer
        with contextlib.suppress(queue.Full):
            chunks.put_nowait(_DONE)  # wakes a reader thread still waiting (the stream was abandoned)
        await asyncio.to_thread(shutil.rmtree, root, True)


# ------------------------------------------------------------------------------------------------ client side
class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (an HTTP response body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def receive_tar(stream: IO[bytes], dest: Path) -> int:
    """Unpack a backup tar stream into the existing, empty directory `dest`; the bytes written.

    Only regular files with the names a snapshot holds are accepted (no links, devices, absolute paths or
    `..`), each once: anything else is refused with SnapshotFailed. Checksums are checked afterwards (verify).
    """
    seen: set[str] = set()
    written = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or not _MEMBER_RE.fullmatch(name) or name in seen:
                    kind = "file" if member.isfile() else "link or special file" if not member.isdir() else "directory"
                    raise SnapshotFailed(f"the backup holds an unexpected {kind} {name[:200]!r}: refused")
                seen.add(name)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                target = dest / name
                target.parent.mkdir(exist_ok=True)
                with target.open("xb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                written += member.size
    except (tarfile.TarError, EOFError) as exc:
        raise SnapshotFailed(f"the backup stream is not a complete tar archive: {exc}") from None
    return written


def _answer_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("message") or body)
    except ValueError:
        return resp.text[:300] or resp.reason_phrase


def backup(url: str, token: str | None, dest: Path) -> int:
    """`replicator backup --to DEST`: fetch a consistent backup from the HTPC at `url` (exit code)."""
    url = url.rstrip("/")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        print(f"replicator backup: {dest} exists and is not an empty directory: name a new one", file=sys.stderr)
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        partial.mkdir()
        with (
            httpx.Client(timeout=httpx.Timeout(30.0, read=600.0), headers=headers) as client,
            client.stream("POST", f"{url}{BACKUP_ROUTE}") as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                message = _answer_message(resp)
                if resp.status_code in (401, 403):
                    message += " (an operator token is needed: --token / REPLICATOR_TOKEN)"
                print(f"replicator backup: {url} answered {resp.status_code}: {message}", file=sys.stderr)
                return 1
            receive_tar(_ChunkReader(resp.iter_bytes(_CHUNK)), partial)  # type: ignore[arg-type]
        manifest = verify(partial)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        partial.rename(dest)
    except httpx.HTTPError as exc:
        print(f"replicator backup: cannot fetch a backup from {url}: {exc}", file=sys.stderr)
        return 2
    except SnapshotFailed as exc:
        print(f"replicator backup: {exc}; nothing was kept", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"replicator backup: cannot write {dest}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"backup: {manifest.describe()} written to {dest}")
    _print_agents(manifest)
    print(f"restore it with: replicator restore --from {dest} (serve stopped)")
    return 0


def _print_agents(manifest: Manifest, limit: int = 50) -> None:
    for f in manifest.agents[:limit]:
        print(f"  {f.agent_id}: epoch {(f.epoch or '-')[:8]}, watermark {f.watermark}, {f.size} bytes")
    if len(manifest.agents) > limit:
        print(f"  ... and {len(manifest.agents) - limit} more agents")


# ------------------------------------------------------------------------------------------------ restore
async def restore(settings: Settings, source: Path) -> int:
    """`replicator restore --from SOURCE` (serve stopped, the data directory locked by the caller): exit code."""
    source = Path(source)
    data = settings.data
    try:
        read_manifest(source)  # the cheap checks before NATS is started; stage() verifies everything
    except SnapshotFailed as exc:
        print(f"replicator restore: {exc}; nothing was changed", file=sys.stderr)
        return 1
    service = ReplicatorService(settings)
    staging: Path | None = None
    try:
        data.root.mkdir(parents=True, exist_ok=True)
        js = await service.start_nats(name="replicator-restore")
        state = (await js.stream_info(STREAM_NAME)).state
        try:
            staged, manifest = await asyncio.to_thread(stage, source, data)
        except SnapshotFailed as exc:
            print(f"replicator restore: {exc}; nothing was changed", file=sys.stderr)
            return 1
        staging = staged
        start, notes = await asyncio.to_thread(
            staged_replay_start, staged, manifest, state.first_seq, state.last_seq, "backup"
        )
        # The consumer first: should anything below fail, it only replays what the old store holds already.
        await point_consumer(js, settings.durable, start)
        aside = data.set_aside(stamp_now())
        put_in_place(staged, data)
        staging = None
        say = _say
        say(f"{manifest.describe()} restored into {data.root}")
        if aside is not None:
            say(f"the previous central store was moved to {aside}")
        for note in notes:
            say(note)
        behind = max(0, state.last_seq - start + 1)
        say(
            f"consumer {settings.durable!r} resumes at stream seq {start}: `replicator serve` now catches up "
            f"from the stream ({behind} messages published after the backup are replayed; what it holds is skipped)"
        )
        prune_set_aside(settings, say)
        return 0
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        await service.stop()


def _say(text: str) -> None:
    print(f"restore: {text}", file=sys.stderr, flush=True)
