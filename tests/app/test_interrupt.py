"""Ctrl-C and SIGTERM at every phase of a step: the run stops between whole steps, and resuming it
ends bit for bit where the uninterrupted run ends (issue #14, red-team finding F2).

Each case raises a real signal (``signal.raise_signal``) from inside one phase of one training
step (data, forward, backward, optimizer step, sparsifier step, scheduler step) or of the epoch's
end (evaluation, checkpoint write), lets ``srigl train`` stop, resumes the run, and compares the
final checkpoint with a straight run's, tensor by tensor.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch

import srigl
from srigl.app import datasets
from srigl.app import train as train_module
from srigl.app.cli import main

QUICK = ["--data", "digits", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64", "--no-progress",
         "--method", "srigl", "--sparsity", "0.9", "--epochs", "3", "--delta", "2", "--seed", "3"]
STEPS_PER_EPOCH = 4  # 256 items / 64
TARGET_STEP = 5  # the signal comes during step 6 (epoch 2, batch 2), a mask-update step (delta 2)


class Trigger:
    """Raises ``signum`` once: in ``phase`` of step TARGET_STEP + 1, or of epoch 2's evaluation, or of epoch 1's save."""

    def __init__(self, phase: str, signum: int, second: int | None = None):
        self.phase, self.signum, self.second = phase, signum, second
        self.steps_done = 0  # optimizer steps completed
        self.saves = self.evaluations = 0
        self.fired = False

    def fire(self, phase: str, done_in_this_step: int = 0) -> None:
        # done_in_this_step: 1 after the optimizer step of the step (its post hook counts steps_done).
        if phase == self.phase and not self.fired and self.steps_done - done_in_this_step == TARGET_STEP:
            self.fired = True
            signal.raise_signal(self.signum)

    def install(self, monkeypatch) -> None:
        trigger = self
        from srigl.app import models

        real_batches, real_create = datasets.batches, models.create_model
        real_optimizer, real_evaluate, real_save = train_module.build_optimizer, train_module.evaluate, torch.save

        def batches(dataset, order, batch_size, num_workers=0):
            for batch in real_batches(dataset, order, batch_size, num_workers):
                trigger.fire("data")
                yield batch

        def create_model(*args, **kwargs):
            model = real_create(*args, **kwargs)
            model.register_forward_pre_hook(lambda module, inputs: trigger.fire("forward"))
            first = next(model.parameters())
            first.register_hook(lambda grad: trigger.fire("backward"))
            return model

        def build_optimizer(config, model):
            optimizer = real_optimizer(config, model)
            optimizer.register_step_pre_hook(lambda *a: trigger.fire("optimizer step"))

            def count(*a):
                trigger.steps_done += 1

            optimizer.register_step_post_hook(count)
            return optimizer

        # Patched on the classes (undone with the monkeypatch): an instance attribute would land in
        # the scheduler's state dict.
        real_sparsifier_step, real_scheduler_step = srigl.SRigL.step, torch.optim.lr_scheduler.LambdaLR.step

        def sparsifier_step(self):
            trigger.fire("sparsifier step", done_in_this_step=1)
            return real_sparsifier_step(self)

        def scheduler_step(self, *args, **kwargs):
            trigger.fire("scheduler step", done_in_this_step=1)
            return real_scheduler_step(self, *args, **kwargs)

        def evaluate(*args, **kwargs):
            trigger.evaluations += 1
            if trigger.phase == "evaluation" and trigger.evaluations == 2 and not trigger.fired:  # end of epoch 2
                trigger.fired = True
                signal.raise_signal(trigger.signum)
            return real_evaluate(*args, **kwargs)

        def save(obj, file, *args, **kwargs):
            trigger.saves += 1
            if trigger.phase == "checkpoint write" and trigger.saves == 1 and not trigger.fired:  # epoch 1's save
                trigger.fired = True
                signal.raise_signal(trigger.signum)
            elif trigger.second is not None and trigger.fired:
                signal.raise_signal(trigger.second)  # a second signal while the interrupt's checkpoint is written
            return real_save(obj, file, *args, **kwargs)

        monkeypatch.setattr(datasets, "batches", batches)
        monkeypatch.setattr(models, "create_model", create_model)
        monkeypatch.setattr(train_module, "build_optimizer", build_optimizer)
        monkeypatch.setattr(srigl.SRigL, "step", sparsifier_step)
        monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", scheduler_step)
        monkeypatch.setattr(train_module, "evaluate", evaluate)
        monkeypatch.setattr(torch, "save", save)


def assert_bitwise_equal(a, b, where: str = "checkpoint") -> int:
    """Compare two loaded checkpoints entry by entry (tensors with torch.equal); return the tensor count."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))} differ"
        return sum(assert_bitwise_equal(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        return sum(assert_bitwise_equal(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{where}: {a!r} vs {b!r}"
    return 0


def _rows(run: Path, keys=("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "mask_churn")):
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: r[k] for k in keys} for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out


PHASES = ["data", "forward", "backward", "optimizer step", "sparsifier step", "scheduler step", "evaluation",
          "checkpoint write"]
CASES = [(phase, signal.SIGINT, None) for phase in PHASES] + [
    ("optimizer step", signal.SIGTERM, None),
    ("forward", signal.SIGINT, signal.SIGINT),  # Ctrl-C twice: the second lands in the checkpoint write
    ("backward", signal.SIGTERM, signal.SIGINT),
]


@pytest.mark.parametrize(("phase", "signum", "second"), CASES,
                         ids=[f"{p}-{signal.Signals(s).name}" + (f"-then-{signal.Signals(t).name}" if t else "")
                              for p, s, t in CASES])
def test_signal_at_any_phase_then_resume_is_bitwise_the_straight_run(tmp_path, monkeypatch, capsys, straight,
                                                                       phase, signum, second):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "cut"
    trigger = Trigger(phase, signum, second)
    trigger.install(monkeypatch)
    status = main(["train", *QUICK, "--out", str(out)])
    monkeypatch.undo()
    assert trigger.fired, f"the {phase} phase was never reached at step {TARGET_STEP + 1}"
    assert status == 128 + signum
    err = capsys.readouterr().err
    assert f"interrupted by {signal.Signals(signum).name}" in err and f"continue with `srigl train --resume {out}`" in err
    assert {s: signal.getsignal(s) for s in before} == before, "train() must restore the previous handlers"

    # What was saved is a state the straight run passes through: whole steps only.
    cut = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    steps = cut["extra"]["step"]
    assert steps == cut["sparsifier"]["step"] == cut["scheduler"]["last_epoch"]
    expected = {
        "data": TARGET_STEP,  # the signal came while the next batch was fetched: that step does not start
        "evaluation": 2 * STEPS_PER_EPOCH,  # epoch 2 ends (evaluation, checkpoint), then the run stops
        "checkpoint write": STEPS_PER_EPOCH,  # epoch 1's checkpoint completes, then the run stops
    }.get(phase, TARGET_STEP + 1)  # inside a step: the step completes, then the run stops
    assert steps == expected
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name != "last.pt"], "temporary files left"

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (straight, out))
    for state in (a, b):
        state["extra"]["config"].pop("out")  # the only entry allowed to differ: where each run lives
    tensors = assert_bitwise_equal(a, b)
    assert tensors > 10
    assert _rows(straight) == _rows(out)


def test_an_ignored_signal_stays_ignored(tmp_path, capsys):
    # nohup and background jobs start with SIGINT ignored: training must not start reacting to it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from srigl.app.run_dir import StopSignals

        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._record
            signal.raise_signal(signal.SIGINT)
            assert stop.received is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
