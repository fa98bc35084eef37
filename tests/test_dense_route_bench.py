"""Smoke test: benchmarks/dense_route.py --quick times both routes and marks the rule's picks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import srigl.kernels as kernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_route.py"


def test_dense_route_quick_writes_its_grid(tmp_path):
    if not kernels.cpu_extension_available():
        pytest.skip("the benchmark compares the C++ kernel routes")
    spec = importlib.util.spec_from_file_location("dense_route_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "dense.md"
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    table = text.split("## fp32, 64 inputs, 24 active rows\n")[1].split("##")[0]
    assert "| density | batch 16 | batch 128 |" in table
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| 0.") or line.startswith("| 1.")}
    assert set(rows) == {"| 0.20", "| 1.00"}
    # The rule marks exactly the cell it routes densely: 128 rows at density 1.0 (0.2 is below fp32's 0.4).
    assert rows["| 1.00"].endswith("* |") and "*" not in rows["| 0.20"] and rows["| 1.00"].count("*") == 1
    assert "cells where the rule's route is more than 10 % slower" in text
