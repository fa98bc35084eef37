"""Smoke test: benchmarks/real_models.py --quick runs on tiny models and writes its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_models.py"


@pytest.mark.slow
def test_real_models_quick_writes_a_row_per_model(tmp_path):
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "real.md"
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "×" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["vit-b16", "resnet50", "gpt2-small"]
