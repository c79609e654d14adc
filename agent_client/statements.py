"""SQL text built from validated names: upserts, and cutting a script into statements.

Names reach these functions only after `identifiers.is_valid_identifier` (or
from SQLite's own catalog) and are always double-quoted here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .identifiers import quote_identifier


def upsert_sql(table: str, columns: Sequence[str], pk: Sequence[str]) -> str:
    """`INSERT ... ON CONFLICT (pk) DO UPDATE` of exactly `columns`: columns not given keep their value.

    Without a primary key it is a plain INSERT; with nothing but key columns, a conflict does nothing.
    """
    q = quote_identifier
    sql = f"INSERT INTO {q(table)} ({', '.join(map(q, columns))}) VALUES ({', '.join('?' * len(columns))})"
    if not pk:
        return sql
    target = ", ".join(map(q, pk))
    updates = [c for c in columns if c not in pk]
    if not updates:
        return f"{sql} ON CONFLICT ({target}) DO NOTHING"
    return f"{sql} ON CONFLICT ({target}) DO UPDATE SET " + ", ".join(f"{q(c)} = excluded.{q(c)}" for c in updates)


def split_statements(script: str) -> list[str]:
    """Cut an SQL script into complete statements, each with its closing ';' (if it had one).

    Cuts only at a ';' that completes a statement by SQLite's own rule, so a ';' inside a string, a
    comment or a trigger body does not cut, and `ALTER ...; UPDATE ...;` on one line is two statements.
    A trailing statement without ';' is returned as it is; the caller decides whether it is complete.
    """
    out: list[str] = []
    buf = ""
    pieces = script.split(";")
    for piece in pieces[:-1]:
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    buf += pieces[-1]
    if buf.strip():
        out.append(buf.strip())
    return [s for s in out if s.strip(" ;\n\t\r")]
