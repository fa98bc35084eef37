"""The built wheel installs into a clean virtualenv with core dependencies only and works there.

No importorskip: on CI this must run. It builds the wheel without build isolation (setuptools is in
the test environment), installs the pinned CPU torch wheel explicitly (so pyproject's range cannot
pull a CUDA build) and runs tests/wheel_smoke.py in the fresh environment.
"""

from __future__ import annotations

import glob
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
    # The same torch as this environment's: the local CPU wheel if there is one, else that exact version.
    version = torch.__version__.split("+")[0]
    local = sorted(glob.glob(f"/opt/wheels/torch-{version}*.whl"))
    torch_requirement = local[0] if local else f"torch=={torch.__version__}"
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", torch_requirement, wheel],
         cwd=tmp_path, timeout=300)
    out = _run([python, ROOT / "tests" / "wheel_smoke.py"], cwd=tmp_path)
    assert "wheel smoke ok" in out
    assert f"torch {torch.__version__}" in out  # the pinned CPU build, not one pip chose
