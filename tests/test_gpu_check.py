"""The GPU check script keeps working while no GPU is lent: its CPU dry run runs here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_correctness_then_writes_every_section(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = out.read_text()
    assert "CPU (dry run: figures mean nothing)" in text
    # Correctness comes first, and each check reports a number.
    assert text.index("## Correctness") < text.index("## Condensed layer")
    assert "fan-in product (" in text and "condensed ViT vs masked dense twin: max abs error" in text
    assert "compact vs masked update step: 0 of" in text
    for section in ("## Condensed layer 96 -> 48", "## End to end: ViT", "## Training step", "## Anchors"):
        assert section in text, section
    assert "| float32 | 1 |" in text and "| compact |" in text
    assert "not run" not in text  # on the CPU every row of the dry run must run


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the no-GPU refusal cannot happen")
def test_gpu_check_without_a_gpu_refuses_and_says_how_to_dry_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--dry-run" in result.stderr
