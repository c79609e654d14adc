"""SQL identifiers that may cross the wire.

Table and column names travel in change records and end up in the HTPC's SQL,
so only plain ASCII identifiers are accepted and they are always double-quoted
when used.
"""

from __future__ import annotations

import re

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_ ]{0,40}(\(\s*[+-]?\d{1,10}\s*(,\s*[+-]?\d{1,10}\s*)?\))?")
#: Words that would make a declared type a column constraint in CREATE TABLE (`TEXT UNIQUE`, `INT NOT NULL`).
_CONSTRAINT_WORDS = frozenset(
    {
        "PRIMARY",
        "KEY",
        "UNIQUE",
        "CHECK",
        "DEFAULT",
        "COLLATE",
        "REFERENCES",
        "NOT",
        "NULL",
        "AS",
        "GENERATED",
        "CONSTRAINT",
        "ON",
        "CONFLICT",
        "AUTOINCREMENT",
        "ALWAYS",
        "STORED",
        "VIRTUAL",
    }
)
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


def safe_declared_type(decl: str) -> str:
    """A column's declared type fit to paste into DDL made from another party's layout (an agent's, the HTPC's):
    words and up to two numbers, never a constraint (`TEXT UNIQUE` would change what the copy accepts); "" for
    anything else (no declared type: values are kept as they come)."""
    decl = decl.strip()
    if not decl or _TYPE_RE.fullmatch(decl) is None:
        return ""
    words = decl.split("(")[0].upper().split()
    return "" if any(w in _CONSTRAINT_WORDS for w in words) else decl
