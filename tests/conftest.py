"""Shared fixtures: the real nats-server harness (tests/nats_fixtures.py) for every test module."""

from __future__ import annotations

from tests.nats_fixtures import nats_server

__all__ = ["nats_server"]
