"""Every script in examples/ runs at its tiny size (SRIGL_EXAMPLE_TINY=1) and prints what it checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# What each example must print: a line whose value could be wrong, not just "done".
EXPECTED = {
    "own_model.py": "condensed vs masked max |diff|",
    "lightning_callback.py": "layer 0 zero fraction",
    "hf_trainer.py": "encoder FFN zero fraction",
    "pretrained_to_onnx.py": "onnxruntime vs torch max |diff|",
}


def test_every_example_has_an_expected_output():
    assert {path.name for path in EXAMPLES} == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_at_tiny_size(path, tmp_path):
    env = {**os.environ, "SRIGL_EXAMPLE_TINY": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=180)  # ONNX export alone takes ~30 s of CPU
    assert done.returncode == 0, done.stderr[-2000:]
    assert EXPECTED[path.name] in done.stdout
