"""SQL identifiers that may cross the wire.

Table and column names travel in change records and end up in the HTPC's SQL,
so only plain ASCII identifiers are accepted and they are always double-quoted
when used.
"""

from __future__ import annotations

import re

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
RESERVED_PREFIXES = ("sqlite_", "_cr_")


def is_valid_identifier(name: object) -> bool:
    return (
        isinstance(name, str)
        and _IDENT_RE.fullmatch(name) is not None
        and not name.lower().startswith(RESERVED_PREFIXES)
    )


def quote_identifier(name: str) -> str:
    """Quote an identifier (one that has passed is_valid_identifier, or a name from SQLite's own catalog)."""
    return '"' + name.replace('"', '""') + '"'
