"""The layout of a replicator data directory: every path the HTPC keeps is named here once.

```
<root>/
  .lock                     one process (serve or rebuild) owns the directory
  agents/<agent_id>.db      each agent's central copy (central_store)
  dead_letters.db           records that could not be applied (dead_letters)
  nats/                     the embedded nats-server: JetStream store, config, remembered port
  auth/                     keys and token digests (`replicator auth`)
  rebuild-backup-<stamp>/   what `replicator rebuild` moved aside
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataDirInUse(RuntimeError):
    """Another replicator process owns the data directory."""


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
    def nats(self) -> Path:
        return self.root / "nats"

    @property
    def auth(self) -> Path:
        return self.root / "auth"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def backup(self, stamp: str) -> Path:
        return self.root / f"rebuild-backup-{stamp}"

    def central_files(self) -> list[Path]:
        """What makes up the central store (moved aside as a whole by a rebuild)."""
        db = self.dead_letters_db
        return [self.agents, db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]

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
