"""The disk the agent database takes: the change log's size, and giving freed pages back to the file system.

The change log is unbounded while NATS is down, by design (nothing is ever dropped); once it drains, the
pages it held are free inside the file. A database made by this build uses `auto_vacuum = INCREMENTAL`, and
the publisher calls `reclaim` after a large trim, a few thousand pages at a time through the writer queue,
so the file shrinks back without one long exclusive VACUUM. (In WAL mode the file itself is cut when the
WAL is checkpointed; `page_count` drops at the commit.)

A database made before (auto_vacuum NONE) is converted by one `VACUUM` when it is opened, if it is small
(`CONVERT_MAX_BYTES`); a larger one is left as it is, `health_check()` says so, and
`python -m agent_client vacuum DB` converts it (with the agent stopped: VACUUM holds the write lock until done).
All functions are synchronous and take a `sqlite3.Connection` on its own thread.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

log = logging.getLogger("agent_client.disk_space")

#: `PRAGMA auto_vacuum` values.
AUTO_VACUUM_NAMES = {0: "none", 1: "full", 2: "incremental"}
INCREMENTAL = 2
#: An older database (auto_vacuum NONE) at most this large is converted by VACUUM when opened.
CONVERT_MAX_BYTES = 64 * 1024 * 1024
#: Free pages worth giving back: at least this many bytes ...
RECLAIM_MIN_BYTES = 4 * 1024 * 1024
#: ... moved at most this many pages per writer turn (bounded work between other writes).
RECLAIM_STEP_PAGES = 4096


@dataclass(frozen=True)
class Space:
    """Where the database's bytes are."""

    auto_vacuum: str
    page_size: int
    page_count: int
    free_pages: int

    @property
    def file_bytes(self) -> int:
        return self.page_size * self.page_count

    @property
    def free_bytes(self) -> int:
        return self.page_size * self.free_pages

    @property
    def reclaimable(self) -> bool:
        """Worth an incremental vacuum: enough free pages, and the database can give them back."""
        return self.auto_vacuum == "incremental" and self.free_bytes >= RECLAIM_MIN_BYTES


def prepare_new(conn: sqlite3.Connection) -> None:
    """Make a database that has no tables yet use incremental auto-vacuum (only possible before the first table).

    Must run before `journal_mode = WAL` (which writes the file's first page). On an existing database the
    pragma changes nothing until a VACUUM (see `convert`).
    """
    conn.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")


def space(conn: sqlite3.Connection) -> Space:
    mode = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    return Space(
        auto_vacuum=AUTO_VACUUM_NAMES.get(mode, str(mode)),
        page_size=int(conn.execute("PRAGMA page_size").fetchone()[0]),
        page_count=int(conn.execute("PRAGMA page_count").fetchone()[0]),
        free_pages=int(conn.execute("PRAGMA freelist_count").fetchone()[0]),
    )


def log_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the change log `_cr_log` takes in the file.

    Exact from SQLite's `dbstat` table when it is compiled in (it is in CPython's and Debian's builds);
    otherwise an upper bound: every page of the database that is in use.
    """
    try:
        row = conn.execute("SELECT pgsize FROM dbstat WHERE name = '_cr_log' AND aggregate = 1").fetchone()
    except sqlite3.OperationalError:  # no dbstat in this SQLite
        s = space(conn)
        return s.file_bytes - s.free_bytes
    return int(row[0] or 0) if row else 0


def reclaim(conn: sqlite3.Connection, max_pages: int = RECLAIM_STEP_PAGES) -> int:
    """Give up to `max_pages` free pages back (incremental vacuum); returns the free pages left.

    Runs inside the caller's write transaction; does nothing on a database without incremental auto-vacuum.
    """
    s = space(conn)
    if s.auto_vacuum != "incremental" or s.free_pages == 0:
        return s.free_pages
    # Python's sqlite3 steps a statement without result columns once, and one step of incremental_vacuum
    # frees one page: one execute per page (microseconds each).
    for _ in range(min(int(max_pages), s.free_pages)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def convert(conn: sqlite3.Connection) -> bool:
    """Switch a database to incremental auto-vacuum with one VACUUM (outside any transaction). True if done."""
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == INCREMENTAL:
        return False
    conn.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")
    conn.execute("VACUUM")
    return True


def convert_if_small(conn: sqlite3.Connection, max_bytes: int = CONVERT_MAX_BYTES) -> bool:
    """`convert` a database made before incremental auto-vacuum, if it is at most `max_bytes`. True if done."""
    s = space(conn)
    if s.auto_vacuum == "incremental":
        return False
    if s.file_bytes > max_bytes:
        log.warning(
            "agent database is %d bytes with auto_vacuum=%s: pages freed by the change log are reused but not "
            "given back to the file system; run `python -m agent_client vacuum %s` with the agent stopped",
            s.file_bytes,
            s.auto_vacuum,
            "DB",
        )
        return False
    return convert(conn)
