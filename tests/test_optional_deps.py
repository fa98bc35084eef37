"""A missing optional package reads as one named error naming the pip extra, for every extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from srigl._optional import PACKAGES, require
from srigl.errors import MissingDependencyError


@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_require_names_the_extra_when_the_package_is_missing(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    distribution, extra = PACKAGES[module]
    with pytest.raises(MissingDependencyError, match=rf"needs {distribution}: pip install 'srigl\[{extra}\]'"):
        require(module, "this feature")


def test_require_returns_the_module_when_installed():
    assert require("json", "x").dumps([1]) == "[1]"


# Each integration imported in a fresh interpreter whose import of its framework fails.
_IMPORT_BLOCKED = (
    "import sys; sys.modules[{blocked!r}] = None\n"
    "from srigl.errors import MissingDependencyError\n"
    "try:\n    import {module}\n"
    "except MissingDependencyError as error:\n    print(error)\n"
)


@pytest.mark.parametrize(
    "module, blocked, extra",
    [
        ("srigl.integrations.huggingface", "transformers", "integrations"),
        ("srigl.integrations.lightning", "lightning", "integrations"),
    ],
)
def test_integrations_report_a_missing_framework_in_one_line(module, blocked, extra):
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_BLOCKED.format(blocked=blocked, module=module)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"pip install 'srigl[{extra}]'" in done.stdout
    assert "Traceback" not in done.stderr


def test_cli_train_without_tqdm_prints_one_line_and_exits_nonzero(monkeypatch, capsys):
    from srigl.app import run_common

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(MissingDependencyError, match=r"needs tqdm: pip install 'srigl\[app\]'"):
        run_common.progress([1, 2], enabled=True)
