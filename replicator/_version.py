"""The installed package's version (a checkout that is not installed reports 0.0.0+local)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("commander-replicator")
except importlib.metadata.PackageNotFoundError:  # running from a checkout
    __version__ = "0.0.0+local"
