"""Shared fixtures: real nats-server and HTPC processes (the harness is in tests/support/).

* `nats_server`: a fresh JetStream server per test, so kill/restart tests cannot leak state into each other.
* `htpc_factory`: builds HtpcProcess objects under the test's tmp_path; all are closed at teardown.
* `htpc`: one running HTPC on the test's own `nats_server`.
* `module_nats` / `module_htpc`: one nats-server and one HTPC shared by a whole module (for tests that only
  need distinct agent ids, this saves a process start per test).

Under CI (CI=true) hypothesis runs derandomized, so a red build can be replayed exactly; locally it
explores new examples on every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.support.htpc import HtpcProcess
from tests.support.nats_cluster import NatsCluster
from tests.support.nats_server import NatsServer, start_nats_server

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh JetStream server per test."""
    server = start_nats_server(tmp_path / "jetstream")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="htpc_factory")
def htpc_factory_fixture(tmp_path: Path) -> Iterator[Callable[..., HtpcProcess]]:
    """`make(nats_url, name="htpc", **kw)` -> a not-yet-started HtpcProcess under tmp_path; closed at teardown."""
    made: list[HtpcProcess] = []

    def make(nats_url: str | None, name: str = "htpc", **kwargs: Any) -> HtpcProcess:
        proc = HtpcProcess(tmp_path / name, nats_url, **kwargs)
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            proc.close()


@pytest.fixture(name="htpc")
def htpc_fixture(nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]) -> HtpcProcess:
    """A running HTPC on this test's own nats-server."""
    proc = htpc_factory(nats_server.url)
    proc.start()
    return proc


@pytest.fixture(scope="module", name="module_nats")
def module_nats_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path_factory.mktemp("module-nats") / "jetstream")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", name="module_htpc")
def module_htpc_fixture(module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HtpcProcess]:
    proc = HtpcProcess(tmp_path_factory.mktemp("module-htpc") / "htpc", module_nats.url)
    proc.start()
    try:
        yield proc
        proc.stop()
    finally:
        proc.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node NATS cluster from deploy/nats/cluster/ on free loopback ports (tests/support/nats_cluster.py)."""
    c = NatsCluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.close()
