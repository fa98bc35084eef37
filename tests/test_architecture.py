"""The package's shape, checked from its source: no import cycle, a torch-only core, one engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import srigl

SRC = Path(__file__).resolve().parents[1] / "src"

# The core: what `import srigl` loads. It may import the standard library, torch and itself only.
CORE = {
    "srigl", "srigl.ablation", "srigl.algorithms", "srigl.blockwise", "srigl.distributed", "srigl.distributions", "srigl.errors",
    "srigl.initial", "srigl.masks", "srigl.orientation", "srigl.schedules", "srigl.selection", "srigl.sparsifier", "srigl.storage",
    "srigl.storage.masked", "srigl.structures", "srigl.summary", "srigl.state", "srigl.guards",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _runtime_nodes(node: ast.AST):
    """Every node below ``node`` but those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def _imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    """``srigl`` modules imported: ``from srigl.x import sub`` is an edge to the submodule ``sub``."""
    nodes = tree.body if top_level_only else list(_runtime_nodes(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "srigl":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if _is_module(n)}
            if not all(_is_module(n) for n in names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "srigl"}
    return found


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    graph = {}
    for path in SRC.joinpath("srigl").rglob("*.py"):
        name = _module_name(path)
        graph[name] = _imports(ast.parse(path.read_text()), top_level_only) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle reached by a depth-first walk (enough to say whether there is one)."""
    cycles, done = [], set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done and nxt in graph:
                walk(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from srigl import sparsifier\n"
                     "def f():\n    from srigl import masks\n")
    assert _imports(tree, top_level_only=False) == {"srigl.masks"}


def test_no_import_cycles_even_through_lazy_imports():
    graph = _graph()
    assert "srigl.sparsifier" in graph and "srigl.storage.compact" in graph
    assert _cycles(graph) == []


def test_the_core_imports_only_the_standard_library_torch_and_itself():
    allowed_roots = {"__future__", "torch", "srigl", *sys.stdlib_module_names}
    for path in SRC.joinpath("srigl").rglob("*.py"):
        name = _module_name(path)
        if name not in CORE:
            continue
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        roots |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert roots <= allowed_roots, f"{name} imports {sorted(roots - allowed_roots)} at module level"
        outside = _imports(tree, top_level_only=True) - CORE
        assert not outside, f"core module {name} imports {sorted(outside)} at module level"


def test_import_srigl_loads_no_extra_no_app_and_no_integration():
    code = (
        "import sys, srigl; "
        "bad = sorted(m for m in sys.modules if m.startswith(('srigl.app', 'srigl.condensed', 'srigl.kernels', "
        "'srigl.io', 'srigl.storage.compact', 'srigl.integrations'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_one_engine_compact_is_a_storage_not_a_class():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, optimizer, sparsity=0.5, total_steps=10, compact=True)
    assert type(sp) is srigl.SRigL and sp.storage == "compact"
    assert srigl.SRigL.__new__ is object.__new__  # no dispatch to another class
    assert {type(layer).__name__ for layer in sp.layers} == {"CompactParam"}
    other = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    masked = srigl.SRigL(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    assert type(masked) is srigl.SRigL and masked.storage == "masked"
    assert {type(layer).__name__ for layer in masked.layers} == {"MaskedParam"}


def test_the_old_compact_class_name_says_where_compact_training_went():
    with pytest.raises(AttributeError, match=r"srigl.SRigL\(model, optimizer, ..., compact=True\)"):
        srigl.CompactSRigL  # noqa: B018
    assert srigl.CompactMultiheadAttention is srigl.CondensedMultiheadAttention
