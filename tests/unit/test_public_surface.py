"""The package roots are the contracts: the replicator reaches agent_client only through its `__all__`."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import agent_client

ROOT = Path(__file__).resolve().parents[2]


def _imports(package: str) -> list[tuple[str, int, str, list[str]]]:
    out = []
    for path in sorted((ROOT / package).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((path.name, node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out.extend((path.name, node.lineno, a.name, []) for a in node.names)
    return out


def test_replicator_imports_only_the_agent_client_root() -> None:
    offending = [
        f"replicator/{name}:{line}: {module}"
        for name, line, module, _names in _imports("replicator")
        if module.startswith("agent_client.")
    ]
    assert offending == [], "the replicator must import `from agent_client import X` only"


def test_replicator_uses_only_names_agent_client_exports() -> None:
    used = {
        (name, line, imported)
        for name, line, module, names in _imports("replicator")
        if module == "agent_client"
        for imported in names
    }
    assert used, "the replicator is expected to use agent_client's protocol surface"
    unknown = sorted(f"replicator/{n}:{line}: {imp}" for n, line, imp in used if imp not in agent_client.__all__)
    assert unknown == []


def test_agent_client_never_imports_the_replicator() -> None:
    assert [m for _n, _l, m, _ in _imports("agent_client") if m.split(".")[0] == "replicator"] == []


@pytest.mark.parametrize("package", ["agent_client", "replicator"])
def test_every_exported_name_exists(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)
