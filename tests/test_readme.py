"""The README's bad-input table is the generated one (docs/bad_inputs.md), not a stale copy, and its
Python API example runs as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import srigl

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> str:
    start = text.index("| input |")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_readme_bad_input_table_matches_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    generated = (ROOT / "docs" / "bad_inputs.md").read_text()
    assert _table(readme) == _table(generated)
    assert len(_table(readme).splitlines()) > 20


def test_readme_python_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "srigl.SRigL(" in code  # the example, not the compact one-liner below it
    # The one name the example leaves to the reader: a few Fashion-MNIST-shaped batches.
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator))
              for _ in range(3)]
    namespace = {"loader": loader}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), namespace)
    sparsifier = namespace["sparsifier"]
    assert "fc1.weight" in printed.getvalue()  # the summary table was printed
    assert abs(sparsifier.global_sparsity() - 0.9) < 0.01
    for name, mask in sparsifier.masks().items():
        assert not namespace["model"].get_parameter(name)[~mask].any(), name


def test_every_example_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"examples/([\w.]+\.py)", readme))
    assert named, "the README points to no example"
    assert all((ROOT / "examples" / name).is_file() for name in named), named


@pytest.mark.slow
def test_readme_extreme_output_head_example_builds_only_values_and_indices():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Extreme output layers**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"torch": torch, "srigl": srigl, "features": torch.nn.Linear(10, 768)}
    exec(code, namespace)
    head = namespace["model"][1]
    assert isinstance(head, srigl.CondensedLinear) and head.values.shape == (670_091, 32)
    stored = head.values.numel() * 4 + head.indices.numel() * head.indices.element_size()
    assert round(stored / 1e9, 2) == 0.13  # what the README's comment says
    assert not any(p.is_meta for p in namespace["model"].parameters())
