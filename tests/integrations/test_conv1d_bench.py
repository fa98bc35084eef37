"""Smoke test: benchmarks/conv1d_update.py --quick runs on narrow layers, checks that the Conv1D and
nn.Linear models reach transposed masks, and writes its table (the timings are not tested)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "conv1d_update.py"


def test_conv1d_update_quick_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("conv1d_update", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "conv1d.md"
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "x |" in line]
    assert rows == ["dense step", "masked step", "update step"]
    assert "transposes of each other: **yes**" in text
