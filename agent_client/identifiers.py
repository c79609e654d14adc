"""SQL identifiers that may cross the wire.

Table and column names travel in change records and end up in the HTPC's SQL,
so only plain ASCII identifiers are accepted and they are always double-quoted
when used.
"""

from __future__ import annotations

import re

from .errors import InvalidIdentifier

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
RESERVED_PREFIXES = ("sqlite_", "_cr_")


def is_valid_identifier(name: object) -> bool:
    return (
        isinstance(name, str)
        and _IDENT_RE.fullmatch(name) is not None
        and not name.lower().startswith(RESERVED_PREFIXES)
    )


def validate_identifier(name: object, what: str = "identifier") -> str:
    if not is_valid_identifier(name):
        raise InvalidIdentifier(
            f"invalid {what} {name!r}: use letters, digits and '_' (not starting with a digit, "
            "at most 128 characters, not starting with 'sqlite_' or '_cr_')"
        )
    assert isinstance(name, str)
    return name


def quote_identifier(name: str) -> str:
    """Quote an identifier that has passed validate_identifier."""
    return '"' + name.replace('"', '""') + '"'
