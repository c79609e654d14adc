"""Cost guards for read-only query connections: one function call and one prepare stay bounded.

SQLite's progress handler runs only between rows, so one long call cannot be stopped by it: `instr()`,
`replace()`, `trim(X, Y)`, `LIKE` and `GLOB` are O(len(X) * len(Y)) in SQLite's C code,
`printf('%.*c', N, 'x')` loops N times even after its output overflowed, `strftime()` spends ~0.3 µs per
directive of its format, and `zeroblob(N)` / `randomblob(N)` make N bytes at once. `install(conn)`
replaces exactly those builtins (instr, replace, trim/ltrim/rtrim with two arguments, like, glob,
printf, format, strftime, zeroblob, randomblob) on one query connection with functions of the same name
and the same results that are linear (str.find, str.replace, bytes.find, patterns split at their `%`/`*`
into fixed-width pieces found leftmost first), check the query's deadline between chunks of their work
(yielding the GIL there, so the event loop keeps running), and bound what they make (`max_value_bytes`).
Builtins linear in their inputs stay SQLite's own: a value is at most SQLITE_LIMIT_LENGTH.

The replacements run in Python, so they read TEXT as UTF-8: an argument that is TEXT but not UTF-8 (only
a BLOB cast to TEXT can be) makes the call fail with a clear error. Where SQLite's exact behaviour is
simplest to get from SQLite itself (a REAL as text, printf's formatting, zeroblob's argument rules), a
private in-memory connection of the thread (`_evaluator`) runs the builtin on inputs already known to
be cheap. tests/unit/test_sql_guards.py compares every replacement with the builtin.

`expansion_estimate(sql)` bounds the other long step: preparing a statement. SQLite copies a common table
expression's body into every place that names it, a FROM subquery's result expressions into every
reference to them, and each window with its own PARTITION BY/ORDER BY into one more nested subquery, so
a few hundred bytes of nested references can take minutes and gigabytes to prepare (nothing interrupts a
prepare). The estimate follows those copies on the token stream and over-approximates them.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

Value = int | float | str | bytes | None

#: SQLITE_LIMIT_LIKE_PATTERN_LENGTH of query connections (SQLite's default is 50,000): compiling a longer
#: pattern alone would take a good part of a second.
LIKE_PATTERN_BYTES = 10_000
#: Longest strftime() or printf() format accepted: SQLite spends up to 0.3 µs per directive in one step.
FORMAT_BYTES = 64 * 1024
#: Most "expanded terms" a statement may prepare into (see `expansion_estimate`).
MAX_EXPANSION = 200_000

#: Work (characters compared) one regular-expression call may do while holding the GIL (about a millisecond).
_REGEX_BUDGET = 1 << 18
#: Characters one str.lstrip / rstrip call examines while holding the GIL.
_STRIP_CHUNK = 1 << 18
#: A trim() character set larger than this is matched with a Python set instead of str.strip.
_STRIP_FAST_SET = 64
#: Smallest window a pattern search scans per call.
_MIN_WINDOW = 16


class GuardAbort(Exception):
    """Raised inside a replacement function; run_read_only turns `guards.abort` into a QueryError."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "timeout" | "value_too_large" | "too_complex" | "error"


@dataclass
class Guards:
    """What the replacement functions of one connection may spend; armed by run_read_only per query."""

    deadline: float = math.inf
    max_value_bytes: int = 1024 * 1024  # a value made by printf/format, zeroblob, randomblob
    max_length: int = 16 * 1024 * 1024  # the connection's SQLITE_LIMIT_LENGTH (any value)
    abort: GuardAbort | None = None

    def arm(self, deadline: float, max_value_bytes: int, max_length: int) -> None:
        self.deadline, self.max_value_bytes, self.max_length, self.abort = deadline, max_value_bytes, max_length, None

    def fail(self, kind: str, message: str) -> NoReturn:
        self.abort = GuardAbort(kind, message)
        raise self.abort

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            self.fail("timeout", "the query ran past its time bound")

    def pause(self) -> None:
        """Between two chunks of one long call: let other threads (the event loop) have the GIL, then tick."""
        time.sleep(0)
        self.tick()

    def too_big(self, what: str, size: int | None, limit: int) -> NoReturn:
        setting = "query_max_value_bytes" if limit == self.max_value_bytes else "the limit on any one value"
        made = f"a value of {size} bytes" if size is not None else "a larger value"
        self.fail("value_too_large", f"{what} would make {made}; the limit is {limit} bytes ({setting})")


# ---------------------------------------------------------------------------------------------- evaluator
_local = threading.local()


def _evaluator(limit: int) -> sqlite3.Connection:
    """This thread's in-memory connection with SQLite's own builtins, its LIMIT_LENGTH set to `limit`."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        _local.conn = conn
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
    return conn


def _builtin(g: Guards, name: str, args: Sequence[Value], limit: int) -> Any:
    """SQLite's builtin `name(*args)`, run on the evaluator; "too big" becomes value_too_large."""
    sql = f"SELECT {name}({', '.join('?' * len(args))})"
    try:
        row = _evaluator(limit).execute(sql, tuple(args)).fetchone()
    except (sqlite3.DataError, sqlite3.OperationalError) as exc:
        if "too big" in str(exc):
            g.too_big(f"{name}()", None, limit)
        g.fail("error", str(exc))
    return row[0]


def _sqlite_text(v: int | float) -> str:
    """A number as SQLite renders it as TEXT (REALs: 15 significant digits, '.0' kept)."""
    if isinstance(v, int):
        return str(v)
    text = _evaluator(1 << 20).execute("SELECT CAST(? AS TEXT)", (v,)).fetchone()[0]
    return str(text)


def _text(g: Guards, v: int | float | str | bytes) -> str:
    """A non-NULL value read as TEXT, as SQLite's sqlite3_value_text() would (blobs must hold UTF-8)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            g.fail("error", "a BLOB used as TEXT here must hold UTF-8 text")
    return _sqlite_text(v)


def _text_bytes(v: int | float | str | bytes) -> bytes:
    """A non-NULL value's bytes as SQLite's sqlite3_value_text() sees them."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    return _sqlite_text(v).encode("ascii")


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# --------------------------------------------------------------------------------------------------- instr
def _instr(g: Guards, x: Value, y: Value) -> int | None:
    """instr(X, Y): 1 + characters (bytes, for two BLOBs) before Y's first occurrence in X; 0 if none."""
    if x is None or y is None:
        return None
    if isinstance(x, bytes) and isinstance(y, bytes):
        return x.find(y) + 1
    if not isinstance(x, bytes) and not isinstance(y, bytes):
        sx = x if isinstance(x, str) else _sqlite_text(x)
        sy = y if isinstance(y, str) else _sqlite_text(y)
        return sx.find(sy) + 1
    # One BLOB, one not: both read as text bytes; the search advances one character (a lead byte and its
    # continuation bytes) at a time, so a match counts only where a character starts (or at offset 0).
    hx, hy = _text_bytes(x), _text_bytes(y)
    if not hy:
        return 1
    pos = 0
    while True:
        pos = hx.find(hy, pos)
        if pos < 0:
            return 0
        if pos == 0 or hx[pos] & 0xC0 != 0x80:
            return 1 + pos - _continuation_bytes(hx[1 : pos + 1])
        pos += 1
        if pos & 0xFFF == 0:
            g.pause()


_CONTINUATION = bytes(range(0x80, 0xC0))


def _continuation_bytes(b: bytes) -> int:
    return len(b) - len(b.translate(None, _CONTINUATION))


# ------------------------------------------------------------------------------------------------- replace
def _replace(g: Guards, x: Value, y: Value, z: Value) -> Value:
    """replace(X, Y, Z): every non-overlapping Y in X (leftmost first) replaced by Z; TEXT."""
    if x is None or y is None:
        return None
    by = _text_bytes(y)
    if not by or by[0] == 0:
        return _text(g, x) if isinstance(x, bytes) else x  # X back, a number keeping its class, a BLOB read as TEXT
    if z is None:
        return None
    if isinstance(x, str) and isinstance(y, str) and isinstance(z, str):
        count = x.count(y)
        size = _utf8_len(x) + count * (_utf8_len(z) - _utf8_len(y))
        if size > g.max_length:
            g.too_big("replace()", size, g.max_length)
        return x.replace(y, z) if count else x
    bx, bz = _text_bytes(x), _text_bytes(z)
    count = bx.count(by)
    size = len(bx) + count * (len(bz) - len(by))
    if size > g.max_length:
        g.too_big("replace()", size, g.max_length)
    try:
        return bx.replace(by, bz).decode("utf-8")
    except UnicodeDecodeError:
        g.fail("error", "replace() of a BLOB must make UTF-8 text")


# --------------------------------------------------------------------------------------------------- trim
def _trim(g: Guards, x: Value, y: Value, left: bool, right: bool) -> str | None:
    """trim/ltrim/rtrim(X, Y): X without the leading/trailing characters found in Y; TEXT."""
    if x is None or y is None:
        return None
    if isinstance(x, bytes) or isinstance(y, bytes):
        return _trim_bytes(g, _text_bytes(x), _text_bytes(y), left, right)
    sx = x if isinstance(x, str) else _sqlite_text(x)
    sy = (y if isinstance(y, str) else _sqlite_text(y)).split("\x00", 1)[0]
    members: set[str] = set()
    for pos in range(0, len(sy), _STRIP_CHUNK):
        members.update(sy[pos : pos + _STRIP_CHUNK])
        g.pause()
    if not members:
        return sx
    start, end = 0, len(sx)
    if left:
        start = _strip_run(g, sx, members, 0, end, forward=True)
    if right:
        end = _strip_run(g, sx, members, start, end, forward=False)
    return sx[start:end]


def _strip_run(g: Guards, s: str, members: set[str], start: int, end: int, *, forward: bool) -> int:
    """Where the run of characters in `members` at the start (forward) or end of s[start:end] stops."""
    if len(members) <= _STRIP_FAST_SET:
        chars = "".join(members)
        if forward:
            pos = start
            while pos < end:
                chunk = s[pos : min(end, pos + _STRIP_CHUNK)]
                rest = chunk.lstrip(chars)
                pos += len(chunk) - len(rest)
                if rest:
                    return pos
                g.pause()
            return end
        pos = end
        while pos > start:
            chunk = s[max(start, pos - _STRIP_CHUNK) : pos]
            rest = chunk.rstrip(chars)
            pos -= len(chunk) - len(rest)
            if rest:
                return pos
            g.pause()
        return start
    step = 1 if forward else -1
    pos, stop = (start, end) if forward else (end - 1, start - 1)
    while pos != stop:
        if s[pos] not in members:
            return pos if forward else pos + 1
        pos += step
        if pos & 0xFFFF == 0:
            g.pause()
    return end if forward else start


def _utf8_chars(g: Guards, b: bytes) -> list[bytes]:
    """`b` split as SQLite's SQLITE_SKIP_UTF8 does: a byte >= 0xC0 takes the continuation bytes after it."""
    out: list[bytes] = []
    i, n = 0, len(b)
    while i < n:
        j = i + 1
        if b[i] >= 0xC0:
            while j < n and b[j] & 0xC0 == 0x80:
                j += 1
        out.append(b[i:j])
        i = j
        if len(out) & 0xFFFF == 0:
            g.pause()
    return out


def _trim_bytes(g: Guards, x: bytes, y: bytes, left: bool, right: bool) -> str:
    """trim() on text bytes exactly as SQLite's loop: at each end, the first listed character that matches."""
    entries = _utf8_chars(g, y.split(b"\x00", 1)[0])
    first: dict[bytes, int] = {}
    for i, e in enumerate(entries):
        first.setdefault(e, i)
    by_len: dict[int, dict[bytes, int]] = {}
    for e, i in first.items():
        by_len.setdefault(len(e), {})[e] = i
    lengths = sorted(by_len)
    start, end = 0, len(x)

    def step(at_start: bool) -> int:
        best_i, best_len = -1, 0
        for n in lengths:
            if n > end - start:
                break
            piece = x[start : start + n] if at_start else x[end - n : end]
            i = by_len[n].get(piece)
            if i is not None and (best_i < 0 or i < best_i):
                best_i, best_len = i, n
        return best_len

    if first:
        count = 0
        while left and start < end and (n := step(True)):
            start += n
            count += 1
            if count & 0xFFF == 0:
                g.pause()
        while right and start < end and (n := step(False)):
            end -= n
            count += 1
            if count & 0xFFF == 0:
                g.pause()
    try:
        return x[start:end].decode("utf-8")
    except UnicodeDecodeError:
        g.fail("error", "trim() of a BLOB must make UTF-8 text")


# ------------------------------------------------------------------------------------------------ LIKE/GLOB
@dataclass
class _Segment:
    """A fixed-width piece of a pattern between two wildcards that match any run of characters."""

    width: int
    literal: str | None  # the exact text, when the piece has no one-character wildcard or set
    regex: re.Pattern[str]

    def match_at(self, s: str, pos: int) -> bool:
        if self.literal is not None:
            return s.startswith(self.literal, pos)
        return pos + self.width <= len(s) and self.regex.match(s, pos) is not None

    def search(self, g: Guards, s: str, pos: int) -> int:
        """Leftmost start >= pos where the piece matches, or -1; the deadline is checked between windows."""
        if self.literal is not None:
            return s.find(self.literal, pos)
        n = len(s)
        window = max(_MIN_WINDOW, _REGEX_BUDGET // max(1, self.width))
        while pos + self.width <= n:
            end = min(n, pos + window + self.width - 1)
            m = self.regex.search(s, pos, end)
            if m is not None:
                return m.start()
            if end >= n:
                return -1
            pos += window
            g.pause()
        return -1


@dataclass
class _Pattern:
    """A LIKE or GLOB pattern as anchored prefix, floating middle pieces and anchored suffix."""

    never: bool = False  # cannot match anything (a trailing escape, an unterminated [set])
    fold: bool = False  # LIKE with an ASCII letter: match against the subject with A-Z lowered
    has_star: bool = False
    prefix: _Segment | None = None
    middle: list[_Segment] = field(default_factory=list)
    suffix: _Segment | None = None
    shape: str = ""  # "eq" | "prefix" | "suffix" | "both" | "contains" | "any" when plain str methods answer

    def classify(self) -> None:
        """Name the common all-literal shapes (x, x%, %x, x%y, %x%, %) that str methods answer directly."""
        pre, mid, suf = self.prefix, self.middle, self.suffix
        if any(seg.literal is None for seg in (pre, suf, *mid) if seg is not None):
            return
        if not self.has_star:
            self.shape = "eq"
        elif not mid:
            self.shape = {(True, False): "prefix", (False, True): "suffix", (True, True): "both"}.get(
                (pre is not None, suf is not None), "any"
            )
        elif len(mid) == 1 and pre is None and suf is None:
            self.shape = "contains"

    def matches(self, g: Guards, s: str) -> bool:
        if self.never:
            return False
        if self.fold:
            s = s.lower() if s.isascii() else s.encode("utf-8").lower().decode("utf-8")  # bytes.lower: A-Z only
        shape = self.shape
        if shape:
            if shape == "contains":
                return self.middle[0].literal in s  # type: ignore[operator]
            if shape == "eq":
                return s == (self.prefix.literal if self.prefix is not None else "")
            if shape == "any":
                return True
            pre = self.prefix.literal if self.prefix is not None else ""
            suf = self.suffix.literal if self.suffix is not None else ""
            return len(s) >= len(pre or "") + len(suf or "") and s.startswith(pre or "") and s.endswith(suf or "")
        n = len(s)
        if not self.has_star:
            seg = self.prefix
            return n == 0 if seg is None else n == seg.width and seg.match_at(s, 0)
        pos = 0
        if self.prefix is not None:
            if not self.prefix.match_at(s, 0):
                return False
            pos = self.prefix.width
        for seg in self.middle:
            found = seg.search(g, s, pos)
            if found < 0:
                return False
            pos = found + seg.width
        if self.suffix is not None:
            start = n - self.suffix.width
            return start >= pos and self.suffix.match_at(s, start)
        return True


_Atom = tuple[str, str]  # (kind, regex) with kind "lit:<char>", "any" or "set"


def _segment(atoms: list[_Atom]) -> _Segment:
    literal: str | None = "".join(k[4:] for k, _ in atoms) if all(k.startswith("lit:") for k, _ in atoms) else None
    return _Segment(len(atoms), literal, re.compile("".join(rx for _, rx in atoms), re.DOTALL))


def _assemble(atoms: list[_Atom | None], fold: bool = False) -> _Pattern:
    """Atoms with None for the run wildcard -> _Pattern."""
    groups: list[list[_Atom]] = [[]]
    for a in atoms:
        if a is None:
            groups.append([])
        else:
            groups[-1].append(a)
    pat = _Pattern(has_star=len(groups) > 1, fold=fold)
    if groups[0]:
        pat.prefix = _segment(groups[0])
    if len(groups) > 1:
        if groups[-1]:
            pat.suffix = _segment(groups[-1])
        pat.middle = [_segment(grp) for grp in groups[1:-1] if grp]
    pat.classify()
    return pat


def _literal_atom(c: str, fold: bool) -> _Atom:
    """One literal character; lowered when matched against an A-Z-lowered subject (LIKE's case folding)."""
    if fold and c.isascii():
        c = c.lower()
    return (f"lit:{c}", re.escape(c))


@functools.lru_cache(maxsize=256)
def _like_pattern(pattern: str, escape: str | None) -> _Pattern:
    """SQLite's LIKE: % any run, _ one character, ASCII letters match either case, optional ESCAPE."""
    match_all = None if escape == "%" else "%"
    match_one = None if escape == "_" else "_"
    atoms: list[_Atom | None] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == match_all:
            atoms.append(None)
        elif escape is not None and c == escape:
            if i >= n:
                return _Pattern(never=True)
            atoms.append(_literal_atom(pattern[i], True))
            i += 1
        elif c == match_one:
            atoms.append(("any", "."))
        else:
            atoms.append(_literal_atom(c, True))
    fold = any(a is not None and a[0].startswith("lit:") and a[0][4:].isalpha() and a[0].isascii() for a in atoms)
    return _assemble(atoms, fold)


@functools.lru_cache(maxsize=256)
def _glob_pattern(pattern: str) -> _Pattern:
    """SQLite's GLOB: * any run, ? one character, [...] a set (^ inverts, a-z ranges), case-sensitive."""
    atoms: list[_Atom | None] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            atoms.append(None)
        elif c == "?":
            atoms.append(("any", "."))
        elif c == "[":
            parsed = _glob_set(pattern, i)
            if parsed is None:
                return _Pattern(never=True)
            atom, i = parsed
            atoms.append(atom)
        else:
            atoms.append(_literal_atom(c, False))
    return _assemble(atoms)


def _glob_set(p: str, i: int) -> tuple[_Atom, int] | None:
    """The [...] set starting at p[i] (after '['), parsed as SQLite's patternCompare does; None if unterminated."""
    n = len(p)

    def read(k: int) -> tuple[str, int]:
        return (p[k], k + 1) if k < n else ("", k)

    invert = False
    ranges: list[tuple[int, int]] = []
    c2, i = read(i)
    if c2 == "^":
        invert = True
        c2, i = read(i)
    if c2 == "]":
        ranges.append((ord("]"), ord("]")))
        c2, i = read(i)
    prior = 0
    while c2 and c2 != "]":
        if c2 == "-" and i < n and p[i] != "]" and prior > 0:
            c2, i = read(i)
            if prior <= ord(c2):
                ranges.append((prior, ord(c2)))
            prior = 0
        else:
            ranges.append((ord(c2), ord(c2)))
            prior = ord(c2)
        c2, i = read(i)
    if not c2:
        return None
    items = "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)
    if not items:
        return (("set", "." if invert else "(?!)"), i)
    return (("set", f"[{'^' if invert else ''}{items}]"), i)


def _like_doesnt_match_blobs() -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        return bool(conn.execute("SELECT sqlite_compileoption_used('LIKE_DOESNT_MATCH_BLOBS')").fetchone()[0])
    finally:
        conn.close()


_LIKE_SKIPS_BLOBS = _like_doesnt_match_blobs()


def _pattern_function(g: Guards, glob: bool, with_escape: bool) -> Callable[..., Any]:
    """like(P, S), like(P, S, E) or glob(P, S) for one connection, with its own cache of compiled patterns."""
    cache: dict[tuple[str, str | None], _Pattern] = {}

    def compiled(pattern: str, escape: str | None) -> _Pattern:
        key = (pattern, escape)
        pat = cache.get(key)
        if pat is None:
            if len(cache) >= 64:
                cache.clear()
            pat = cache[key] = _glob_pattern(pattern) if glob else _like_pattern(pattern, escape)
        return pat

    def general(p: Value, s: Value, esc: Value) -> Any:
        if _LIKE_SKIPS_BLOBS and (isinstance(p, bytes) or isinstance(s, bytes)):
            return 0
        if p is not None and (_utf8_len(p) if isinstance(p, str) else len(_text_bytes(p))) > LIKE_PATTERN_BYTES:
            g.fail("error", "LIKE or GLOB pattern too complex")
        escape: str | None = None
        if with_escape:
            if esc is None:
                return None
            escape = _text(g, esc).split("\x00", 1)[0]
            if len(escape) != 1:
                g.fail("error", "ESCAPE expression must be a single character")
        if p is None or s is None:
            return None
        subject = _text(g, s)
        if "\x00" in subject:
            subject = subject[: subject.index("\x00")]
        return int(compiled(_text(g, p).split("\x00", 1)[0], escape).matches(g, subject))

    if with_escape:
        return general

    def call(p: Value, s: Value) -> Any:
        if type(p) is str and type(s) is str and len(p) * 4 <= LIKE_PATTERN_BYTES:  # the common case, fast
            if "\x00" in p:
                p = p[: p.index("\x00")]
            if "\x00" in s:
                s = s[: s.index("\x00")]
            return int(compiled(p, None).matches(g, s))
        return general(p, s, None)

    return call


# -------------------------------------------------------------------------------------------- printf/format
_INT_CONVERSIONS = frozenset("diuoxXpr")
_FLOAT_CONVERSIONS = frozenset("feEgG")
_TEXT_CONVERSIONS = frozenset("szqQwc")


def _int64(g: Guards, v: Value) -> int:
    """sqlite3_value_int64(v), which printf's '*' uses."""
    if v is None:
        return 0
    if isinstance(v, int):
        return v
    return int(_builtin(g, "printf", ["%lld", v], g.max_length))


def printf_budget(g: Guards, fmt: str, args: Sequence[Value]) -> int:
    """Sum of the widths and precisions printf(fmt, *args) would honour, read as SQLite reads them.

    SQLite's printf does work proportional to each width and precision (a %c precision repeats the
    character even after the output has overflowed), so their sum bounds its cost.
    """
    n, k, used, total = len(fmt), 0, 0, 0

    def char(i: int) -> str:
        return fmt[i] if i < n else "\x00"

    def int_arg() -> int:
        nonlocal used
        if used >= len(args):
            return 0
        used += 1
        return _int32(_int64(g, args[used - 1]))

    while k < n:
        k = fmt.find("%", k)
        if k < 0:
            break
        k += 1
        c = char(k)
        if c == "\x00":
            break
        width, precision, done = 0, -1, False
        while True:
            if c == "l":
                k += 1
                c = char(k)
                if c == "l":
                    k += 1
                    c = char(k)
                done = True
            elif "1" <= c <= "9":
                wx = ord(c) - 48
                k += 1
                c = char(k)
                while "0" <= c <= "9":
                    wx = (wx * 10 + ord(c) - 48) & 0xFFFFFFFF
                    k += 1
                    c = char(k)
                width = wx & 0x7FFFFFFF
                if c not in ".l":
                    done = True
                else:
                    k -= 1
            elif c == "*":
                width = int_arg()
                if width < 0:
                    width = -width if width >= -2147483647 else 0
                if char(k + 1) not in ".l":
                    k += 1
                    c = char(k)
                    done = True
            elif c == ".":
                k += 1
                c = char(k)
                if c == "*":
                    precision = int_arg()
                    if precision < 0:
                        precision = -precision if precision >= -2147483647 else -1
                    k += 1
                    c = char(k)
                else:
                    px = 0
                    while "0" <= c <= "9":
                        px = (px * 10 + ord(c) - 48) & 0xFFFFFFFF
                        k += 1
                        c = char(k)
                    precision = px & 0x7FFFFFFF
                if c == "l":
                    k -= 1
                else:
                    done = True
            elif c not in "-+ #!0,":
                done = True
            if done:
                break
            k += 1
            c = char(k)
            if c == "\x00":
                break
        if c in _INT_CONVERSIONS or c in _TEXT_CONVERSIONS:
            used += 1
            total += width + max(precision, 0)
        elif c in _FLOAT_CONVERSIONS:
            used += 1
            total += width + (precision if precision >= 0 else 6)
        elif c == "%":
            total += width
        elif c != "n":
            break  # SQLite stops at an unknown conversion (and at the internal-only %T, %S)
        k += 1
    return total


def _printf(g: Guards, name: str, args: tuple[Value, ...], budget: int | None = None) -> str | None:
    if not args or args[0] is None:
        return None
    if budget is None:
        fmt = _text(g, args[0]).split("\x00", 1)[0]
        if _utf8_len(fmt) > FORMAT_BYTES:
            g.fail("too_complex", f"a {name}() format may be at most {FORMAT_BYTES} bytes long in a query")
        budget = printf_budget(g, fmt, args[1:])
    if budget > g.max_value_bytes:
        g.too_big(f"{name}() (its widths and precisions)", budget, g.max_value_bytes)
    out = _builtin(g, name, args, g.max_length)
    if out is not None and _utf8_len(str(out)) > g.max_value_bytes:
        g.too_big(f"{name}()", _utf8_len(str(out)), g.max_value_bytes)
    return None if out is None else str(out)


def _strftime(g: Guards, args: tuple[Value, ...]) -> Any:
    if args and args[0] is not None and len(_text_bytes(args[0])) > FORMAT_BYTES:
        g.fail("too_complex", f"a strftime() format may be at most {FORMAT_BYTES} bytes long in a query")
    return _builtin(g, "strftime", args, g.max_length)


# ------------------------------------------------------------------------------------------------- install
class GuardedConnection(sqlite3.Connection):
    """A connection that keeps its Guards, so run_read_only installs the replacements once."""

    cr_guards: Guards | None = None


def install(conn: sqlite3.Connection) -> Guards:
    """Replace the costly builtins on `conn` with guarded ones; returns the Guards they consult.

    Each replacement answers the common case (short TEXT arguments) directly and hands the rest to the
    general, chunked implementation. SQLite stops the statement at the first exception one raises.
    """
    existing = getattr(conn, "cr_guards", None)
    if isinstance(existing, Guards):
        return existing
    g = Guards()
    small = _STRIP_CHUNK

    def instr(x: Value, y: Value) -> int | None:
        if type(x) is str and type(y) is str:
            return x.find(y) + 1
        return _instr(g, x, y)

    def replace(x: Value, y: Value, z: Value) -> Value:
        if (
            type(x) is str
            and type(y) is str
            and type(z) is str
            and y
            and y[0] != "\x00"
            and len(z) <= len(y)
            and 4 * len(x) <= g.max_length  # cannot grow past the limit
        ):
            return x.replace(y, z)
        return _replace(g, x, y, z)

    def trim_function(left: bool, right: bool) -> Callable[[Value, Value], str | None]:
        strip = str.strip if left and right else str.lstrip if left else str.rstrip

        def trim(x: Value, y: Value) -> str | None:
            if type(x) is str and type(y) is str and len(y) <= _STRIP_FAST_SET and len(x) <= small:
                return strip(x, y.split("\x00", 1)[0])
            return _trim(g, x, y, left, right)

        return trim

    printf_budgets: dict[str, int] = {}

    def printf_function(name: str) -> Callable[..., str | None]:
        def printf(*args: Value) -> str | None:
            fmt = args[0] if args else None
            if type(fmt) is str and "*" not in fmt and len(fmt) <= 1024:  # its budget does not depend on args
                budget = printf_budgets.get(fmt)
                if budget is None:
                    if len(printf_budgets) >= 256:
                        printf_budgets.clear()
                    budget = printf_budgets[fmt] = printf_budget(g, fmt.split("\x00", 1)[0], ())
                return _printf(g, name, args, budget)
            return _printf(g, name, args)

        return printf

    def zeroblob(n: Value) -> Any:
        return _builtin(g, "zeroblob", [n], g.max_value_bytes)

    def randomblob(n: Value) -> Any:
        return _builtin(g, "randomblob", [n], g.max_value_bytes)

    def strftime(*args: Value) -> Any:
        return _strftime(g, args)

    conn.create_function("instr", 2, instr, deterministic=True)
    conn.create_function("replace", 3, replace, deterministic=True)
    conn.create_function("trim", 2, trim_function(True, True), deterministic=True)
    conn.create_function("ltrim", 2, trim_function(True, False), deterministic=True)
    conn.create_function("rtrim", 2, trim_function(False, True), deterministic=True)
    conn.create_function("like", 2, _pattern_function(g, False, False), deterministic=True)
    conn.create_function("like", 3, _pattern_function(g, False, True), deterministic=True)
    conn.create_function("glob", 2, _pattern_function(g, True, False), deterministic=True)
    conn.create_function("printf", -1, printf_function("printf"), deterministic=True)
    conn.create_function("format", -1, printf_function("format"), deterministic=True)
    conn.create_function("zeroblob", 1, zeroblob, deterministic=True)
    conn.create_function("randomblob", 1, randomblob)
    conn.create_function("strftime", -1, strftime)
    if isinstance(conn, GuardedConnection):
        conn.cr_guards = g
    return g


# ------------------------------------------------------------------------------------ prepare-time expansion
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|$))
  | (?P<string>[xX]?'(?:[^']|'')*'?)
  | (?P<qident>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<ident>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

#: Words that end a select list or a FROM clause, or cannot be an implicit column alias.
_CLAUSE_WORDS = frozenset(
    [
        "FROM",
        "WHERE",
        "GROUP",
        "HAVING",
        "WINDOW",
        "ORDER",
        "LIMIT",
        "UNION",
        "INTERSECT",
        "EXCEPT",
        "ON",
        "USING",
        "JOIN",
        "NATURAL",
        "LEFT",
        "RIGHT",
        "FULL",
        "INNER",
        "CROSS",
        "OUTER",
        "OFFSET",
        "RETURNING",
        "VALUES",
        "SELECT",
    ]
)
_KEYWORDS = _CLAUSE_WORDS | frozenset(
    [
        "AND",
        "OR",
        "NOT",
        "IS",
        "IN",
        "LIKE",
        "GLOB",
        "MATCH",
        "REGEXP",
        "BETWEEN",
        "CASE",
        "WHEN",
        "THEN",
        "ELSE",
        "END",
        "CAST",
        "AS",
        "COLLATE",
        "ESCAPE",
        "EXISTS",
        "NULL",
        "DISTINCT",
        "ALL",
        "ASC",
        "DESC",
        "NULLS",
        "FIRST",
        "LAST",
        "OVER",
        "PARTITION",
        "FILTER",
        "ROWS",
        "RANGE",
        "GROUPS",
        "UNBOUNDED",
        "PRECEDING",
        "FOLLOWING",
        "CURRENT",
        "ROW",
        "EXCLUDE",
        "NO",
        "OTHERS",
        "TIES",
        "BY",
        "WITH",
        "RECURSIVE",
        "MATERIALIZED",
        "ISNULL",
        "NOTNULL",
    ]
)


@dataclass
class _Tok:
    kind: str  # "ident" (names and keywords, unquoted) | "string" | "number" | "punct"
    text: str
    upper: str  # text.upper() for unquoted words, "" otherwise
    start: int
    end: int


@dataclass
class _Group:
    """A parenthesised part of the statement; `select` when it holds a SELECT, VALUES or WITH."""

    items: list[_Tok | _Group]
    start: int
    end: int

    @property
    def select(self) -> bool:
        first = self.items[0] if self.items else None
        return isinstance(first, _Tok) and first.upper in ("SELECT", "VALUES", "WITH")


class _TooComplex(Exception):
    pass


def _tokenize(sql: str) -> list[_Tok]:
    out: list[_Tok] = []
    for m in _TOKEN_RE.finditer(sql):
        kind = m.lastgroup or "punct"
        if kind in ("ws", "comment"):
            continue
        text = m.group()
        upper = text.upper() if kind == "ident" else ""
        if kind == "qident":
            quote = text[0]
            inner = text[1:-1] if len(text) > 1 else ""
            text = inner.replace(quote * 2, quote) if quote in '"`' else inner
            kind = "ident"
        out.append(_Tok(kind, text, upper, m.start(), m.end()))
    return out


def _nest(toks: list[_Tok], sql_len: int) -> _Group:
    root = _Group([], 0, sql_len)
    stack = [root]
    for t in toks:
        if t.kind == "punct" and t.text == "(":
            g = _Group([], t.start, t.end)
            stack[-1].items.append(g)
            stack.append(g)
        elif t.kind == "punct" and t.text == ")":
            if len(stack) > 1:
                stack[-1].end = t.end
                stack.pop()
        else:
            stack[-1].items.append(t)
    return root


def _word(node: _Tok | _Group | None) -> str:
    """The upper-cased unquoted word a node is, or ""."""
    return node.upper if isinstance(node, _Tok) else ""


def _is_punct(node: _Tok | _Group | None, text: str) -> bool:
    return isinstance(node, _Tok) and node.kind == "punct" and node.text == text


_END_FROM = frozenset(
    [
        "WHERE",
        "GROUP",
        "HAVING",
        "WINDOW",
        "ORDER",
        "LIMIT",
        "UNION",
        "INTERSECT",
        "EXCEPT",
        "SELECT",
        "VALUES",
        "RETURNING",
    ]
)

_Item = tuple[list[_Tok | _Group], str]
#: Weight per (window functions)² in one SELECT: 200 windows with distinct partitions prepare in ~0.15 s.
_WINDOW_WEIGHT = 4


class _Expansion:
    """Estimates how many terms SQLite's prepare step handles once every copy it makes is counted.

    A scope is one parenthesised SELECT (or the statement). Its weight is the sum of its tokens' weights,
    where a name weighs what it stands for: a CTE name the weight of the CTE's body, a column name the
    weight of the expression a FROM subquery (at any depth below) gives it, `*` all of those.
    """

    def __init__(self, sql: str, limit: int) -> None:
        self.sql = sql
        self.limit = limit
        self.root = _nest(_tokenize(sql), len(sql))
        self.ctes: dict[str, list[_Group]] = {}
        self._collect_ctes(self.root)
        self._weights: dict[int, int] = {}
        self._exports: dict[int, dict[str, int]] = {}
        self._visible: dict[int, dict[str, int]] = {}
        self._busy: set[int] = set()

    def _collect_ctes(self, g: _Group) -> None:
        """Every `name [(cols)] AS [NOT] [MATERIALIZED] (SELECT ...)` in the statement, by lower-cased name."""
        items = g.items
        for i, it in enumerate(items):
            if isinstance(it, _Group):
                self._collect_ctes(it)
                continue
            if it.upper != "AS":
                continue
            j = i + 1
            while j < len(items) and _word(items[j]) in ("NOT", "MATERIALIZED"):
                j += 1
            body = items[j] if j < len(items) else None
            k = i - 1
            if k >= 0 and isinstance(items[k], _Group) and not items[k].select:  # type: ignore[union-attr]
                k -= 1
            name = items[k] if k >= 0 else None
            if isinstance(body, _Group) and body.select and isinstance(name, _Tok) and name.kind == "ident":
                self.ctes.setdefault(name.text.lower(), []).append(body)

    def _check(self, w: int) -> int:
        if w > self.limit:
            raise _TooComplex
        return w

    def total(self) -> int:
        return self._scope(self.root)

    def _cte(self, name: str) -> int:
        return max(self._scope(body) for body in self.ctes[name])

    def _scope(self, g: _Group) -> int:
        key = id(g)
        if key in self._weights:
            return self._weights[key]
        if key in self._busy:
            return 1  # a recursive CTE names itself: SQLite does not copy it into itself
        self._busy.add(key)
        try:
            visible = self._from_exports(g)
            items = self._select_items(g)
            own: dict[str, int] = {}
            in_items: set[int] = set()
            total = 0
            for expr, name in items:
                w = self._check(sum(self._weigh(node, visible, {}) for node in expr))
                total += w
                in_items.update(id(node) for node in expr)
                own[name.lower()] = max(own.get(name.lower(), 0), w)
            self._exports[key] = own
            for node in g.items:
                if id(node) not in in_items:
                    total = self._check(total + self._weigh(node, visible, own))
            # Each window with its own PARTITION BY / ORDER BY becomes one more nested subquery that carries
            # every column of the ones before it: the copies grow with the square of their number.
            windows = self._count_over(g)
            total = self._check(total + _WINDOW_WEIGHT * windows * windows)
        finally:
            self._busy.discard(key)
        self._weights[key] = total
        return total

    def _count_over(self, g: _Group) -> int:
        """OVER clauses of this SELECT (not of the SELECTs nested in it)."""
        n = 0
        for node in g.items:
            if isinstance(node, _Group):
                if not node.select:
                    n += self._count_over(node)
            elif node.upper == "OVER":
                n += 1
        return n

    def _weigh(self, node: _Tok | _Group, visible: dict[str, int], own: dict[str, int]) -> int:
        if isinstance(node, _Group):
            if node.select:
                return self._check(1 + self._scope(node))
            return self._check(1 + sum(self._weigh(n, visible, own) for n in node.items))
        if node.kind == "ident":
            name = node.text.lower()
            w = max(1, visible.get(name, 0), own.get(name, 0))
            if name in self.ctes:
                w = max(w, self._cte(name))
            return self._check(w)
        if node.kind == "punct" and node.text == "*":
            return self._check(1 + sum(visible.values()))
        return 1

    def _from_exports(self, g: _Group) -> dict[str, int]:
        """Column names (with the weight of what they stand for) of FROM subqueries and CTEs below `g`."""
        key = id(g)
        if key in self._visible:
            return self._visible[key]
        out: dict[str, int] = {}
        in_from = False
        for node in g.items:
            word = _word(node)
            if word in ("FROM", "JOIN"):
                in_from = True
            elif word in _END_FROM:
                in_from = False
            elif not in_from:
                continue
            elif isinstance(node, _Tok):
                if node.kind == "ident" and node.text.lower() in self.ctes:
                    for body in self.ctes[node.text.lower()]:
                        self._merge(out, body)
            elif node.select:
                self._merge(out, node)
            else:
                for inner in node.items:  # FROM (a JOIN (SELECT ...) b)
                    if isinstance(inner, _Group) and inner.select:
                        self._merge(out, inner)
        self._visible[key] = out
        return out

    def _merge(self, out: dict[str, int], body: _Group) -> None:
        if id(body) in self._busy:
            return
        self._scope(body)
        for source in (self._exports.get(id(body), {}), self._from_exports(body)):
            for name, w in source.items():  # a bare column passes an inner column's weight through
                out[name] = max(out.get(name, 0), w)

    def _select_items(self, g: _Group) -> list[_Item]:
        """(expression, column name) of every result column of every SELECT or VALUES directly in `g`."""
        out: list[_Item] = []
        items = g.items
        i = 0
        while i < len(items):
            word = _word(items[i])
            i += 1
            if word == "SELECT":
                if _word(items[i] if i < len(items) else None) in ("DISTINCT", "ALL"):
                    i += 1
                expr: list[_Tok | _Group] = []
                while i < len(items) and _word(items[i]) not in _CLAUSE_WORDS:
                    if _is_punct(items[i], ","):
                        if expr:
                            out.append(self._item(expr))
                        expr = []
                    else:
                        expr.append(items[i])
                    i += 1
                if expr:
                    out.append(self._item(expr))
            elif word == "VALUES":
                while i < len(items) and isinstance(items[i], _Group):
                    row = items[i]
                    assert isinstance(row, _Group)
                    col, expr = 1, []
                    for cell in [*row.items, None]:
                        if cell is None or _is_punct(cell, ","):
                            out.append((expr, f"column{col}"))
                            col, expr = col + 1, []
                        else:
                            expr.append(cell)
                    i += 1
                    if i < len(items) and _is_punct(items[i], ","):
                        i += 1
        return out

    def _item(self, expr: list[_Tok | _Group]) -> _Item:
        """A result column's expression and the name SQLite gives it (alias, column name, or its text)."""
        last = expr[-1]
        if isinstance(last, _Tok) and last.kind == "ident":
            before = expr[-2] if len(expr) >= 2 else None
            if len(expr) >= 3 and _word(before) == "AS":
                return expr[:-2], last.text
            if len(expr) == 1 or (len(expr) == 3 and _is_punct(before, ".")):
                return expr, last.text  # col, t.col
            implicit_alias = last.upper not in _KEYWORDS and (
                isinstance(before, _Group)
                or (
                    isinstance(before, _Tok)
                    and before.kind in ("ident", "string", "number")
                    and _word(before) not in _KEYWORDS
                )
            )
            if implicit_alias:
                return expr[:-1], last.text
        first = expr[0]
        return expr, self.sql[first.start : last.end]


def expansion_estimate(sql: str, limit: int = MAX_EXPANSION) -> int | None:
    """Terms SQLite would handle preparing `sql`, every copy counted (an over-estimate); None above `limit`."""
    try:
        return _Expansion(sql, limit).total()
    except _TooComplex:
        return None
    except RecursionError:
        return None
