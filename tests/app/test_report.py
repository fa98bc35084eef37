"""``srigl report`` on synthetic summary.json files: grouping, mean ± sample std by hand, the
markdown, the plots, and the errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl.app.cli import main
from srigl.app.report import ReportError, aggregate, load_runs, mean_std, write_report


def fake_run(root: Path, model: str, method: str, sparsity: float, seed: int, acc: float, active: float,
             gamma_sal: float | None = None, data: str = "fashion-mnist") -> Path:
    """A run folder with the parts of summary.json the report reads."""
    label = method if method != "srigl" else ("srigl (no ablation)" if not gamma_sal else f"srigl (γ_sal={gamma_sal:g})")
    path = root / f"{model}-{method}-{gamma_sal}-{sparsity}-{seed}"
    path.mkdir(parents=True)
    summary = {
        "label": label,
        "config": {"data": data, "model": model, "method": method, "sparsity": sparsity, "seed": seed,
                   "gamma_sal": gamma_sal},
        "final": {"test_acc": acc, "active_neuron_fraction": active},
        "layers": {
            "fc1.weight": {"shape": [4, 6], "sparse": True, "fan_in_counts": [2, 0, 2, 2], "neurons": 4},
            "fc.weight": {"shape": [2, 4], "sparse": True, "fan_in_counts": [3, 1], "neurons": 2},
        },
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_mean_std_golden():
    # 80, 82, 84: mean 82, squared deviations 4 + 0 + 4 = 8, / (3 - 1) = 4 -> std 2.
    assert mean_std([80.0, 82.0, 84.0]) == (82.0, 2.0)
    assert mean_std([91.5]) == (91.5, 0.0)
    with pytest.raises(ReportError):
        mean_std([])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=8))
def test_mean_std_matches_statistics(values):
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-7)


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, (acc, active) in enumerate([(0.80, 0.50), (0.82, 0.60), (0.84, 0.70)]):
        fake_run(root, "mlp", "rigl", 0.99, seed, acc, active)
    for seed, acc in enumerate([0.70, 0.74]):
        fake_run(root, "mlp", "srigl", 0.99, seed, acc, 1.0, gamma_sal=0.0)
    fake_run(root, "mlp", "srigl", 0.99, 0, 0.79, 0.9, gamma_sal=0.3)
    fake_run(root, "mlp", "dense", 0.0, 0, 0.89, 1.0)
    fake_run(root, "lenet5", "rigl", 0.9, 0, 0.88, 0.95)
    return root


def test_aggregate_groups_by_method_variant_and_sparsity(study):
    cells = {(c.model, c.label, c.sparsity): c for c in aggregate(load_runs([study]))}
    assert len(cells) == 5
    rigl = cells[("mlp", "rigl", 0.99)]
    assert (rigl.n, rigl.acc_mean, rigl.acc_std) == (3, pytest.approx(82.0), pytest.approx(2.0))
    assert (rigl.active_mean, rigl.active_std) == (pytest.approx(60.0), pytest.approx(10.0))
    assert rigl.seeds == (0, 1, 2)
    off = cells[("mlp", "srigl (no ablation)", 0.99)]
    # 70 and 74: mean 72, std sqrt((4 + 4) / 1) = 2.828...
    assert (off.n, off.acc_mean, off.acc_std) == (2, pytest.approx(72.0), pytest.approx(8**0.5))
    assert cells[("mlp", "srigl (γ_sal=0.3)", 0.99)].n == 1


def test_write_report_markdown_and_plots(study, tmp_path):
    out = tmp_path / "report"
    path = write_report([study], out, title="T")
    text = path.read_text()
    assert text.startswith("# T")
    assert "| fashion-mnist | mlp | rigl | 99 | 82.00 ± 2.00 | 60.0 ± 10.0 | 3 |" in text
    assert "| fashion-mnist | mlp | srigl (no ablation) | 99 | 72.00 ± 2.83 | 100.0 ± 0.0 | 2 |" in text
    assert "Dense accuracy %: 89.00 ± 0.00 (n=1)." in text
    for png in ("accuracy_vs_sparsity.png", "active_neurons_vs_sparsity.png", "fan_in_histogram.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in text
    # Default fan-in run: the sparsest srigl run.
    assert "srigl (" in text.split("Per-neuron fan-in")[1].split("\n")[0]


def test_report_cli(study, tmp_path, capsys):
    out = tmp_path / "r"
    chosen = next(study.glob("lenet5-*"))
    assert main(["report", str(study), "--out", str(out), "--fan-in-run", str(chosen)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert f"`{chosen.name}`" in (out / "report.md").read_text()


def test_report_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no summary.json found"):
        load_runs([tmp_path / "empty"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_runs([broken])
    (broken / "summary.json").write_text('{"config": {}}')
    with pytest.raises(ReportError, match="not a srigl run summary"):
        load_runs([broken])


def test_report_reads_a_real_run(tmp_path):
    run = tmp_path / "real"
    assert main(["train", "--data", "digits", "--epochs", "1", "--limit-train", "128", "--limit-test", "64",
                 "--no-progress", "--method", "rigl", "--sparsity", "0.8", "--out", str(run)]) == 0
    (record,) = load_runs([run])
    assert (record.method, record.sparsity, record.label) == ("rigl", 0.8, "rigl")
    assert write_report([run], tmp_path / "out").exists()


def test_copied_run_is_counted_once_with_a_warning(study, tmp_path):
    """Red-team L14: a backup copy of a run folder was counted as a second seed (n = 2, std 0)."""
    import shutil

    original = next(p for p in study.iterdir() if p.name.endswith("rigl-None-0.99-0"))
    shutil.copytree(original, study / "zz-backup")
    with pytest.warns(UserWarning, match=r"zz-backup repeats .*rigl-None-0.99-0 \(same config and seed 0"):
        runs = load_runs([study])
    assert len(runs) == 8  # the study's 8 runs, the copy left out
    cell = next(c for c in aggregate(runs) if (c.model, c.label) == ("mlp", "rigl"))
    assert (cell.n, cell.seeds) == (3, (0, 1, 2))


def test_summary_strings_cannot_inject_markdown(tmp_path):
    """Red-team L14: a '|' or a line break in summary.json strings made rows of their own in report.md."""
    evil = "mlp | 99.99 ± 0.00 | x |\n| fashion-mnist | injected | rigl | 99 | 99.99 ± 0.00"
    fake_run(tmp_path / "runs", evil, "rigl", 0.9, 0, 0.8, 0.5)
    report = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert not any(line.startswith("| fashion-mnist | injected") for line in rows)
    row = next(line for line in rows if "injected" in line)
    assert row.count("\\|") == 8 and row.replace("\\|", "").count("|") == 8  # 7 columns: 8 real bars
    assert not any(line.startswith("## ") and "\n" in line for line in report.splitlines())


def test_non_string_names_in_summary_are_refused(tmp_path):
    path = fake_run(tmp_path / "runs", "mlp", "rigl", 0.9, 0, 0.8, 0.5)
    summary = json.loads((path / "summary.json").read_text())
    summary["config"]["model"] = ["mlp"]
    (path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match=r"'model' must be a string"):
        load_runs([path])
