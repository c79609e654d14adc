"""Log lines are logfmt: one line per record whatever the message holds, fields that parse back exactly."""

from __future__ import annotations

import io
import logging
import shlex
import sys
from collections.abc import Iterator

import pytest

from replicator.log_format import LogfmtFormatter, setup_logging


def parse(line: str) -> dict[str, str]:
    """A logfmt line as its fields (values unquoted; the formatter escapes newlines as `\\n`)."""
    fields = {}
    for token in shlex.split(line):
        key, _, value = token.partition("=")
        fields[key] = value.replace("\\n", "\n")
    return fields


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("replicator.test-log-format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_one_line_per_record_with_fields_that_parse_back(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = captured
    nasty = 'agent "a-1" said:\nline two = yes'
    log.info("plain")
    log.warning("%s", nasty, extra={"agent": "a-1", "lag": 3, "color_message": "\x1b[1mplain\x1b[0m"})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines

    first, second, third = (parse(line) for line in lines)
    assert list(first) == ["ts", "level", "logger", "msg"]
    assert first["level"] == "info" and first["logger"] == log.name and first["msg"] == "plain"
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-01-31T12:00:00Z")
    del second["ts"]
    assert second == {"level": "warning", "logger": log.name, "msg": nasty, "agent": "a-1", "lag": "3"}
    assert third["level"] == "error" and third["msg"] == "failed"
    assert third["exc_info"].startswith("Traceback") and "ValueError: bad\nvalue" in third["exc_info"]


def test_the_record_is_left_as_it_was(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, _out = captured
    seen: list[str] = []

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.levelname)

    remember = Remember()
    log.addHandler(remember)
    log.warning("x")
    log.removeHandler(remember)
    assert seen == ["WARNING"]  # other handlers still see the standard level name


def test_setup_logging_sends_every_logger_to_stderr_at_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        setup_logging("warning")
        logging.getLogger("replicator.x").info("quiet")
        logging.getLogger("nats.y").warning("heard")
        setup_logging("no-such-level")
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = err.getvalue().splitlines()
    assert [parse(line)["msg"] for line in lines] == ["heard"]
    assert parse(lines[0])["logger"] == "nats.y"
