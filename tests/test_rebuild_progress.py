"""rebuild's progress is counted in stream positions: it never shows more done than the total (the stream may grow
while rebuild runs, and a redelivered message is not a new one), and where to resume after a snapshot is stated
plainly when the stream no longer holds what follows it."""

from __future__ import annotations

import io
import sys

import pytest

from replicator import rebuild
from replicator.rebuild import Progress, replay_start


def _numbers(line: str) -> tuple[int, int]:
    done, total = line.split(": ", 1)[1].split(" ", 1)[0].split("/")
    return int(done), int(total)


def test_progress_never_passes_its_total() -> None:
    progress = Progress(1, 751, out=False)
    progress.update(500, 500)
    assert _numbers(progress.line()) == (500, 751)
    progress.update(500, 40)  # redeliveries (naks of a gap): no new position
    assert _numbers(progress.line()) == (500, 751)
    progress.update(752, 252)  # the stream grew while rebuilding: the total follows
    done, total = _numbers(progress.line())
    assert (done, total) == (752, 752) and "100.0%" in progress.line()
    assert progress.messages == 792


def test_progress_from_a_snapshot_counts_only_what_is_replayed() -> None:
    progress = Progress(701, 751, out=False)
    assert _numbers(progress.line()) == (0, 51)
    progress.update(751, 51)
    assert _numbers(progress.line()) == (51, 51)
    nothing = Progress(752, 751, out=False)  # the snapshot covers the whole stream
    assert _numbers(nothing.line()) == (0, 0) and "100.0%" in nothing.line()


def test_replay_start() -> None:
    assert replay_start(700, 1, 751, "snapshot s") == (701, [])
    start, notes = replay_start(700, 731, 751, "snapshot s")  # retention trimmed below the snapshot
    assert start == 701 and len(notes) == 1 and "701..730 aged out" in notes[0] and "resyncs" in notes[0]
    start, notes = replay_start(900, 1, 751, "backup b")  # not this stream (recreated): read all of it
    assert start == 1 and "not the stream this was taken from" in notes[0]
    assert replay_start(0, 0, 0, "snapshot s") == (1, [])  # an empty stream


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_piped_prints_plain_lines_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, err = _Clock(), io.StringIO()
    monkeypatch.setattr(rebuild, "time", clock)
    monkeypatch.setattr(sys, "stderr", err)
    progress = Progress(1, 1000)
    for n in range(1, 101):  # 100 batches, 1 s apart: a line every PIPE_EVERY_S
        clock.now += 1.0
        progress.update(n * 10, 10)
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()
    lines = err.getvalue().splitlines()
    assert len(lines) == int(100 // Progress.PIPE_EVERY_S)
    assert [_numbers(line)[0] for line in lines] == [n * 10 for n in range(10, 101, 10)]
    assert progress.end_line() == ""


def test_progress_on_a_terminal_redraws_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, err = _Clock(), _Terminal()
    monkeypatch.setattr(rebuild, "time", clock)
    monkeypatch.setattr(sys, "stderr", err)
    progress = Progress(1, 1000)
    for n in range(1, 11):
        clock.now += 1.0
        progress.update(n * 100, 100)
    assert "\n" not in err.getvalue() and err.getvalue().count("\r") == 10
    assert progress.end_line() == "\r\x1b[K"
