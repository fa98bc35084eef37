"""Smoke test: benchmarks/extreme_output.py --quick runs every column and writes its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "extreme_output.py"


@pytest.mark.slow
def test_extreme_output_quick_writes_every_configuration(tmp_path):
    out = tmp_path / "xo.md"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=True, capture_output=True,
                   timeout=600)
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and " s |" in line]
    assert rows[:3] == ["dense", "compact", "masked"]
    assert rows[3:] == ["srigl", "set", "static", "srigl", "set"]  # three growths at the prior bias, two at 0
    assert "failed" not in text
    assert "peak RSS" in text and "P@1" in text
