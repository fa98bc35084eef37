"""The built wheel installs into a clean virtualenv with core dependencies only and works there.

No importorskip: on CI this must run. It builds the wheel without build isolation (setuptools is in
the test environment), installs this environment's torch explicitly (the pinned CPU wheel on CI, so
pyproject's range cannot pull a CUDA build) and runs tests/wheel_smoke.py in the fresh environment.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=180):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_with_core_dependencies_and_trains_condenses_runs(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
         cwd=tmp_path)
    (wheel,) = wheels.glob("srigl-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    # The same torch as this environment's: the local wheel of that exact build for this Python if there is
    # one (the disk holds a cp311 "+cpu" one only), else that version as the index names it (PyPI's CUDA
    # torch says "2.13.0+cu130" at run time but is "2.13.0" to pip).
    version = importlib.metadata.version("torch")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    local = sorted(glob.glob(f"/opt/wheels/torch-{version}-{tag}-{tag}-*.whl"))
    torch_requirement = local[0] if local else f"torch=={version}"
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", torch_requirement, wheel],
         cwd=tmp_path, timeout=300)
    out = _run([python, ROOT / "tests" / "wheel_smoke.py", torch.__version__], cwd=tmp_path)
    assert "wheel smoke ok" in out
    assert f"torch {torch.__version__}" in out  # the pinned CPU build, not one pip chose
