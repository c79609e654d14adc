"""The layout of a replicator data directory: every path the HTPC keeps is named here once.

```
<root>/
  .lock                     one process (serve or rebuild) owns the directory
  agents/<agent_id>.db      each agent's central copy (central_store)
  dead_letters.db           records that could not be applied (dead_letters)
  network.db                every agent's rows of the tables queried as "*".t (network_store; derived)
  nats/                     the embedded nats-server: JetStream store, config, remembered port
  auth/                     keys and token digests (`replicator auth`)
  relay-id.key              the secret keying relay writes' message ids (32 random bytes, mode 0600)
  recovery.db               agents ever seen and their resync requests (resync)
  snapshots/<stamp>/        consistent snapshots of the central store (snapshots), newest kept
  snapshots/.tmp-*/         a snapshot being written (renamed to its stamp when complete)
  quarantine/               central copies that could not be opened (corrupt), set aside before a resync
  rebuild-backup-<stamp>/   what `replicator rebuild` / `restore` moved aside (the newest few kept)
  .staging-*/               a snapshot or backup being put in place by rebuild / restore
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ReplicatorError

#: Bytes of the relay message id secret.
RELAY_ID_SECRET_BYTES = 32
_BACKUP_PREFIX = "rebuild-backup-"
_BACKUP_RE = re.compile(r"rebuild-backup-\d{8}-\d{6}(-\d+)?")


class DataDirInUse(RuntimeError):
    """Another replicator process owns the data directory."""


class SecretFileInvalid(ReplicatorError):
    """A secret file of the data directory exists but does not hold a secret (truncated, replaced)."""

    code = "secret_file_invalid"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    def agent_db(self, agent_id: str) -> Path:
        """The central copy of one agent (the caller has validated the id)."""
        return self.agents / f"{agent_id}.db"

    @property
    def dead_letters_db(self) -> Path:
        return self.root / "dead_letters.db"

    @property
    def network_db(self) -> Path:
        """The network store (derived from the agents' feeds, rebuildable: never in backups or snapshots)."""
        return self.root / "network.db"

    @property
    def nats(self) -> Path:
        return self.root / "nats"

    @property
    def auth(self) -> Path:
        return self.root / "auth"

    @property
    def relay_id_key(self) -> Path:
        """The HTPC's secret keying relay message ids (agent_client.relay_msg_id); never leaves this file."""
        return self.root / "relay-id.key"

    def relay_id_secret(self) -> bytes:
        """The relay message id secret: read it, or make it on first use (mode 0600, atomically, so two
        processes starting at once agree on one). Raises SecretFileInvalid if the file holds no secret."""
        path = self.relay_id_key
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            _create_secret_file(path, RELAY_ID_SECRET_BYTES)
            data = path.read_bytes()
        if len(data) != RELAY_ID_SECRET_BYTES:
            raise SecretFileInvalid(
                f"{path} holds {len(data)} bytes, not a {RELAY_ID_SECRET_BYTES}-byte secret; "
                "remove it to make a new one (retries of relay writes in flight may then be stored twice)"
            )
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # readable by others: take that back
        return data

    @property
    def recovery_db(self) -> Path:
        return self.root / "recovery.db"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def backup(self, stamp: str) -> Path:
        return self.root / f"{_BACKUP_PREFIX}{stamp}"

    def central_files(self) -> list[Path]:
        """What makes up the central store (moved aside as a whole by a rebuild)."""
        db = self.dead_letters_db
        return [self.agents, db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]

    def staging(self) -> Path:
        """A fresh name for a snapshot being put in place (inside the data directory: renames stay on one disk)."""
        return self.root / f".staging-{secrets.token_hex(6)}"

    def set_aside(self, stamp: str) -> Path | None:
        """Move the central store into a new `rebuild-backup-<stamp>` (a suffix if that exists); None when there
        was nothing to move."""
        present = [path for path in self.central_files() if path.exists()]
        if not present:
            return None
        target = self.backup(stamp)
        n = 1
        while target.exists():
            n += 1
            target = self.backup(f"{stamp}-{n}")
        target.mkdir(parents=True)
        for path in present:
            path.rename(target / path.name)
        return target

    def rebuild_backups(self) -> list[Path]:
        """The `rebuild-backup-*` directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _BACKUP_RE.fullmatch(p.name)]
        return sorted(found, key=_backup_order)

    def prune_rebuild_backups(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` rebuild-backup-* directories; the ones deleted."""
        backups = self.rebuild_backups()
        doomed = backups[: max(0, len(backups) - keep)]
        for path in doomed:
            shutil.rmtree(path)
        return doomed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the directory for the duration (serve and rebuild both write the central store)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(f"{self.root} is in use by another replicator process") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _backup_order(path: Path) -> tuple[str, int]:
    """`rebuild-backup-20240101-000000-3` -> ("20240101-000000", 3): the suffix of a same-second one counts."""
    stamp = path.name[len(_BACKUP_PREFIX) :]
    base, _, suffix = stamp[:15], stamp[15:16], stamp[16:]
    return base, int(suffix) if suffix else 1


def _create_secret_file(path: Path, size: int) -> None:
    """Write `size` random bytes to `path` unless it exists: a private temporary file, then a hard link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(size))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs is the secret
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
