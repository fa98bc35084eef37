"""The C++ kernel's first build says so, and a failed build warns with the cause and the fix."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_failed_build_prints_that_it_compiles_then_warns_with_the_cause_and_the_fix(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-compiler")}
    env.pop("SRIGL_DISABLE_EXTENSION", None)
    code = "from srigl.kernels import cpu; print('available', cpu.available()); print('error', bool(cpu.load_error()))"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "available False" in result.stdout and "error True" in result.stdout
    assert "srigl: compiling the C++ fan-in kernel for this CPU" in result.stderr
    assert "RuntimeWarning: srigl: the C++ fan-in kernel could not be built" in result.stderr
    assert "pip install ninja" in result.stderr and "SRIGL_DISABLE_EXTENSION=1" in result.stderr
