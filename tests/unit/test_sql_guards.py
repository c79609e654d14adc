"""The guarded builtins of query connections give SQLite's own results, and bound what one call may cost.

Every replacement in agent_client._sql_guards is compared with the builtin of the same SQLite library on
small generated inputs (NULLs, integers, REALs, text with wildcards, NUL, case pairs and non-ASCII, UTF-8
BLOBs): same value, same storage class, same error. The internal chunking (search windows, strip chunks,
the set-based strip) is forced down to one character so those paths are compared too. The prepare-time
expansion estimate refuses the nested-reference bombs and lets ordinary queries through.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_client import QueryConnection, QueryError, QueryTimeout, run_read_only
from agent_client import _sql_guards as guards_mod
from agent_client._sql_guards import MAX_EXPANSION, Guards, expansion_estimate, install, printf_budget
from agent_client.read_only_query import QueryTooComplex, ValueTooLarge

ALPHABET = "aAbBkKzZ%_*?[]^-\\!xé😀ſ\u212a\x00 .01"
texts = st.text(alphabet=ALPHABET, max_size=10)
values = st.one_of(
    st.none(),
    st.integers(-20, 20),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, width=64),
    texts,
    texts.map(lambda s: s.encode("utf-8")),
)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Pair:
    """A plain connection (SQLite's builtins) and a guarded one, compared statement by statement."""

    def __init__(self) -> None:
        self.builtin = sqlite3.connect(":memory:")
        self.guarded = sqlite3.connect(":memory:", factory=QueryConnection)
        self.guards = install(self.guarded)
        self.arm()

    def arm(self, max_value_bytes: int = 1 << 20) -> None:
        self.guards.arm(time.monotonic() + 60, max_value_bytes, 16 << 20)

    def run(self, conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        self.guards.abort = None
        try:
            return ("ok", conn.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            return ("error", str(self.guards.abort) if self.guards.abort is not None else str(exc))

    def same(self, call: str, *args: Any) -> tuple[str, Any]:
        sql = f"SELECT typeof({call}), {call}"
        want = self.run(self.builtin, sql, args + args)
        got = self.run(self.guarded, sql, args + args)
        assert got == want, (call, args)
        return got


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.builtin.close()
    p.guarded.close()


@pytest.fixture(params=["default", "one-char-chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Also run with every window, chunk and fast-path threshold at its smallest."""
    if request.param == "one-char-chunks":
        monkeypatch.setattr(guards_mod, "_MIN_WINDOW", 1)
        monkeypatch.setattr(guards_mod, "_REGEX_BUDGET", 1)
        monkeypatch.setattr(guards_mod, "_STRIP_CHUNK", 1)
        monkeypatch.setattr(guards_mod, "_STRIP_FAST_SET", 0)
    return str(request.param)


@SETTINGS
@given(x=values, y=values)
def test_instr_is_sqlites(pair: Pair, x: Any, y: Any) -> None:
    pair.same("instr(?, ?)", x, y)


@SETTINGS
@given(x=values, y=values, z=values)
def test_replace_is_sqlites(pair: Pair, x: Any, y: Any, z: Any) -> None:
    pair.same("replace(?, ?, ?)", x, y, z)


@SETTINGS
@given(x=values, y=values, fn=st.sampled_from(["trim", "ltrim", "rtrim"]))
def test_trim_is_sqlites(pair: Pair, chunking: str, x: Any, y: Any, fn: str) -> None:
    pair.same(f"{fn}(?, ?)", x, y)


patterns = st.text(alphabet="aAkK%_*?[]^-\\éz\x00", max_size=10)


@SETTINGS
@given(p=st.one_of(patterns, values), s=st.one_of(texts, values))
def test_like_and_glob_are_sqlites(pair: Pair, chunking: str, p: Any, s: Any) -> None:
    pair.same("like(?, ?)", p, s)
    pair.same("glob(?, ?)", p, s)
    pair.same("? LIKE ?", s, p)
    pair.same("? GLOB ?", s, p)


@SETTINGS
@given(p=patterns, s=texts, e=st.one_of(st.sampled_from(["\\", "%", "_", "a", "é", "", "ab", "\x00", None]), values))
def test_like_escape_is_sqlites(pair: Pair, chunking: str, p: str, s: str, e: Any) -> None:
    pair.same("like(?, ?, ?)", p, s, e)


@SETTINGS
@given(
    s=st.text(alphabet="ab", min_size=0, max_size=40),
    parts=st.lists(st.text(alphabet="ab_?", min_size=1, max_size=4), min_size=1, max_size=4),
)
def test_like_glob_floating_pieces_are_sqlites(pair: Pair, chunking: str, s: str, parts: list[str]) -> None:
    """Several pieces between wildcards: the leftmost placement of each must agree with SQLite's backtracking."""
    pair.same("? LIKE ?", s, "%" + "%".join(parts) + "%")
    pair.same("? LIKE ?", s, "%".join(parts))
    pair.same("? GLOB ?", s, "*" + "*".join(p.replace("_", "?") for p in parts))


formats = st.text(alphabet="%-+ #!0,l.*123sdfgcqQwxXeEionpzTSr|", max_size=12)


@SETTINGS
@given(fmt=st.one_of(formats, values), args=st.lists(st.one_of(st.integers(-20, 20), values), max_size=4))
def test_printf_is_sqlites_or_refused_by_its_budget(pair: Pair, fmt: Any, args: list[Any]) -> None:
    if isinstance(fmt, str):
        budget = printf_budget(pair.guards, fmt.split("\x00", 1)[0], args)
        if budget > 100_000:  # SQLite itself would spend seconds; the guard refuses it
            pair.arm(max_value_bytes=100_000)
            got = pair.run(pair.guarded, "SELECT printf(" + ", ".join("?" * (1 + len(args))) + ")", (fmt, *args))
            pair.arm()
            assert got[0] == "error" and "query_max_value_bytes" in got[1]
            return
    call = "printf(" + ", ".join("?" * (1 + len(args))) + ")"
    pair.same(call, fmt, *args)
    pair.same(call.replace("printf", "format"), fmt, *args)


@st.composite
def directives(draw: st.DrawFn) -> tuple[str, list[Any], int]:
    """A well-formed format, its arguments, and the widths + precisions it asks for."""
    fmt, args, expected = "", [], 0
    for _ in range(draw(st.integers(0, 4))):
        fmt += draw(st.sampled_from(["", "lit", "|"]))
        flags = draw(st.text(alphabet="-+ #!0,", max_size=2))
        conv = draw(st.sampled_from(list("dsfgcqxeQwi%")))
        width = draw(st.integers(0, 50))
        star_width = draw(st.booleans())
        width_arg = draw(st.integers(-50, 50))
        prec = draw(st.one_of(st.none(), st.integers(0, 30)))
        star_prec = draw(st.booleans())
        spec = "%" + flags
        w = 0
        if star_width:
            spec += "*"
            args.append(width_arg)
            w = abs(width_arg)
        elif width:
            spec += str(width)
            w = width
        p = -1
        if prec is not None:
            if star_prec:
                spec += ".*"
                args.append(prec)
            else:
                spec += f".{prec}"
            p = prec
        spec += conv
        fmt += spec
        if conv != "%":
            args.append(draw(st.one_of(st.integers(-5, 5), texts)))
        if conv in "fge":
            expected += w + (p if p >= 0 else 6)
        elif conv == "%":
            expected += w
        else:
            expected += w + max(p, 0)
    return fmt, args, expected


@SETTINGS
@given(case=directives())
def test_printf_budget_reads_widths_and_precisions_as_sqlite_does(pair: Pair, case: tuple[str, list[Any], int]) -> None:
    fmt, args, expected = case
    assert printf_budget(pair.guards, fmt, args) == expected
    pair.same("printf(" + ", ".join("?" * (1 + len(args))) + ")", fmt, *args)


@SETTINGS
@given(n=st.one_of(st.integers(-5, 300), values), fn=st.sampled_from(["zeroblob", "length(randomblob"]))
def test_zeroblob_and_randomblob_are_sqlites(pair: Pair, n: Any, fn: str) -> None:
    call = "zeroblob(?)" if fn == "zeroblob" else "length(randomblob(?))"
    if (isinstance(n, int | float) and n > 1 << 20) or isinstance(n, str | bytes):
        return  # larger than a query may make (refused below), or text whose number SQLite reads
    pair.same(call, n)


@SETTINGS
@given(
    fmt=st.text(alphabet="%YmdHMSfjJsWw-: x", max_size=12),
    mods=st.lists(st.sampled_from(["+1 day", "start of month", "-3 hours", "weekday 2"]), max_size=2),
)
def test_strftime_is_sqlites(pair: Pair, fmt: str, mods: list[str]) -> None:
    pair.same("strftime(" + ", ".join("?" * (2 + len(mods))) + ")", fmt, "2021-03-04 05:06:07.891", *mods)


def test_made_values_are_bounded(pair: Pair) -> None:
    pair.arm(max_value_bytes=4096)
    for sql in (
        "SELECT zeroblob(4097)",
        "SELECT randomblob(100000000)",
        "SELECT printf('%.*c', 1000000000, 'x')",
        "SELECT format('%5000d', 1)",
        "SELECT printf('%s', ?)",
    ):
        started = time.monotonic()
        got = pair.run(pair.guarded, sql, ("x" * 5000,) if "?" in sql else ())
        assert got[0] == "error" and "query_max_value_bytes" in got[1], (sql, got)
        assert pair.guards.abort is not None and pair.guards.abort.kind == "value_too_large"
        print(f"{sql:45s} refused in {time.monotonic() - started:.4f} s")
    assert pair.run(pair.guarded, "SELECT length(zeroblob(4096)), length(printf('%4000d', 1))", ()) == (
        "ok",
        [(4096, 4000)],
    )
    pair.arm()


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        ("SELECT length(trim(?, ?))", ("a" * 300_000, "a" + "bcdefghijklmnopqrstuvwxyz" * 4)),
        ("SELECT ? LIKE ?", ("a" * 300_000, "%" + "_a" * 50 + "b%")),
        ("SELECT ? GLOB ?", ("a" * 300_000, "*" + "?a" * 50 + "b*")),
    ],
)
def test_a_passed_deadline_stops_a_long_call(pair: Pair, sql: str, args: tuple[str, str]) -> None:
    """Long calls check the deadline between their chunks (the progress handler cannot run inside them)."""
    pair.guards.arm(time.monotonic() - 1, 1 << 20, 16 << 20)
    got = pair.run(pair.guarded, sql, args)
    assert got[0] == "error" and pair.guards.abort is not None and pair.guards.abort.kind == "timeout", got
    pair.arm()


def _policy(db: str, table: str) -> bool:
    return True


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM big WHERE instr(v, substr(v, 1, 1000000) || 'b')",
        "SELECT count(*) FROM big WHERE v LIKE '%' || substr(v, 1, 9997) || 'b%'",
        "SELECT count(*) FROM big WHERE v GLOB '*' || replace(substr(v, 1, 2000), 'a', '[a]') || 'b*'",
        "SELECT length(trim(v, replace(substr(v, 1, 1000000), 'a', 'b') || 'a')) FROM big",
        "SELECT length(replace(v, substr(v, 1, 100000) || 'b', 'x')) FROM big",
        "SELECT count(*) FROM big WHERE v LIKE '%' || replace(substr(v, 1, 2000), 'a', '_') || 'b%'",
        "SELECT count(*) FROM big WHERE v LIKE '%' || replace(substr(v, 1, 4990), 'a', 'A_') || 'b%'",
        "SELECT count(*) FROM big WHERE v LIKE replace(substr(v, 1, 4999), 'a', '%a') || 'b'",
        "SELECT count(*) FROM big WHERE upper(v) GLOB '*' || replace(substr(v, 1, 3000), 'a', '?A') || '[b]*'",
        "SELECT length(strftime(substr(replace(v, 'a', '%J'), 1, 60000), 'now')) FROM big",
    ],
)
def test_one_step_ends_near_the_deadline(sql: str) -> None:
    """The calls that take seconds to minutes in SQLite's C code end within the bound (+ one window)."""
    conn = sqlite3.connect(":memory:", factory=QueryConnection, check_same_thread=False)
    conn.execute("CREATE TABLE big (v TEXT)")
    conn.execute("INSERT INTO big VALUES (?)", ("a" * 4_000_000,))
    started = time.monotonic()
    try:
        result = run_read_only(conn, sql, (), policy=_policy, timeout_s=0.3, max_rows=10)
        outcome = f"answered {result.rows}"
    except QueryTimeout:
        outcome = "timed out"
    elapsed = time.monotonic() - started
    print(f"\n{sql[:70]:70s} {outcome} after {elapsed:.3f} s (bound 0.3 s)")
    conn.close()


def _flatten_bomb(levels: int, refs: int = 3) -> str:
    q = "SELECT z AS x0 FROM t"
    for i in range(1, levels + 1):
        q = f"SELECT {'+'.join([f'x{i - 1}'] * refs)} AS x{i} FROM ({q})"
    return q


def _cte_bomb(levels: int, reverse: bool = False) -> str:
    parts = ["a0(x) AS (SELECT 1)"]
    for i in range(1, levels + 1):
        p = f"a{i - 1}"
        parts.append(
            f"a{i}(x) AS (SELECT (SELECT max(x) FROM {p}) + (SELECT min(x) FROM {p}) + (SELECT count(x) FROM {p}))"
        )
    if reverse:
        parts.reverse()
    return "WITH " + ", ".join(parts) + f" SELECT x FROM a{levels}"


def _implicit_alias_bomb(levels: int) -> str:
    q = "SELECT z x0 FROM t"
    for i in range(1, levels + 1):
        q = f"SELECT (x{i - 1} * x{i - 1}) + x{i - 1} x{i} FROM ({q}) AS s{i}"
    return q


def _span_bomb(levels: int) -> str:
    q, name = "SELECT z FROM t", "z"
    for _ in range(levels):
        expr = "+".join([f'"{name}"' if name != "z" else "z"] * 3)
        q, name = f"SELECT {expr} FROM ({q})", expr.replace('"', '""')
    return q


BOMBS = {
    "flatten 3 refs x 12 levels": _flatten_bomb(12),
    "flatten 10 refs x 6 levels": _flatten_bomb(6, refs=10),
    "cte 3 refs x 12 levels": _cte_bomb(12),
    "cte forward references": _cte_bomb(12, reverse=True),
    "cte 20 levels (gigabytes)": _cte_bomb(20),
    "implicit aliases": _implicit_alias_bomb(13),
    "1500 windows": "SELECT " + ", ".join(f"sum(a) OVER (PARTITION BY b + {i})" for i in range(1500)) + " FROM t",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_prepare_bombs_are_refused_before_sqlite_sees_them(name: str) -> None:
    sql = BOMBS[name]
    started = time.monotonic()
    assert expansion_estimate(sql) is None
    conn = sqlite3.connect(":memory:", factory=QueryConnection)
    conn.execute("CREATE TABLE t (z, a, b)")
    with pytest.raises(QueryTooComplex) as err:
        run_read_only(conn, sql, (), policy=_policy, timeout_s=1, max_rows=10)
    assert err.value.code == "query_too_complex"
    print(f"\n{name}: {len(sql)} bytes of SQL refused in {time.monotonic() - started:.4f} s")


@pytest.mark.parametrize("levels", [4, 6, 7])
def test_modest_nesting_prepares_quickly(levels: int) -> None:
    """Below the bound, SQLite prepares the same shapes in a fraction of a second."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (z)")
    for sql in (_flatten_bomb(levels), _cte_bomb(levels), _implicit_alias_bomb(levels)):
        estimate = expansion_estimate(sql)
        assert estimate is not None and estimate <= MAX_EXPANSION
        started = time.monotonic()
        conn.execute("EXPLAIN " + sql).fetchall()
        print(f"\nestimate {estimate:>8} prepared in {time.monotonic() - started:.4f} s")


ORDINARY = [
    "SELECT 1",
    "SELECT t.tag, count(*), total(i.price) FROM items i JOIN tags t ON t.item_id = i.id GROUP BY t.tag ORDER BY t.tag",
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 5) "
    'SELECT count(*) FROM n JOIN "sec-other".items o ON o.id = 100 + n.x',
    "WITH a AS (SELECT id, price * 2 AS p FROM items), b AS (SELECT id, p + p AS q FROM a), "
    "c AS (SELECT id, q * q AS r FROM b) SELECT a.id, b.q, c.r FROM a JOIN b USING (id) JOIN c USING (id) "
    "WHERE c.r > 10 ORDER BY c.r DESC LIMIT 5",
    "SELECT name, row_number() OVER w, sum(price) OVER w FROM items WINDOW w AS (PARTITION BY name ORDER BY id)",
    "SELECT * FROM (SELECT id, name FROM items WHERE id IN (SELECT item_id FROM tags WHERE tag = 't1')) s "
    "WHERE EXISTS (SELECT 1 FROM tags t WHERE t.item_id = s.id) AND s.name LIKE 'item%'",
    "SELECT CASE WHEN price > 5 THEN 'hi' WHEN price > 2 THEN 'mid' ELSE 'lo' END band, count(*) FROM items "
    "GROUP BY band HAVING count(*) > 1",
    "SELECT " + ", ".join(f"c{i} + c{i} AS d{i}" for i in range(300)) + " FROM wide",
    "SELECT 1 IN (" + ", ".join(str(i) for i in range(20_000)) + ")",
    "SELECT " + ", ".join(f"sum(a) OVER (PARTITION BY b + {i})" for i in range(100)) + " FROM t",
]


@pytest.mark.parametrize("sql", ORDINARY, ids=[f"q{i}" for i in range(len(ORDINARY))])
def test_ordinary_queries_pass_the_estimate(sql: str) -> None:
    estimate = expansion_estimate(sql)
    assert estimate is not None and estimate < MAX_EXPANSION // 4, estimate


def test_errors_are_named() -> None:
    assert issubclass(ValueTooLarge, QueryError) and ValueTooLarge.code == "value_too_large"
    assert issubclass(QueryTooComplex, QueryError) and QueryTooComplex.code == "query_too_complex"
    assert isinstance(Guards(), Guards)
