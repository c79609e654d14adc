"""Credentials for tests with auth on, made by the real `replicator auth` command, and a sync bridge.

`make_credentials(data_dir, agents)` runs `replicator auth add-agent` for each agent and `add-operator ops`,
and returns every API token (by agent id, and "ops") and each agent's nkey seed file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from tests.support.htpc import run_cli


def printed_token(output: str) -> str:
    """The token `replicator auth add-agent/add-operator` printed (the last word of its last line)."""
    return output.strip().splitlines()[-1].rsplit(" ", 1)[-1]


def make_credentials(
    data_dir: Path, agents: Iterable[str], operators: Iterable[str] = ("ops",)
) -> tuple[dict[str, str], dict[str, Path]]:
    """(API tokens by agent id and operator name, nkey seed files by agent id) under `data_dir/auth`."""
    tokens: dict[str, str] = {}
    seeds: dict[str, Path] = {}
    for agent in agents:
        out = run_cli("auth", "--data-dir", str(data_dir), "add-agent", agent)
        assert out.returncode == 0, out.stderr
        tokens[agent] = printed_token(out.stdout)
        seeds[agent] = data_dir / "auth" / "agents" / f"{agent}.nk"
    for name in operators:
        out = run_cli("auth", "--data-dir", str(data_dir), "add-operator", name)
        assert out.returncode == 0, out.stderr
        tokens[name] = printed_token(out.stdout)
    return tokens, seeds


def run_in_thread(coro_factory: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60.0) -> None:
    """Run a coroutine to completion on a private event loop (module fixtures are sync)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro_factory())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=timeout)
    assert not thread.is_alive(), f"did not finish in {timeout:g} s"
    if errors:
        raise errors[0]
