"""The replicator's log lines: logfmt on stderr, one line per record.

`ts=2026-01-31T12:00:00Z level=info logger=replicator.api msg="..."`, then any `extra=` fields of the
record as `key=value`, then `exc_info="..."` for an exception. Quoting and escaping (quotes, backslashes,
newlines and other control characters) are the `logfmter` package's, so a message holding a newline or a
quote never breaks a line or a parser.
"""

from __future__ import annotations

import logging
import sys
import time

from logfmter import Logfmter

__all__ = ["LogfmtFormatter", "setup_logging"]

#: Record attributes that are not fields of the line (uvicorn's coloured copy of its message).
_NOT_FIELDS = ["color_message"]


class LogfmtFormatter(Logfmter):
    """logfmt with the keys `ts` (UTC), `level` (lower case), `logger`, `msg`, extras, `exc_info`."""

    def __init__(self) -> None:
        super().__init__(
            keys=["ts", "level", "logger"],
            mapping={"ts": "asctime", "level": "levelname", "logger": "name"},
            datefmt="%Y-%m-%dT%H:%M:%SZ",
            ignored_keys=_NOT_FIELDS,
        )
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        levelname = record.levelname
        record.levelname = levelname.lower()
        record.asctime = self.formatTime(record, self.datefmt)  # ours, even if another formatter set one
        try:
            return str(super().format(record))
        finally:
            record.levelname = levelname


def setup_logging(level: str) -> None:
    """Every logger to stderr in logfmt, at `level` (debug, info, warning, error; unknown: warning)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
