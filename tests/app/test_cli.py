"""``srigl`` command line: every method end to end on the bundled digits, config-file precedence,
refused flags (exit 2, valid choices in the message), resume after an interruption, condense,
``python -m srigl``, and the flags generated from ``TrainConfig``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from srigl.app import datasets
from srigl.app.cli import _merge, build_parser, config_flag, main
from srigl.app.config import TrainConfig, config_fields, resolve_config
from srigl.app.metrics import METRIC_COLUMNS

QUICK = ["--data", "digits", "--epochs", "1", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
         "--no-progress", "--delta", "2"]


def _train(tmp_path: Path, *flags: str, name: str = "run") -> Path:
    out = tmp_path / name
    assert main(["train", *QUICK, "--out", str(out), *flags]) == 0
    return out


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "dense"],
        ["--method", "static", "--sparsity", "0.8"],
        ["--method", "set", "--sparsity", "0.8", "--distribution", "uniform"],
        ["--method", "rigl", "--sparsity", "0.9", "--model", "lenet5"],
        ["--method", "srigl", "--sparsity", "0.9", "--plot"],
        ["--method", "srigl", "--no-ablation", "--optimizer", "adamw", "--lr-schedule", "step"],
    ],
    ids=["dense", "static", "set", "rigl-lenet5", "srigl-plot", "srigl-noablation-adamw"],
)
def test_train_each_method_writes_the_run_folder(tmp_path, capsys, flags):
    out = _train(tmp_path, *flags)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "layer" in printed and "MACs" in printed

    config = tomllib.loads((out / "config.toml").read_text())
    assert config["method"] == flags[1] and config["out"] == str(out) and config["epochs"] == 1
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and tuple(rows[0]) == METRIC_COLUMNS
    assert int(rows[0]["step"]) == 4  # 256 items / 64 per batch

    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    assert 0.0 <= final["test_acc"] <= 1.0 and final["test_acc"] == pytest.approx(float(rows[0]["test_acc"]))
    target = config["sparsity"]
    assert final["global_sparsity"] == pytest.approx(target, abs=0.01)
    sparse_layers = [e for e in summary["layers"].values() if e.get("sparse")]
    assert bool(sparse_layers) == (flags[1] != "dense")
    for entry in summary["layers"].values():
        assert len(entry["fan_in_counts"]) == entry["neurons"]
        assert sum(entry["fan_in_counts"]) == entry["params"]
    assert (out / "checkpoints" / "last.pt").is_file()
    assert (out / "curves.png").is_file() == ("--plot" in flags)


def test_srigl_summary_has_constant_fan_in(tmp_path):
    out = _train(tmp_path, "--method", "srigl", "--sparsity", "0.9")
    layers = json.loads((out / "summary.json").read_text())["layers"]
    for name, entry in layers.items():
        if entry.get("sparse"):
            active = {c for c in entry["fan_in_counts"] if c > 0}
            assert active == {entry["fan_in"]}, name


def test_config_file_then_flags_precedence(tmp_path):
    file = tmp_path / "exp.toml"
    file.write_text('data = "digits"\nepochs = 2\nseed = 3\nsparsity = 0.8\nmethod = "rigl"\n')
    config = resolve_config(_merge({"config": str(file), "seed": 5}))
    assert (config.epochs, config.seed, config.sparsity, config.method) == (2, 5, 0.8, "rigl")  # flag beats file
    config = resolve_config(_merge({"config": str(file)}))
    assert config.seed == 3  # file beats default
    # A --method flag drops the file's settings that belong to another method.
    file.write_text('data = "digits"\nmethod = "srigl"\ngamma_sal = 0.3\nsparsity = 0.9\n')
    assert resolve_config(_merge({"config": str(file), "method": "rigl"})).gamma_sal is None
    assert resolve_config(_merge({"config": str(file), "method": "dense"})).sparsity == 0.0


def test_config_file_run_end_to_end(tmp_path):
    file = tmp_path / "exp.toml"
    file.write_text('method = "rigl"\nsparsity = 0.8\nseed = 7\nepochs = 3\n')
    out = _train(tmp_path, "--config", str(file), "--seed", "9")
    config = tomllib.loads((out / "config.toml").read_text())
    assert (config["method"], config["sparsity"], config["seed"], config["epochs"]) == ("rigl", 0.8, 9, 1)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "resnet99"], ["invalid choice: 'resnet99'", "mlp", "lenet5", "vit-tiny"]),
        (["--data", "imagenet"], ["invalid choice: 'imagenet'", "fashion-mnist", "digits", "cifar10"]),
        (["--method", "magic"], ["invalid choice: 'magic'", "dense", "static", "set", "rigl", "srigl"]),
        (["--method", "rigl", "--gamma-sal", "0.3"], ["gamma_sal applies to method 'srigl' only, not 'rigl'"]),
        (["--no-ablation", "--gamma-sal", "0.5"], ["no_ablation means gamma_sal = 0 but gamma_sal=0.5"]),
        (["--method", "dense", "--sparsity", "0.9"], ["method 'dense' trains no sparse weights", "rigl, set, srigl, static"]),
        (["--sparsity", "1.0"], ["sparsity must be in [0.0, 1.0), got 1.0"]),
        (["--sparsity", "-0.5"], ["sparsity must be in [0.0, 1.0), got -0.5"]),
        (["--epochs", "0"], ["epochs must be >= 1, got 0"]),
        (["--resume", "x", "--config", "y"], ["--resume uses the config in the run's checkpoint"]),
    ],
)
def test_invalid_flags_exit_2_with_the_valid_choices(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "digits", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: srigl train" in err
    for word in words:
        assert word in err


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    file = tmp_path / "bad.toml"
    file.write_text("epoch = 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown keys ['epoch']" in err and "'epochs'" in err and "'gamma_sal'" in err


def test_infeasible_sparsity_is_a_usage_error(tmp_path, capsys):
    # LeNet-5 at 99.9 %: ERK cannot keep one weight per neuron; the message names the largest feasible target.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *QUICK, "--model", "lenet5", "--sparsity", "0.999", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "largest feasible" in capsys.readouterr().err


def _interrupt_after(monkeypatch, epoch_to_cut: int, batches_done: int):
    """Make the training data stream send Ctrl-C (SIGINT) in epoch ``epoch_to_cut`` after ``batches_done`` batches."""
    real = datasets.batches
    calls = {"n": 0}

    def cut(dataset, order, batch_size, num_workers=0):
        calls["n"] += 1
        for i, batch in enumerate(real(dataset, order, batch_size, num_workers)):
            if calls["n"] == epoch_to_cut and i == batches_done:
                signal.raise_signal(signal.SIGINT)
            yield batch

    monkeypatch.setattr(datasets, "batches", cut)


def test_interrupt_then_resume_equals_straight_run(tmp_path, monkeypatch, capsys):
    # Evaluation also iterates batches(); count only the training streams by cutting on stream 3
    # (epoch 1 train, epoch 1 test, epoch 2 train) after 2 of its 4 batches.
    flags = ["--method", "srigl", "--sparsity", "0.9", "--epochs", "3", "--seed", "4"]
    straight = _train(tmp_path, *flags, name="straight")
    out = tmp_path / "cut"
    _interrupt_after(monkeypatch, epoch_to_cut=3, batches_done=2)
    assert main(["train", *QUICK, "--out", str(out), *flags]) == 130
    assert "continue with `srigl train --resume" in capsys.readouterr().err
    monkeypatch.undo()
    with open(out / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in a["sparsifier"]["masks"]:
        assert torch.equal(a["sparsifier"]["masks"][name], b["sparsifier"]["masks"][name])
    rows_a = list(csv.DictReader(open(straight / "metrics.csv")))
    rows_b = list(csv.DictReader(open(out / "metrics.csv")))
    for key in ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "mask_churn"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key


def test_resume_refuses_changes_and_missing_runs(tmp_path, capsys):
    out = _train(tmp_path, "--method", "rigl")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(out), "--sparsity", "0.5"])
    assert exit_info.value.code == 2 and "cannot change ['sparsity']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path / "nothing")])
    assert "no checkpoint (checkpoints/last.pt) there" in capsys.readouterr().err
    # A finished run resumes to the same end without training more.
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked-dense", "compact"])
def test_load_trained_model_reproduces_the_final_accuracy(tmp_path, engine):
    from srigl.app.datasets import load_dataset
    from srigl.app.metrics import evaluate
    from srigl.app.train import load_trained_model

    run = _train(tmp_path, "--method", "srigl", "--sparsity", "0.9", *engine)
    model, config = load_trained_model(run)
    assert config.compact == bool(engine)
    assert any(name.endswith("_mask") for name, _ in model.named_buffers())
    _, test_set, _ = load_dataset("digits")
    _, accuracy = evaluate(model, test_set.head(128), 64, torch.device("cpu"))
    assert accuracy == json.loads((run / "summary.json").read_text())["final"]["test_acc"]


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked-dense", "compact"])
def test_condense_a_trained_srigl_run(tmp_path, capsys, engine):
    import srigl

    run = _train(tmp_path, "--method", "srigl", "--sparsity", "0.9", *engine)
    target = tmp_path / "model.safetensors"
    assert main(["condense", str(run), "--out", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.exists() and "condensed" in out
    # The printed call rebuilds the model from the file and the recorded architecture.
    from srigl.io.serialization import read_metadata
    from srigl.app.train import load_trained_model

    assert read_metadata(target)["model"] == "mlp"
    call = out.split("load it with: ")[1].strip()
    loaded = eval(call, {"srigl": srigl})  # noqa: S307 - the CLI's own output
    import srigl.app.models  # noqa: F401 - the printed call names it

    masked, _ = load_trained_model(run)
    x = torch.randn(5, 1, 28, 28)  # digits come upscaled to 28 x 28
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), masked(x), rtol=1e-5, atol=1e-5)
    dense = _train(tmp_path, "--method", "dense", name="dense")
    with pytest.raises(SystemExit) as exit_info:
        main(["condense", str(dense), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "dense run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["condense", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_python_dash_m_srigl_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "srigl", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--gamma-sal", "--no-ablation", "--t-end-fraction", "--resume", "--config", "--compact"):
        assert flag in result.stdout


def _train_flags() -> dict[str, object]:
    """``{dest: argparse action}`` of ``srigl train``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions}


@pytest.mark.parametrize("field", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_every_config_field_has_a_flag_whose_default_is_the_field_default(field):
    action = _train_flags()[field.name]
    flag = config_flag(field.name, field.default)
    assert action.option_strings == [flag]
    kind = config_fields()[field.name]
    given = {}
    if kind is bool:
        given = vars(build_parser().parse_args(["train", flag]))
        assert given[field.name] is (not field.default)  # the switch flips the default
    elif field.default is not None:
        # Giving the default explicitly is the same run as not giving the flag.
        value = str(field.default)
        given = vars(build_parser().parse_args(["train", flag, value]))
        assert type(given[field.name]) is kind and given[field.name] == field.default
    not_given = {k: v for k, v in vars(build_parser().parse_args(["train"])).items() if k not in ("handler", "subparser", "command")}
    assert _merge(not_given) == TrainConfig()  # no flag: every field keeps its dataclass default
    if given:
        assert getattr(_merge({field.name: given[field.name]}), field.name) == given[field.name]


def test_condense_never_replaces_the_run_it_reads(tmp_path, capsys):
    out = _train(tmp_path, "--method", "srigl", "--sparsity", "0.8")
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    cases = [
        (last, "is the input checkpoint"),
        (out / "checkpoints" / "last.pt", "is the input checkpoint"),
        (out / "checkpoints" / "condensed.safetensors", "inside the run's checkpoints folder"),
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "model.safetensors", "does not exist"),
    ]
    for source in (out, last):
        for target, words in cases:
            with pytest.raises(SystemExit) as exit_info:
                main(["condense", str(source), "--out", str(target)])
            assert exit_info.value.code == 2, target
            assert words in capsys.readouterr().err, target
    assert last.read_bytes() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    assert main(["condense", str(out), "--out", str(out / "condensed.safetensors")]) == 0


def test_bench_is_gone_from_the_cli(capsys):
    # F6: `srigl bench` ran ./benchmarks/*.py from the current folder; benchmarks now run with `make bench`.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_version_and_kernels_build(capsys):
    import srigl
    from srigl.app.cli import main
    from srigl.kernels import cpu

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"srigl {srigl.__version__}"
    status = main(["kernels", "build"])
    out, err = capsys.readouterr()
    if cpu.available():
        assert status == 0 and out.startswith("srigl C++ kernel ready (")
    else:  # no compiler here: a named error with the build output, not a traceback
        assert status == 1 and err.startswith("srigl kernels: error: srigl C++ kernel could not be built")


def test_kernels_build_without_a_compiler_says_why(tmp_path):
    import os

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    result = subprocess.run([sys.executable, "-m", "srigl", "kernels", "build"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "srigl kernels: error: srigl C++ kernel could not be built" in result.stderr
    assert "Traceback" not in result.stderr
