"""Pytest fixtures for the NATS harness; tests/conftest.py imports them from here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nats_server import NatsServer, start_nats_server

__all__ = ["nats_server"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh JetStream server per test, so kill/restart tests cannot leak state into each other."""
    server = start_nats_server(tmp_path / "jetstream")
    try:
        yield server
    finally:
        server.close()
