"""Shared fixtures: the real nats-server harness (tests/nats_fixtures.py) for every test module.

Under CI (CI=true) hypothesis runs derandomized, so a red build can be replayed exactly; locally it
explores new examples on every run.
"""

from __future__ import annotations

import os

from hypothesis import settings

from tests.nats_fixtures import nats_server

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

__all__ = ["nats_server"]
