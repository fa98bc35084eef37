"""Smoke tests: benchmarks/real_models.py --quick runs on tiny models and writes its tables and analysis."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_models.py"


def _module():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_real_models_quick_writes_a_table_per_model(tmp_path):
    out = tmp_path / "real.md"
    _module().main(["--quick", "--threads", "1", "--batches", "1", "--dtypes", "fp32", "--out", str(out)])
    text = out.read_text()
    for name in ("vit-b16", "resnet50", "gpt2-small", "gpt2-small-sparse-head"):
        assert f"## {name}\n" in text
        rows = [line for line in text.split(f"## {name}\n")[1].split("##")[0].splitlines()
                if line.startswith("| fp32 | 1 | 90% |")]
        assert len(rows) == 2, rows  # one latency row and one memory row
        assert "×" in rows[0]  # the condensed-vs-dense ratio was computed
    assert "Profile, condensed vit-b16 at 90%" in text and "condensed linears" in text
    # The summary has one row per (model, sparsity) and one column per (dtype, batch) measured.
    summary = text.split("## Summary: speedup of condensed over dense\n")[1].split("##")[0]
    assert "| model | sparsity | fp32 b1 |\n" in summary
    assert summary.count("| 90% | ") == 4 and "| vit-b16 | 90% | " in summary and "×" in summary
    # The two decoders are told apart: only the untied one has a sparse head, and each says what its head is.
    assert "lm_head: tied to the token embedding" in text.split("## gpt2-small\n")[1].split("##")[0]
    sparse_head = text.split("## gpt2-small-sparse-head\n")[1].split("##")[0]
    assert "lm_head: untied and sparsified" in sparse_head and "sparse lm_head at fan-in" in sparse_head
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    assert {(r["model"], r["column"]) for r in records} == {
        (m, c) for m in ("vit-b16", "resnet50", "gpt2-small", "gpt2-small-sparse-head")
        for c in ("dense-eager", "condensed-eager")}
    assert all(r["ms"] > 0 and r["quick"] for r in records)


@pytest.mark.slow
def test_real_models_quick_compile_and_ort_columns_for_the_decoder(tmp_path):
    out = tmp_path / "real.md"
    _module().main(["--quick", "--threads", "1", "--models", "gpt2-small-sparse-head", "--batches", "1",
                    "--dtypes", "fp32",
                    "--columns", "condensed-compile", "condensed-ort", "condensed-ort-gather", "dense-ort", "--no-profile",
                    "--out", str(out)])
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    assert sorted(r["column"] for r in records) == ["condensed-compile", "condensed-ort", "condensed-ort-gather", "dense-ort"]
    lines = out.read_text().splitlines()
    row = next(line for line in lines if line.startswith("| fp32 | 1 | 90% |"))
    assert row.split("|")[-2].strip().endswith("×")  # best condensed vs dense ORT
    # The two export layouts side by side, both against dense ORT, in their own table (not the main one).
    assert len(row.split("|")) == 3 + 6 + 3 + 2
    layouts = next(line for line in lines if line.startswith("| 1 | 90% |"))
    cells = [c.strip() for c in layouts.split("|")[1:-1]]
    assert len(cells) == 9 and cells[5].endswith("×") and cells[6].endswith("×"), cells
    gather = next(r for r in records if r["column"] == "condensed-ort-gather")
    assert float(cells[4]) == pytest.approx(gather["ms"], abs=0.01)


def test_interleaved_medians_and_merge_keep_other_runs(tmp_path):
    module = _module()
    calls = {"a": lambda: sum(range(100)), "b": lambda: sum(range(10_000))}
    medians = module.interleaved_ms(calls, repeats=3, min_sample_s=0.001)
    assert medians["b"] > medians["a"] > 0
    path = tmp_path / "r.json"
    old = {"model": "vit-b16", "sparsity": 0.9, "dtype": "fp32", "batch": 8, "column": "condensed-eager", "ms": 2.0,
           "run": "old", "quick": True, "peak_bytes": None}
    stats = {"sparse_layers": 1, "active_neurons": 2, "neurons": 4, "weights_dense": 8, "weights_condensed": 1}
    path.write_text(json.dumps({"quick": True, "records": [old, {**old, "batch": 1}], "stats": {"vit-b16": {"0.9": stats}},
                                "profiles": {}}))
    merged, merged_stats, _ = module.merge(path, [{**old, "batch": 1, "ms": 1.0, "run": "new"}], {}, {})
    assert sorted((r["batch"], r["ms"], r["run"]) for r in merged) == [(1, 1.0, "new"), (8, 2.0, "old")]
    assert merged_stats == {"vit-b16": {0.9: stats}}  # kept for the tables of models this run did not measure
    # The markdown comes back from the JSON alone, and a ratio across runs is marked †.
    dense = {**old, "sparsity": None, "column": "dense-eager", "ms": 4.0, "run": "other"}
    text = "\n".join(module.model_tables("vit-b16", merged + [dense], merged_stats["vit-b16"]))
    assert "| fp32 | 8 | 90% | 4.00 |" in text and "2.00×†" in text


def test_profile_counts_a_condensed_layers_aten_work_as_condensed():
    """The dense route runs densify + torch.mm inside a CondensedLinear: condensed time, not a dense layer's."""
    import torch
    from torch import nn

    from srigl.condensed import CondensedLinear
    from srigl.kernels.dense_route import dense_route_pays

    linear = nn.Linear(64, 48)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[:, :40] = True  # density 0.62: 256 rows take the dense route
    with torch.no_grad():
        linear.weight.mul_(mask)
    model = nn.Sequential(CondensedLinear.from_dense(linear, mask), nn.Linear(48, 8))
    assert dense_route_pays(256, 40, 64, torch.float32)
    shares, _ = _module().profile_shares("probe", model, (torch.randn(256, 64),))
    assert shares["condensed linears"] > 0.3  # densify, the GEMM and the layer's scope
    assert shares["dense linears/convs"] > 0  # the plain nn.Linear after it is still dense
    assert not any(hasattr(m, "_profile_scope") for m in model.modules())  # hooks removed, scopes closed
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


@pytest.mark.slow
def test_profile_only_rewrites_the_analysis_without_timing_columns(tmp_path):
    out = tmp_path / "real.md"
    module = _module()
    module.main(["--quick", "--threads", "1", "--models", "vit-b16", "--batches", "1", "--dtypes", "fp32",
                 "--no-profile", "--out", str(out)])
    assert "Profile, condensed vit-b16" not in out.read_text()
    before = json.loads(out.with_suffix(".json").read_text())["records"]
    module.main(["--quick", "--threads", "1", "--models", "vit-b16", "--profile-only", "--out", str(out)])
    assert "Profile, condensed vit-b16 at 90%" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["records"] == before  # nothing re-timed
