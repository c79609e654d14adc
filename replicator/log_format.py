"""The replicator's log lines: logfmt (`ts=... level=... logger=... msg="..."`) on stderr."""

from __future__ import annotations

import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', "'")
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f'ts={ts}Z level={record.levelname.lower()} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += f' exc="{self.formatException(record.exc_info)!r}"'
        return line


def setup_logging(level: str) -> None:
    """Every logger to stderr in logfmt, at `level` (debug, info, warning, error; unknown: warning)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
