"""Checkpoints: exact resume in a new process, atomic saves under SIGKILL, and refused loads.

The training scenario lives in ``SCRIPT``, written to a temporary file: this process imports it with
``runpy`` for the straight run and the first half, and a fresh Python process runs it to resume from
the checkpoint and finish the second half. Dropout (torch RNG), input jitter (numpy and Python RNGs),
an LR scheduler and a seeded data generator (kept in ``extra``) all feed the result, so any state the
checkpoint failed to carry shows up as a bitwise difference.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import srigl
from srigl.io.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from srigl.errors import CheckpointError, CheckpointMismatchError, StateDictMismatchError

SRC = str(Path(srigl.__file__).resolve().parents[1])

SCRIPT = r'''
import random
import sys

import numpy as np
import torch

import srigl
from srigl.io.checkpoint import load_checkpoint, restore_training_state

N, DELTA, BATCH = 40, 7, 16  # updates after steps 7, 14 (first half) and 21, 28 (second half; t_end = 30)


def build(algorithm, optimizer_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5),
    )
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, N)
    compact = algorithm.endswith("-compact")  # SRigL training (n_active, k) values + indices
    sp = srigl.get_algorithm(algorithm.removesuffix("-compact"))(
        model, opt, sparsity=0.75, total_steps=N, distribution="uniform", delta=DELTA, seed=3,
        **({"compact": True} if compact else {}),
    )
    data_gen = torch.Generator().manual_seed(1)
    return model, opt, sched, sp, data_gen


def seed_globals():
    torch.manual_seed(10)
    np.random.seed(11)
    random.seed(12)


def train(model, opt, sched, sp, data_gen, steps):
    g = torch.Generator().manual_seed(2)
    x_all, y_all = torch.randn(256, 12, generator=g), torch.randint(0, 5, (256,), generator=g)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 256, (BATCH,), generator=data_gen)
        # Jitter drawn from the numpy and Python RNGs, so their restore matters as much as torch's.
        noise = torch.from_numpy(np.random.standard_normal((BATCH, 12))).float() * (0.05 * random.random())
        loss = torch.nn.functional.cross_entropy(model(x_all[idx] + noise), y_all[idx])
        loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad()
        sched.step()


def snapshot(model, opt, sched, sp):
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": sp.masks(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "sparsifier": sp.state_dict(),
    }


if __name__ == "__main__":
    algorithm, optimizer_name, ckpt, out = sys.argv[1:5]
    torch.set_num_threads(1)
    model, opt, sched, sp, data_gen = build(algorithm, optimizer_name)
    torch.manual_seed(999)  # some other RNG state: the restore must bring back the saved one
    extra = restore_training_state(load_checkpoint(ckpt), model, opt, sp, sched)
    data_gen.set_state(extra["data_generator"])
    train(model, opt, sched, sp, data_gen, N - extra["step"])
    torch.save(snapshot(model, opt, sched, sp), out)
'''


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "resume_script.py"
    path.write_text(SCRIPT)
    return path, runpy.run_path(str(path))


@pytest.fixture
def one_thread():
    # Matmul blocking can depend on the thread count; the subprocess runs with one thread too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def assert_identical(a, b, where="state"):
    """Recursive bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _first_half_checkpoint(ns, algorithm, optimizer_name, path):
    model, opt, sched, sp, data_gen = ns["build"](algorithm, optimizer_name)
    masks0 = sp.masks()
    ns["seed_globals"]()
    ns["train"](model, opt, sched, sp, data_gen, ns["N"] // 2)
    changed = any(not torch.equal(masks0[n], m) for n, m in sp.masks().items())
    state = training_state(model, opt, sp, sched, step=ns["N"] // 2, data_generator=data_gen.get_state())
    save_checkpoint(path, state)
    return changed, sp.masks()


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("algorithm", ["rigl", "srigl"])
def test_resume_in_new_process_is_bitwise_identical(scenario, one_thread, tmp_path, algorithm, optimizer_name):
    script, ns = scenario
    model, opt, sched, sp, data_gen = ns["build"](algorithm, optimizer_name)
    ns["seed_globals"]()
    ns["train"](model, opt, sched, sp, data_gen, ns["N"])
    straight = copy.deepcopy(ns["snapshot"](model, opt, sched, sp))

    ckpt = checkpoint_path(tmp_path / "run")
    changed_first, half_masks = _first_half_checkpoint(ns, algorithm, optimizer_name, ckpt)
    assert changed_first, "no mask update happened in the first half"
    out = tmp_path / "resumed.pt"
    result = subprocess.run(
        [sys.executable, str(script), algorithm, optimizer_name, str(ckpt), str(out)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    resumed = torch.load(out, weights_only=True)

    assert any(not torch.equal(half_masks[n], m) for n, m in resumed["masks"].items()), "no update in second half"
    assert resumed["sparsifier"]["step"] == ns["N"]
    assert_identical(straight["model"], resumed["model"], "model")
    assert_identical(straight["masks"], resumed["masks"], "masks")
    assert_identical(straight["optimizer"], resumed["optimizer"], "optimizer")
    assert_identical(straight["scheduler"], resumed["scheduler"], "scheduler")
    assert_identical(straight["sparsifier"], resumed["sparsifier"], "sparsifier")


def test_rng_restore_matters(scenario, one_thread, tmp_path):
    """Control: resuming with the RNG state disturbed after the restore diverges (dropout differs)."""
    _, ns = scenario
    model, opt, sched, sp, data_gen = ns["build"]("srigl", "sgd")
    ns["seed_globals"]()
    ns["train"](model, opt, sched, sp, data_gen, ns["N"])
    straight = ns["snapshot"](model, opt, sched, sp)

    ckpt = tmp_path / "half.pt"
    _first_half_checkpoint(ns, "srigl", "sgd", ckpt)
    model, opt, sched, sp, data_gen = ns["build"]("srigl", "sgd")
    extra = restore_training_state(load_checkpoint(ckpt), model, opt, sp, sched)
    data_gen.set_state(extra["data_generator"])
    torch.manual_seed(12345)
    ns["train"](model, opt, sched, sp, data_gen, ns["N"] - extra["step"])
    assert not torch.equal(straight["model"]["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.parametrize("algorithm", [*sorted(srigl.ALGORITHMS), "srigl-compact"])
def test_resume_in_process_every_algorithm(scenario, one_thread, tmp_path, algorithm):
    _, ns = scenario
    model, opt, sched, sp, data_gen = ns["build"](algorithm, "adam")
    ns["seed_globals"]()
    ns["train"](model, opt, sched, sp, data_gen, ns["N"])
    straight = copy.deepcopy(ns["snapshot"](model, opt, sched, sp))

    ckpt = tmp_path / "half.pt"
    _first_half_checkpoint(ns, algorithm, "adam", ckpt)
    model, opt, sched, sp, data_gen = ns["build"](algorithm, "adam")
    torch.manual_seed(999)
    extra = restore_training_state(load_checkpoint(ckpt), model, opt, sp, sched)
    data_gen.set_state(extra["data_generator"])
    ns["train"](model, opt, sched, sp, data_gen, ns["N"] - extra["step"])
    assert_identical(straight, ns["snapshot"](model, opt, sched, sp))


# ---------------------------------------------------------------------- small fixtures
def _small(algorithm=srigl.SRigL, sparsity=0.5, seed=0, optimizer=torch.optim.SGD, width=8, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
    opt = optimizer(model.parameters(), lr=0.1, **({"momentum": 0.9} if optimizer is torch.optim.SGD else {}))
    kw.setdefault("distribution", "uniform")
    sp = algorithm(model, opt, sparsity=sparsity, total_steps=20, delta=2, **kw)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    return model, opt, sp


def _live(model, opt, sp):
    """Deep copy of everything a refused restore must leave alone."""
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict() if sp else None})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- state contents
def test_training_state_contents_and_copy(tmp_path):
    model, opt, sp = _small()
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)

    @dataclasses.dataclass
    class RunConfig:
        lr: float
        out: Path

    state = training_state(
        model, opt, sp, sched, epoch=2, config=RunConfig(0.1, tmp_path), seen=np.int64(7), order=np.arange(3)
    )
    assert state["format"] == "srigl.checkpoint" and state["srigl_version"] == srigl.__version__
    assert state["fingerprint"]["0.weight"] == {"shape": [8, 6], "dtype": "torch.float32"}
    assert "0.weight_mask" not in state["fingerprint"]  # masks belong to the sparsifier state
    assert state["sparsifier_config"]["algorithm"] == "srigl" and state["optimizer_class"] == "SGD"
    assert state["scheduler_class"] == "StepLR"
    assert state["extra"] == {"epoch": 2, "config": {"lr": 0.1, "out": str(tmp_path)}, "seen": 7, "order": state["extra"]["order"]}
    assert torch.equal(state["extra"]["order"], torch.arange(3))
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    # Every tensor is a copy: training on does not change what gets saved.
    before = state["model"]["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(state["model"]["0.weight"], before)
    # Weights-only round trip of the whole state.
    save_checkpoint(tmp_path / "c.pt", state)
    assert_identical(state, load_checkpoint(tmp_path / "c.pt"))


def test_ddp_style_wrapper_is_unwrapped(tmp_path):
    model, opt, sp = _small()
    wrapped = nn.DataParallel(model)  # same unwrapping path as DistributedDataParallel
    state = training_state(wrapped, opt, sp)
    assert "0.weight" in state["model"] and not any(k.startswith("module.") for k in state["model"])
    restore_training_state(state, wrapped, opt, sp)


def test_unsaveable_extra_is_refused_before_writing(tmp_path):
    model, opt, sp = _small()
    path = tmp_path / "c.pt"
    save_checkpoint(path, training_state(model, opt, sp, step=1))
    digest = _digest(path)
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['hook'\] is a builtins.function"):
        training_state(model, opt, sp, hook=lambda: 0)
    state = training_state(model, opt, sp, step=2)
    state["extra"]["hook"] = lambda: 0  # added after training_state: save_checkpoint checks again
    with pytest.raises(CheckpointError, match="hook"):
        save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="not a srigl checkpoint"):
        save_checkpoint(path, {"model": model.state_dict()})
    assert _digest(path) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_exception_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sp = _small()
    path = tmp_path / "c.pt"
    save_checkpoint(path, training_state(model, opt, sp, step=1))
    digest = _digest(path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left") as info:  # named, with the free space (L1)
        save_checkpoint(path, training_state(model, opt, sp, step=2))
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.setattr(torch, "save", real_save)
    assert _digest(path) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # the temporary file was removed
    assert load_checkpoint(path)["extra"] == {"step": 1}


# ---------------------------------------------------------------------- SIGKILL during a save
KILL_SCRIPT = r'''
import os
import sys
import time

import torch

from srigl.io.checkpoint import save_checkpoint, training_state

where, path = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(512, 2048)  # ~4 MB of weights, written in many chunks
opt = torch.optim.SGD(model.parameters(), lr=0.1)

real_fsync, real_fdopen = os.fsync, os.fdopen


class SlowFile:
    """Writes like the real file, slowly, and says when a save is under way."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 16):  # 64 KiB at a time, 20 ms apart
            self.f.write(view[start : start + (1 << 16)])
            self.f.flush()
            before, self.written = self.written, self.written + len(view[start : start + (1 << 16)])
            if before < (1 << 20) <= self.written:
                print("writing", flush=True)  # 1 MiB of ~4 MiB is on disk
            time.sleep(0.02)
        return len(view)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def slow_fsync(fd):
    print("fsync", flush=True)
    time.sleep(30)
    real_fsync(fd)


save_checkpoint(path, training_state(model, opt, step=0, value=model.weight.detach().clone()))
print("saved 0", flush=True)
with torch.no_grad():
    model.weight.add_(1.0)
if where == "write":
    os.fdopen = lambda fd, mode: SlowFile(real_fdopen(fd, mode))
else:
    os.fsync = slow_fsync
save_checkpoint(path, training_state(model, opt, step=1, value=model.weight.detach().clone()))
print("saved 1", flush=True)
'''


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, where):
    """SIGKILL while the temporary file is half written ('write') or written but not renamed ('fsync')."""
    script = tmp_path / "kill_script.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, str(script), where, str(path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline().strip()
            lines.append(line)
            if line == ("writing" if where == "write" else "fsync") and "saved 0" in lines:
                break
            assert line, f"script ended early: {lines}"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "saved 1" not in lines

    state = load_checkpoint(path)
    assert state["extra"]["step"] == 0
    assert state["extra"]["value"].shape == (2048, 512)
    assert torch.equal(state["model"]["weight"], state["extra"]["value"])
    assert latest_checkpoint(tmp_path / "run") == path
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.pt.") and leftovers[0].suffix == ".tmp"
    if where == "write":
        assert (1 << 20) <= leftovers[0].stat().st_size < path.stat().st_size  # really cut mid-write
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(leftovers[0])


# ---------------------------------------------------------------------- unreadable files
def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"random\.pt: cannot read checkpoint: the file is corrupt or not a checkpoint \(4096 bytes, starts with"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    model, opt, sp = _small()
    path = tmp_path / "c.pt"
    save_checkpoint(path, training_state(model, opt, sp))
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut\.pt: .*corrupt or truncated \({len(data) // 2} bytes; the zip archive has no end record"):
        load_checkpoint(cut)


def test_flipped_bit_in_a_tensor_is_refused(tmp_path):
    model, opt, sp = _small()
    path = tmp_path / "c.pt"
    save_checkpoint(path, training_state(model, opt, sp))
    data = bytearray(path.read_bytes())
    weight = model[0].weight.detach().numpy().tobytes()
    at = bytes(data).find(weight[:16])  # the first sparse layer's stored weights
    assert at > 0
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.pt: cannot read checkpoint: the file is corrupt \(\d+ bytes; record '.*' fails its CRC-32 check\)"):
        load_checkpoint(path)


def test_empty_missing_and_directory_are_refused(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: checkpoint file is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="it is a directory"):
        load_checkpoint(tmp_path)


def test_plain_torch_file_is_not_a_srigl_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"weights\.pt: checkpoint is not a srigl checkpoint .*\['weight'\]"):
        load_checkpoint(path)


class _Payload:
    """Pickles to a call that would create a file: a weights-only load must never make that call."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "srigl.checkpoint", "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load checkpoint as unsafe: .*GLOBAL getattr") as info:
        load_checkpoint(path)
    assert not marker.exists()
    # Red-team L2: torch's own advice, "re-run torch.load with weights_only=False", would run the payload.
    assert not any(word in str(info.value) for word in ("weights_only", "safe_globals", "corrupt"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_newer_format_version_is_refused(tmp_path):
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    state["format_version"] = 99
    path = tmp_path / "new.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="format version 99 is newer than this srigl reads"):
        load_checkpoint(path)


# ---------------------------------------------------------------------- refused restores
def _refuses(state, model, opt, sp, match, sched=None, error=CheckpointMismatchError):
    before = _live(model, opt, sp)
    rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        restore_training_state(state, model, opt, sp, sched)
    assert_identical(before, _live(model, opt, sp), "live objects after a refused restore")
    assert torch.equal(rng, torch.get_rng_state())


def test_other_model_is_refused_with_names(tmp_path):
    model, opt, sp = _small()
    path = tmp_path / "c.pt"
    save_checkpoint(path, training_state(model, opt, sp))
    digest = _digest(path)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3), nn.Linear(3, 3))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_sp = srigl.SRigL(other, other_opt, sparsity=0.5, total_steps=20, delta=2, distribution="uniform")
    _refuses(
        load_checkpoint(path), other, other_opt, other_sp,
        r"another model than Sequential: 2 missing from the checkpoint \['3.bias', '3.weight'\]; "
        r"3 with other shapes \[0.bias: checkpoint \[8\] vs model \[10\]; 0.weight: checkpoint \[8, 6\] vs model \[10, 6\]",
    )
    assert _digest(path) == digest  # nothing the user saved is touched by a refusal


def _set_entry(state, path, value):
    *parents, last = path
    for key in parents:
        state = state[key]
    state[last] = value


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("rng", "python", "internal"), torch.zeros(10, dtype=torch.int64), r"RNG state 'python' is malformed \(ValueError"),
        (("rng", "python", "version"), 99, r"RNG state 'python' is malformed"),
        (("rng", "torch"), torch.zeros(7, dtype=torch.uint8), r"RNG state 'torch' is malformed \(RuntimeError"),
        (("rng", "torch"), "abc", r"RNG state 'torch' is malformed \(AttributeError"),
        (("rng", "numpy", "keys"), torch.zeros(5, dtype=torch.int64), r"RNG state 'numpy' is malformed \("),
        (("rng", "cuda"), [torch.zeros(3)], r"RNG state 'cuda' is malformed \(TypeError"),
        (("rng",), [1, 2], r"the 'rng' entry must be a dict with 'torch' and 'python' states"),
        (("extra",), [1, 2], r"checkpoint entries have the wrong type: 'extra' is a list"),
    ],
    ids=["python-internal", "python-version", "torch-size", "torch-type", "numpy-keys", "cuda-dtype", "rng-list", "extra-list"],
)
def test_malformed_entry_is_refused_before_anything_is_loaded(path, value, match):
    """Red-team L12: a malformed RNG entry was found only after model, optimizer and sparsifier were loaded."""
    import random

    pytest.importorskip("numpy")
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    _set_entry(state, path, value)
    model2, opt2, sp2 = _small(seed=1)
    python_rng = random.getstate()
    _refuses(state, model2, opt2, sp2, match, error=CheckpointError)
    assert random.getstate() == python_rng


def test_other_dtype_is_refused():
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    model2, opt2, sp2 = _small()
    model2.double()
    _refuses(state, model2, opt2, sp2, r"other dtypes \[0.bias: checkpoint torch.float32 vs model torch.float64")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 0.75}, r"saved with sparsity=0.5, this sparsifier has sparsity=0.75"),
        ({"algorithm": srigl.RigL}, r"saved with algorithm='srigl', this sparsifier has algorithm='rigl'"),
        ({"distribution": "erk"}, r"saved with distribution='uniform', this sparsifier has distribution='erk'"),
        ({"gamma_sal": 0.0}, r"saved with gamma_sal=0.3, this sparsifier has gamma_sal=0.0"),
    ],
)
def test_other_sparsifier_configuration_is_refused(kwargs, match):
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    model2, opt2, sp2 = _small(seed=1, **kwargs)
    _refuses(state, model2, opt2, sp2, match)


def test_sparsifier_presence_must_match():
    model, opt, sp = _small()
    sparse_state = training_state(model, opt, sp)
    _refuses(sparse_state, model, opt, None, r"holds a sparsifier state \(algorithm='srigl', sparsity=0.5\)")
    dense_state = training_state(model, opt)
    _refuses(dense_state, model, opt, sp, r"saved without a sparsifier .*cannot restore 'srigl'")


def test_other_optimizer_and_scheduler_are_refused():
    model, opt, sp = _small()
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    state = training_state(model, opt, sp, sched)
    model2, opt2, sp2 = _small(seed=1, optimizer=torch.optim.Adam)
    _refuses(state, model2, opt2, sp2, "checkpoint optimizer is SGD, the optimizer given is Adam",
             sched=torch.optim.lr_scheduler.StepLR(opt2, 5))
    model3, opt3, sp3 = _small(seed=1)
    _refuses(state, model3, opt3, sp3, r"holds an LR scheduler state \(StepLR\); pass the scheduler")
    _refuses(state, model3, opt3, sp3, "checkpoint LR scheduler is StepLR, the scheduler given is ExponentialLR",
             sched=torch.optim.lr_scheduler.ExponentialLR(opt3, 0.9))


def test_other_optimizer_grouping_is_refused():
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    torch.manual_seed(1)
    model2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt2 = torch.optim.SGD(
        [{"params": [model2[0].weight, model2[2].weight]}, {"params": [model2[0].bias, model2[2].bias]}],
        lr=0.1, momentum=0.9,
    )
    sp2 = srigl.SRigL(model2, opt2, sparsity=0.5, total_steps=20, delta=2, distribution="uniform")
    _refuses(state, model2, opt2, sp2, r"param groups of sizes \[4\], the optimizer given \[2, 2\]")


def test_sparsifier_state_dict_from_other_model_is_refused_by_the_checkpoint_error_class():
    # CheckpointMismatchError is also a StateDictMismatchError: one except clause catches both.
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    model2, opt2, sp2 = _small(seed=1, sparsity=0.75)
    with pytest.raises(StateDictMismatchError):
        restore_training_state(state, model2, opt2, sp2)


def test_schedule_change_is_allowed_with_a_warning():
    model, opt, sp = _small()
    state = training_state(model, opt, sp)
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sp2 = srigl.SRigL(model2, opt2, sparsity=0.5, total_steps=40, delta=2, distribution="uniform")
    with pytest.warns(UserWarning, match=r"t_end: checkpoint 15 -> now 30; total_steps: checkpoint 20 -> now 40"):
        restore_training_state(state, model2, opt2, sp2)
    assert_identical(sp.masks(), sp2.masks())


# ---------------------------------------------------------------------- run folders
def test_latest_checkpoint_conventions(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.pt.123.abcd.tmp").write_bytes(b"partial")
    assert latest_checkpoint(run) is None  # a leftover of a killed save is never picked up
    model, opt, sp = _small()
    save_checkpoint(checkpoint_path(run), training_state(model, opt, sp))
    assert latest_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "last.pt"
    assert latest_checkpoint(run / "checkpoints" / "last.pt") == run / "checkpoints" / "last.pt"
    assert latest_checkpoint(tmp_path / "missing.pt") is None


def _tiny_state():
    model = nn.Linear(64, 64)
    return training_state(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("failure", ["zip writer", "ENOSPC"])
def test_a_full_disk_is_named_with_path_and_free_space(tmp_path, monkeypatch, failure):
    # L1 (issue #14): the user saw only "[enforce fail at inline_container.cc:672] . unexpected pos".
    import errno
    import shutil

    from srigl.io import checkpoint as checkpoint_module

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _tiny_state())
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1071424 vs 1071352")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _tiny_state())
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    message = str(info.value)
    assert f"cannot write checkpoint {path}" in message
    assert "4096 bytes (0.0 MiB) free there" in message and "intact" in message
    assert re.search(r"needs about \d{5} bytes", message)
    assert ("No space left on device" if failure == "ENOSPC" else "unexpected pos") in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_a_real_write_limit_is_a_named_error(tmp_path):
    # The file system refuses the write (RLIMIT_FSIZE stands in for a full disk): a named error, no traceback mess.
    import subprocess
    import sys

    script = f"""
import resource, signal, sys, torch
from torch import nn
from srigl.io.checkpoint import save_checkpoint, training_state
from srigl.errors import CheckpointError
model = nn.Linear(256, 256)
state = training_state(model, torch.optim.SGD(model.parameters(), lr=0.1))
save_checkpoint({str(tmp_path / 'last.pt')!r}, state)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint({str(tmp_path / 'last.pt')!r}, state)
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""
    import srigl

    src = str(Path(srigl.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": src})
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"cannot write checkpoint {tmp_path / 'last.pt'}" in result.stdout and "free there" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
