"""The application sits on top of the library: no module outside ``srigl.app`` imports it, importing
the library loads none of it, and each app module stays one concept (at most ~600 lines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "srigl"
APP = SRC / "app"
# python -m srigl (__main__.py) is the command line's entry point, not a library module.
CORE_MODULES = sorted(p for p in SRC.rglob("*.py") if APP not in p.parents and p.name != "__main__.py")
APP_IMPORT = re.compile(r"^\s*(from\s+srigl\.app\b|import\s+srigl\.app\b|from\s+srigl\s+import\s+.*\bapp\b)", re.M)


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_library_modules_do_not_import_the_app(path):
    assert not APP_IMPORT.search(path.read_text()), f"{path.relative_to(SRC)} imports srigl.app"


def test_importing_the_library_loads_no_app_module():
    names = [p.relative_to(SRC.parent).with_suffix("").as_posix().replace("/", ".") for p in CORE_MODULES]
    names = [n.removesuffix(".__init__") for n in names]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ImportError:\n        pass  # an optional backend (triton) that is not installed\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('srigl.app'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("path", sorted(APP.rglob("*.py")), ids=lambda p: str(p.relative_to(APP)))
def test_app_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 600, f"{path.relative_to(SRC)} has {lines} lines; split it by concept"
