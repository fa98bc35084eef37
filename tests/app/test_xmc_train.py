"""``srigl train`` on extreme multi-label data (#16): xmc-synthetic end to end under every method,
the repository's file layouts written by the test, resume bit for bit after Ctrl-C, the ranking
metrics in the run folder, the report, refused configs, and a bad file's named error through the CLI."""

from __future__ import annotations

import csv
import json
import signal
import tomllib
from pathlib import Path

import pytest
import torch
from dispatch_watch import LargestTensor

from srigl.app.cli import main
from srigl.app.config import TrainConfig, resolve_config
from srigl.app.datasets import xmc_batches
from srigl.app.datasets.xmc import write_sparse_matrix, write_xmc
from srigl.app.datasets.xmc_sources import load_xmc
from srigl.app.datasets.xmc_synthetic import make_synthetic_xmc
from srigl.app.metrics import XMC_RANK_METRICS
from srigl.app.xmc_train import XMC_COLUMNS

# 400 training / 100 test points, 120 features, 60 labels, hidden 32: 4 steps an epoch, about 1 s a run.
TINY = ["--data", "xmc-synthetic", "--xmc-points", "400", "--xmc-features", "120", "--xmc-labels", "60",
        "--batch-size", "100", "--delta", "2", "--no-progress"]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _train(tmp_path: Path, *flags: str, name: str = "run") -> Path:
    out = tmp_path / name
    hidden = [] if "linear" in flags else ["--xmc-hidden", "32"]  # the head-only model has no hidden layer
    assert main(["train", *TINY, *hidden, "--out", str(out), *flags]) == 0
    return out


@pytest.mark.parametrize(
    "flags",
    [["--method", "dense"], ["--method", "static"], ["--method", "set"], ["--method", "rigl"],
     ["--method", "srigl"], ["--method", "srigl", "--compact"], ["--method", "srigl", "--model", "linear"],
     ["--method", "srigl", "--model", "linear", "--compact"]],
    ids=["dense", "static", "set", "rigl", "srigl", "srigl-compact", "srigl-linear", "srigl-linear-compact"],
)
def test_xmc_synthetic_trains_under_every_method_and_writes_the_run_folder(tmp_path, capsys, flags):
    out = _train(tmp_path, "--epochs", "2", *flags)
    printed = capsys.readouterr().out
    assert "XMC test ranking (%): P@1" in printed and "head.weight" in printed

    config = tomllib.loads((out / "config.toml").read_text())
    assert config["data"] == "xmc-synthetic" and config["xmc_labels"] == 60 and config["xmc_points"] == 400
    rows = _rows(out)
    assert len(rows) == 2 and tuple(rows[0]) == XMC_COLUMNS
    assert [int(r["step"]) for r in rows] == [4, 8]  # 400 points / 100 per batch
    for row in rows:
        assert row["test_acc"] == row["P@1"]  # an XMC run's accuracy is its P@1
        assert all(0.0 <= float(row[name]) <= 1.0 for name in XMC_RANK_METRICS)
        assert float(row["nDCG@1"]) == float(row["P@1"])  # one rank: both count a hit at rank 1

    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    assert final["n_features"] == 120 and final["n_labels"] == 60
    assert final["P@1"] == pytest.approx(float(rows[-1]["P@1"]))
    head = summary["layers"]["head.weight"]
    assert head["shape"] == ([60, 32] if "linear" not in flags else [60, 120])
    if flags[1] != "dense":
        assert head["sparse"] and 0.0 < head["sparsity"] < 1.0
        if flags[1] == "srigl":
            # Constant fan-in and never ablated: every label keeps the same number of weights. (An
            # unstructured mask may leave a label none: static's random mask here leaves one.)
            assert head["active_neurons"] == head["neurons"] == 60
            assert len(set(head["fan_in_counts"])) == 1, head["fan_in_counts"]
    assert (out / "checkpoints" / "last.pt").is_file()


def test_srigl_learns_the_synthetic_labels_beyond_the_most_popular_ones(tmp_path):
    out = _train(tmp_path, "--epochs", "8", "--batch-size", "20", "--lr", "0.5", "--method", "srigl")
    final = json.loads((out / "summary.json").read_text())["final"]
    labels = load_xmc("xmc-synthetic", points=400, features=120, labels=60).test.labels
    # Ranking the k most frequent labels (0..k-1, by the Zipf law) first for every point scores this P@k.
    popular = {k: float((labels.indices < k).sum()) / labels.n_rows / k for k in (1, 3)}
    assert final["P@1"] > popular[1] + 0.05 and final["P@3"] > popular[3] + 0.05, (final, popular)


def test_even_a_strict_gamma_sal_never_ablates_the_head(tmp_path):
    out = _train(tmp_path, "--epochs", "3", "--method", "srigl", "--gamma-sal", "0.9", "--sparsity", "0.97")
    layers = json.loads((out / "summary.json").read_text())["layers"]
    assert layers["head.weight"]["active_neurons"] == 60
    assert layers["features.weight"]["active_neurons"] < 32  # the hidden layer was ablated: the rule is at work


def _write_repository_folder(folder: Path, layout: str, n_features: int = 40, n_labels: int = 12) -> None:
    data = make_synthetic_xmc(250, n_features, n_labels, max_labels=3, seed=7)
    train_rows, test_rows = torch.arange(200), torch.arange(200, 250)
    from srigl.app.datasets.xmc import XMCDataset, take_rows

    splits = {split: XMCDataset(take_rows(data.features, rows), take_rows(data.labels, rows))
              for split, rows in (("trn", train_rows), ("tst", test_rows))}
    folder.mkdir(parents=True)
    if layout == "combined":
        write_xmc(folder / "train.txt", splits["trn"])
        write_xmc(folder / "test.txt", splits["tst"])
    else:  # the split pairs, gzipped
        for split, part in splits.items():
            write_sparse_matrix(folder / f"{split}_X_Xf.txt.gz", part.features)
            write_sparse_matrix(folder / f"{split}_X_Y.txt.gz", part.labels)


@pytest.mark.parametrize("layout", ["combined", "pairs-gz"])
@pytest.mark.parametrize("where", ["parent", "folder"])
def test_files_in_the_repository_format_train_from_their_folder(tmp_path, layout, where):
    _write_repository_folder(tmp_path / "data" / "Toy-12", layout)
    data_dir = tmp_path / "data" if where == "parent" else tmp_path / "data" / "Toy-12"
    out = tmp_path / "run"
    flags = ["--data", "xmc:Toy-12", "--data-dir", str(data_dir), "--model", "mlp", "--xmc-hidden", "16",
             "--batch-size", "50", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(["train", *flags]) == 0
    final = json.loads((out / "summary.json").read_text())["final"]
    assert (final["n_features"], final["n_labels"]) == (40, 12)  # from the files' headers
    assert int(_rows(out)[0]["step"]) == 4  # 200 training points / 50
    assert resolve_config(TrainConfig(data="xmc:Toy-12")).out.endswith("xmc-Toy-12-mlp-srigl-g0.3-s0.9-seed0")


def _interrupt_training_stream(monkeypatch, epoch_to_cut: int, batches_done: int) -> None:
    """Send Ctrl-C from the training batches of epoch ``epoch_to_cut`` (1-based) after ``batches_done`` batches."""
    real = xmc_batches.iterate_batches

    def cut(dataset, batch_size, *, shuffle=True, epoch=0, **kwargs):
        for i, batch in enumerate(real(dataset, batch_size, shuffle=shuffle, epoch=epoch, **kwargs)):
            if shuffle and epoch + 1 == epoch_to_cut and i == batches_done:  # evaluation does not shuffle
                signal.raise_signal(signal.SIGINT)
            yield batch

    monkeypatch.setattr(xmc_batches, "iterate_batches", cut)


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked", "compact"])
def test_interrupt_then_resume_is_bitwise_the_straight_run(tmp_path, monkeypatch, capsys, engine):
    flags = ["--method", "srigl", "--epochs", "3", "--seed", "5", *engine]
    straight = _train(tmp_path, *flags, name="straight")
    out = tmp_path / "cut"
    _interrupt_training_stream(monkeypatch, epoch_to_cut=2, batches_done=1)  # step 5: after a mask update (delta 2)
    assert main(["train", *TINY, "--xmc-hidden", "32", "--out", str(out), *flags]) == 130
    assert "continue with `srigl train --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert len(_rows(out)) == 1
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("epoch", "step", "train_loss", "train_acc", "test_loss", *XMC_RANK_METRICS, "mask_churn"):
        assert [r[key] for r in _rows(straight)] == [r[key] for r in _rows(out)], key


def test_report_reads_xmc_runs(tmp_path, capsys):
    runs = [_train(tmp_path, "--epochs", "1", "--seed", str(seed), name=f"seed{seed}") for seed in (0, 1)]
    report = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "mlp on xmc-synthetic" in text and "Final test P@1 %" in text
    p1 = [json.loads((run / "summary.json").read_text())["final"]["P@1"] for run in runs]
    assert f"{100 * sum(p1) / 2:.2f} ±" in text  # the mean over the two seeds


def test_a_bad_file_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    folder = tmp_path / "Bad"
    folder.mkdir()
    (folder / "train.txt").write_text("3 5 4\n0 1:1\n2,7 0:0.5\n1 3:1\n")  # label 7 with L = 4, line 3
    (folder / "test.txt").write_text("1 5 4\n0 2:1\n")
    status = main(["train", "--data", "xmc:Bad", "--data-dir", str(folder), "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 1
    assert err == f"srigl train: error: {folder / 'train.txt'}: line 3: label 7 is not below the header's count 4\n"


def test_a_missing_folder_lists_where_srigl_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SRIGL_DATA_DIR", raising=False)
    status = main(["train", "--data", "xmc:Nowhere", "--data-dir", str(tmp_path), "--no-progress", "--out",
                   str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 1 and "xmc:Nowhere not found" in err and str(tmp_path / "Nowhere") in err
    assert "train.txt + test.txt" in err and "trn_X_Xf.txt" in err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--data", "xmc-synthetic", "--model", "resnet18"], "unknown model 'resnet18' for XMC data"),
        (["--data", "digits", "--model", "linear"], "unknown model 'linear' for image data"),
        (["--data", "digits", "--xmc-labels", "5"], "xmc_labels applies to XMC data"),
        (["--data", "xmc:a/b"], "give xmc:NAME with NAME a folder name"),
        (["--data", "xmc:Toy", "--xmc-points", "10"], "xmc_points size the xmc-synthetic data"),
        (["--data", "xmc-synthetic", "--model", "linear", "--xmc-hidden", "8"], "xmc_hidden applies to the XMC model 'mlp'"),
        (["--data", "xmc-synthetic", "--xmc-labels", "0"], "xmc_labels must be >= 1, got 0"),
    ],
)
def test_xmc_configs_that_cannot_work_are_usage_errors(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags, "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resolving_an_xmc_config_is_idempotent():
    once = resolve_config(TrainConfig(data="xmc-synthetic"))
    assert (once.xmc_points, once.xmc_features, once.xmc_labels, once.xmc_hidden) == (2000, 500, 1000, 768)
    assert resolve_config(once) == once
    assert resolve_config(TrainConfig(data="xmc:EURLex-4K", model="linear")).xmc_hidden is None


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked", "compact"])
def test_condense_an_xmc_run_and_load_it_back(tmp_path, capsys, engine):
    import srigl
    import srigl.app.xmc_models  # noqa: F401 - the printed call names it
    from srigl.app.train import load_trained_model

    run = _train(tmp_path, "--epochs", "1", "--method", "srigl", *engine)
    target = tmp_path / "model.safetensors"
    assert main(["condense", str(run), "--out", str(target)]) == 0
    call = capsys.readouterr().out.split("load it with: ")[1].strip()
    assert "create_xmc_model('mlp', 120, 60, 32)" in call
    loaded = eval(call, {"srigl": srigl})  # noqa: S307 - the CLI's own output
    masked, config = load_trained_model(run)
    assert config.data == "xmc-synthetic"
    x = load_xmc("xmc-synthetic", points=400, features=120, labels=60).test
    features = xmc_batches.dense_rows(x.features)  # (100, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(features), masked(features), rtol=1e-5, atol=1e-5)


def test_fewer_labels_than_the_largest_rank(tmp_path):
    # L = 3 < 5: ranks 4 and 5 exist for no label, so they count as misses (P@5 <= 3/5).
    out = tmp_path / "run"
    assert main(["train", "--data", "xmc-synthetic", "--xmc-labels", "3", "--xmc-points", "100", "--xmc-features", "20",
                 "--xmc-hidden", "8", "--sparsity", "0.5", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    row = _rows(out)[0]
    assert 0.0 < float(row["P@5"]) <= 3 / 5 and float(row["nDCG@5"]) == float(row["nDCG@3"])


# 2000 labels, hidden 64: the dense head (128,000 entries) outweighs every other tensor of a compact run:
# the logits (20 x 2000), the features layer (50 x 64), the layout (2000 x k), one block of update scores.
WIDE = ["--data", "xmc-synthetic", "--xmc-points", "100", "--xmc-features", "50", "--xmc-labels", "2000",
        "--xmc-hidden", "64", "--batch-size", "20", "--delta", "2", "--no-progress", "--method", "srigl", "--compact"]


def test_a_compact_run_never_allocates_the_dense_head_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    from srigl import blockwise
    from srigl.condensed import CondensedLinear

    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 16 * 64)  # a block of the update: 16 rows of the head
    # Evaluation's packed copy of values + indices (a uint8 buffer, not a dense head) is not measured here.
    monkeypatch.setattr(CondensedLinear, "window_inference", False)
    flags = [*WIDE, "--epochs", "2", "--seed", "3"]
    straight = tmp_path / "straight"
    with LargestTensor(skip_meta=True) as watch:
        assert main(["train", *flags, "--out", str(straight)]) == 0
    dense_head = 2000 * 64
    assert 0 < watch.largest < dense_head // 2, watch.largest
    saved = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert "head.weight" not in saved and saved["head.values"].shape[0] == 2000  # (L, k): every label kept
    assert float(_rows(straight)[0]["mask_churn"]) > 0  # a mask update happened in epoch 1

    out = tmp_path / "cut"
    _interrupt_training_stream(monkeypatch, epoch_to_cut=2, batches_done=2)
    assert main(["train", *flags, "--out", str(out)]) == 130
    monkeypatch.undo()
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 16 * 64)
    monkeypatch.setattr(CondensedLinear, "window_inference", False)
    with LargestTensor(skip_meta=True) as watch:  # resuming loads the checkpoint into a head built on meta
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert 0 < watch.largest < dense_head // 2, watch.largest
    assert "resuming" in capsys.readouterr().out

    resumed = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved.keys() == resumed["model"].keys()
    for key in saved:
        assert torch.equal(saved[key], resumed["model"][key]), key
    for key in ("epoch", "step", "train_loss", "test_loss", *XMC_RANK_METRICS, "mask_churn"):
        assert [r[key] for r in _rows(straight)] == [r[key] for r in _rows(out)], key


def test_a_compact_head_the_distribution_leaves_dense_is_drawn_after_the_sparsifier(tmp_path):
    # A 2000 -> 32 feature layer and a 32 -> 5 head at sparsity 0.5: ERK's density for the head
    # exceeds 1, so the sparsifier keeps it dense and does not materialise the meta head.
    out = tmp_path / "run"
    assert main(["train", "--data", "xmc-synthetic", "--xmc-points", "100", "--xmc-features", "2000", "--xmc-labels", "5",
                 "--xmc-hidden", "32", "--batch-size", "50", "--method", "srigl", "--compact", "--sparsity", "0.5",
                 "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    layers = json.loads((out / "summary.json").read_text())["layers"]
    assert not layers["head.weight"]["sparse"] and layers["features.weight"]["sparse"]
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert saved["head.weight"].shape == (5, 32) and 0 < float(saved["head.weight"].abs().max()) <= 1


def test_a_dense_head_that_cannot_fit_is_refused_with_the_memory_it_needs(tmp_path, monkeypatch, capsys):
    from srigl.storage import compact as compact_storage

    monkeypatch.setattr(compact_storage, "available_bytes", lambda device: 10_000)  # bytes free
    out = tmp_path / "run"
    # Masked storage: 60 x 32 entries of weight (4 B), gradient (4 B) and mask (1 B) = 17,280 bytes.
    assert main(["train", *TINY, "--xmc-hidden", "32", "--method", "srigl", "--epochs", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "head.weight (60, 32) needs 0.00 GB (17,280 bytes) on cpu as a dense layer for its weight, gradient and mask" in err
    assert "--compact" in err and not (out / "checkpoints").exists()
    # The compact run never builds it: 10,000 bytes hold its (60, k) values, indices and gradient.
    assert main(["train", *TINY, "--xmc-hidden", "32", "--method", "srigl", "--compact", "--epochs", "1",
                 "--out", str(tmp_path / "compact")]) == 0
