"""Bad input: every case gets a named error (or a warning) whose message names the problem and the numbers.

``CASES`` is the single list of bad inputs: the parametrized test checks each one's exception class
and message, and ``python tests/test_errors.py > docs/bad_inputs.md`` renders the same list, with the
real messages, into the table the README shows (a test keeps that file current).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import srigl
from srigl.app.datasets import CorruptDatasetError
from srigl.app.datasets.xmc import XMCIndexRangeError, XMCTokenError
from srigl.io.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, training_state
from srigl.errors import (
    CheckpointError,
    ContextLengthError,
    CheckpointMismatchError,
    InfeasibleSparsityError,
    InvalidConfigError,
    InvalidSparsityError,
    LayerTooLargeError,
    MaskError,
    MissingDependencyError,
    NoSparsifiableLayerError,
    ParameterNotInOptimizerError,
    StateDictMismatchError,
    StepOrderError,
)
from srigl.io.serialization import CorruptFileError
from srigl.kernels import IndexOutOfRangeError

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


def mlp(fan_in: int = 10, hidden: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(fan_in, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make(algorithm=srigl.SRigL, model_kw=None, **kw):
    kw.setdefault("sparsity", 0.5)
    kw.setdefault("total_steps", 100)
    return algorithm(*mlp(**(model_kw or {})), **kw)


def train_step(model, opt, sp, x=None):
    x = torch.randn(8, model[0].in_features) if x is None else x
    model(x).pow(2).mean().backward()
    opt.step()
    stats = sp.step()
    opt.zero_grad()
    return stats


# ---------------------------------------------------------------------- cases needing set-up
def _not_in_optimizer():
    model, _ = mlp()
    srigl.RigL(model, torch.optim.SGD(model[0].parameters(), lr=0.1), sparsity=0.5, total_steps=100)


def _transposed_weight_type_compact():
    # A stand-in for transformers.pytorch_utils.Conv1D (weight stored (fan_in, out)): srigl knows it
    # by its qualified class name, so this needs no transformers install. Masked storage trains it;
    # compact storage has no twin for it.
    conv1d = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
    layer = conv1d()
    layer.weight = nn.Parameter(torch.zeros(8, 24))  # (fan_in, out)
    model = nn.Sequential(layer)
    srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=100,
                compact=True, compact_types=(nn.Linear, conv1d))


def _no_sparsifiable_layer():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    srigl.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=100)


def _step_before_optimizer_step():
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    model(torch.randn(2, 10)).sum().backward()
    sp.step()


def _step_twice():
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    train_step(model, opt, sp)
    sp.step()


def _state_dict_from(source: dict, target: dict | None = None, target_model: dict | None = None):
    saved = make(**source).state_dict()
    make(model_kw=target_model, **(target or source)).load_state_dict(saved)


def _checkpoint_from_other_model():
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        model, opt = mlp()
        sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
        save_checkpoint("run/checkpoints/last.pt", training_state(model, opt, sp, epoch=3))
        model2, opt2 = mlp(hidden=32)
        sp2 = srigl.SRigL(model2, opt2, sparsity=0.5, total_steps=100)
        restore_training_state(load_checkpoint("run/checkpoints/last.pt"), model2, opt2, sp2)


def _checkpoint_other_sparsity():
    model, opt = mlp()
    state = training_state(model, opt, srigl.SRigL(model, opt, sparsity=0.5, total_steps=100))
    model2, opt2 = mlp()
    restore_training_state(state, model2, opt2, srigl.SRigL(model2, opt2, sparsity=0.8, total_steps=100))


def _corrupt_checkpoint(kind: str):
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        model, opt = mlp()
        save_checkpoint("last.pt", training_state(model, opt))
        data = Path("last.pt").read_bytes()
        if kind == "truncated":
            Path("last.pt").write_bytes(data[: len(data) // 2])
        elif kind == "bit flip":
            at = data.find(model[0].weight.detach().numpy().tobytes()[:16]) + 5  # inside a stored tensor
            Path("last.pt").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
        else:
            Path("last.pt").write_bytes(bytes((i * 37 + 11) % 256 for i in range(len(data))))
        load_checkpoint("last.pt")


class _chdir:
    """Run in a temporary directory so that paths in messages are short and stable."""

    def __init__(self, path):
        self.path, self.before = path, None

    def __enter__(self):
        self.before = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.before)


def _non_finite_at_update(value: float):
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100, delta=2)
    train_step(model, opt, sp)
    x = torch.randn(8, 10)
    x[0, 0] = value
    return train_step(model, opt, sp, x)  # step 2: an update step


# ---------------------------------------------------------------------- #14: misuse that used to pass silently
def _edited_mask_row():
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100, delta=2)
    train_step(model, opt, sp)
    model[0].weight_mask[0, :] = True
    train_step(model, opt, sp)  # step 2: an update step


def _no_backward_update():
    model, opt = mlp()
    sp = srigl.RigL(model, opt, sparsity=0.5, total_steps=100, delta=2)
    train_step(model, opt, sp)
    opt.step()
    sp.step()  # step 2, an update step, with no backward since step 1


def _replaced_parameter():
    model, opt = mlp()
    srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    opt.param_groups[0]["params"][0] = model[0].weight
    model(torch.randn(2, 10)).sum().backward()
    opt.step()


def _two_optimizer_steps():
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    opt.step()
    sp.step()


def _second_sparsifier():
    model, opt = mlp()
    srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    srigl.SRigL(model, opt, sparsity=0.8, total_steps=100)


def _several_optimizers():
    model, _ = mlp()
    optimizers = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)]
    srigl.SRigL(model, optimizers, sparsity=0.5, total_steps=100)


def _pickled_sparsifier():
    import pickle

    model, opt = mlp()
    pickle.dumps(srigl.SRigL(model, opt, sparsity=0.5, total_steps=100))


def _state_dict_masks_over_budget():
    saved = make().state_dict()
    saved["masks"]["0.weight"] = torch.ones_like(saved["masks"]["0.weight"])
    make().load_state_dict(saved)


def _dense_weights_loaded_under_masks():
    model, opt = mlp()
    srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    model.load_state_dict(mlp(seed=1)[0].state_dict())  # a dense model's weights: no mask fits them


def _copy_trained_without_its_sparsifier():
    import copy

    model, opt = mlp()
    srigl.SRigL(model, opt, sparsity=0.5, total_steps=100)
    clone = copy.deepcopy(model)  # masks are copied, the sparsifier is not
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1)
    clone(torch.randn(4, 10)).sum().backward()
    clone_opt.step()
    srigl.condense(clone)
# ---------------------------------------------------------------------- #14 io: crafted files
def _crafted_condensed(spec, tensors) -> Path:
    """``f.safetensors`` in the current directory: ``spec`` and ``tensors`` with a valid checksum."""
    import json

    from safetensors.torch import save

    from srigl.io import serialization

    metadata = {"srigl.format": serialization.FORMAT, "srigl.spec": json.dumps(spec)}
    metadata["srigl.sha256"] = serialization._digest(tensors, metadata)
    Path("f.safetensors").write_bytes(save(tensors, metadata=metadata))
    return Path("f.safetensors")


def _load_crafted(spec, tensors=None):
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        srigl.load_condensed(_crafted_condensed(spec, tensors or {"dummy": torch.zeros(1)}))


def _condensed_linear_file(active_rows):
    spec = {"type": "CondensedLinear", "children": {}, "args": {
        "in_features": 64, "out_features": 8, "fan_in": 4, "n_active": len(active_rows), "bias": True,
        "index_dtype": {"dtype": "int16"}}}
    tensors = {"values": torch.ones(len(active_rows), 4), "indices": torch.zeros(len(active_rows), 4, dtype=torch.int16),
               "active_rows": torch.tensor(active_rows), "bias": torch.zeros(8)}
    _load_crafted(spec, tensors)


def _spec_byte_flipped():
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        path = srigl.save_condensed(nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.01)), "m.safetensors")
        path.write_bytes(path.read_bytes().replace(b'negative_slope\\": 0.01', b'negative_slope\\": 0.91'))
        srigl.load_condensed(path)


def _export_negative_index():
    torch.manual_seed(0)
    linear = nn.Linear(20, 8)
    mask = torch.zeros(8, 20, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        linear.weight.mul_(mask)
    layer = srigl.condensed.CondensedLinear.from_dense(linear, mask)
    with torch.no_grad():
        layer.indices[1, 0] = -5
    with tempfile.TemporaryDirectory() as tmp:
        srigl.export_onnx(nn.Sequential(layer), torch.randn(2, 20), Path(tmp) / "m.onnx")


def _indices_written_through_data():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    mask = torch.zeros(16, 64, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        linear.weight.mul_(mask)
    layer = srigl.condensed.CondensedLinear.from_dense(linear, mask)
    x = torch.randn(200, 64)
    with torch.no_grad():
        layer(x)  # validated once
        layer.indices.data.fill_(32767)  # no version counter sees this write
        layer(x)


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def _pickle_payload_checkpoint():
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        torch.save({"format": "srigl.checkpoint", "format_version": 1, "extra": _Payload()}, "last.pt")
        load_checkpoint("last.pt")


def _malformed_rng_entry():
    model, opt = mlp()
    state = training_state(model, opt, srigl.SRigL(model, opt, sparsity=0.5, total_steps=100))
    state["rng"]["python"]["internal"] = torch.zeros(10, dtype=torch.int64)
    model2, opt2 = mlp(seed=1)
    restore_training_state(state, model2, opt2, srigl.SRigL(model2, opt2, sparsity=0.5, total_steps=100))


def _gzip_bomb_idx():
    import gzip
    import struct

    from srigl.app.datasets import read_idx

    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        header = struct.pack(">IIII", 0x00000803, 10, 28, 28)  # promises 7840 bytes
        Path("train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(1 << 24), compresslevel=1))
        read_idx("train-images-idx3-ubyte.gz")
# ---------------------------------------------------------------------- #14: the training app's run folder
def _app_config(**kw):
    from srigl.app.config import TrainConfig, resolve_config

    return resolve_config(TrainConfig(data="digits", **kw))


def _claim(run_dir: str = "run"):
    from srigl.app.run_dir import claim_run_dir

    claim_run_dir(run_dir).release()


def _run_folder_case(kind: str):
    """Set up a run folder in a temporary directory (short, stable paths), then trigger ``kind``."""
    from srigl.app.config import dumps_toml, load_config_file, resume_config
    from srigl.app.run_dir import RunLock

    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        if kind == "empty out":
            _app_config(out="")
        elif kind == "out is a file":
            Path("run").write_text("notes\n")
            _claim()
        elif kind == "out under a file":
            Path("notes").write_text("notes\n")
            _claim("notes/run")
        elif kind == "holds a run":
            Path("run/checkpoints").mkdir(parents=True)
            Path("run/config.toml").write_text("")
            Path("run/checkpoints/last.pt").write_bytes(b"")
            _claim()
        elif kind == "locked":
            Path("run").mkdir()
            held = RunLock(Path("run"))
            os.pwrite(held._fd, b"4242\n", 0)  # a stable pid in the message (the holder writes its own)
            try:
                _claim()
            finally:
                held.release()
        elif kind == "config is a folder":
            load_config_file(".")
        elif kind == "config not UTF-8":
            Path("c.toml").write_bytes(b'data = "fashion-mnist"\nmodel = "\xff"\n')
            load_config_file("c.toml")
        elif kind in ("config.toml edited", "config.toml empty"):
            config = _app_config(out="run", epochs=2)
            model, opt = mlp()
            save_checkpoint("run/checkpoints/last.pt", training_state(model, opt, config=config.to_dict()))
            text = dumps_toml(config.to_dict()).replace("epochs = 2", "epochs = 5")
            Path("run/config.toml").write_text(text if kind == "config.toml edited" else "")
            resume_config("run")
        elif kind == "condense over the checkpoint":
            from srigl.app.cli import check_condense_out

            Path("run/checkpoints").mkdir(parents=True)
            Path("run/config.toml").write_text("")
            Path("run/checkpoints/last.pt").write_bytes(b"")
            check_condense_out("run", "run/checkpoints/last.pt")


def _xmc_case(kind: str):
    """An XMC data problem met by ``srigl train --data xmc:toy --data-dir .`` (its loader, called the same way)."""
    from srigl.app.config import TrainConfig, resolve_config
    from srigl.app.datasets.xmc_sources import load_xmc

    if kind == "xmc fields on image data":
        resolve_config(TrainConfig(data="digits", xmc_hidden=64))
    with tempfile.TemporaryDirectory() as tmp, _chdir(tmp):
        Path("toy").mkdir()
        train = {"label out of range": "2 6 4\n0,3 1:0.5\n1,4 2:1 5:0.25\n",
                 "malformed token": "2 6 4\n0,3 1:0.5\n1 2=1\n"}[kind]
        Path("toy/train.txt").write_text(train)
        Path("toy/test.txt").write_text("1 6 4\n2 0:1\n")
        load_xmc("xmc:toy", "toy")


def _decoder_past_its_context():
    from srigl.app.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(vocab_size=64, context=16, dim=32, depth=1, heads=4).eval()
    with torch.no_grad():
        _, past = model(torch.zeros(1, 12, dtype=torch.long))
        model(torch.zeros(1, 6, dtype=torch.long), past)


def _decoder_past_its_cache_capacity():
    from srigl.app.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(vocab_size=64, context=16, dim=32, depth=1, heads=4).eval()
    cache = model.new_cache(1, capacity=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        model(torch.zeros(1, 3, dtype=torch.long), cache)


def _export_without_onnxscript():
    saved = sys.modules.get("onnxscript")
    sys.modules["onnxscript"] = None  # what an environment without the package looks like to import
    try:
        with tempfile.TemporaryDirectory() as tmp:
            srigl.export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), Path(tmp) / "m.onnx")
    finally:
        if saved is None:
            del sys.modules["onnxscript"]
        else:
            sys.modules["onnxscript"] = saved


@dataclass(frozen=True)
class Case:
    """One bad input: how to trigger it, what srigl does, and what the message must say."""

    input: str
    does: str
    call: Callable[[], object]
    error: type[Exception] | None  # None: a RuntimeWarning, training goes on
    match: str


def _meta_head(labels: int, storage_compact: bool):
    model = nn.Sequential(nn.Linear(4, 768), nn.Linear(768, labels, device="meta"))
    return srigl.SRigL(model, torch.optim.Adam(model.parameters()), sparsity={"0.weight": 0.0, "1.weight": 1 - 32 / 768},
                       total_steps=10, compact=storage_compact)


def _head_too_large():
    from srigl.storage import compact as compact_storage

    real = compact_storage.available_bytes
    compact_storage.available_bytes = lambda device: 16 * 2**30  # as if 16 GiB were free
    try:
        _meta_head(200_000_000, True)
    finally:
        compact_storage.available_bytes = real


def _dense_xmc_head_too_large():
    from srigl.app.xmc_train import check_dense_head_fits
    from srigl.storage import compact as compact_storage

    real = compact_storage.available_bytes
    compact_storage.available_bytes = lambda device: 2 * 2**30  # as if 2 GiB were free
    try:
        check_dense_head_fits((670_091, 768), sparse=True, optimizer="sgd", device=torch.device("cpu"))
    finally:
        compact_storage.available_bytes = real


CASES = [
    Case("meta-device head `Linear(768, 200_000_000)` at fan-in 32 with 16 GiB free", "refused before anything is "
         "allocated; names the memory it needs", _head_too_large, LayerTooLargeError,
         r"1.weight \(200000000, 768\) at fan-in 32 needs 64.00 GB on cpu .* 17.18 GB are free"),
    Case("`srigl train --data xmc:Amazon-670K` without `--compact` (a dense `(670091, 768)` head) with 2 GiB free",
         "refused before the head is allocated; names the memory it needs and `--compact`", _dense_xmc_head_too_large,
         LayerTooLargeError, r"head.weight \(670091, 768\) needs 4.63 GB \(4,631,668,992 bytes\) on cpu .* 2.15 GB "
         r"are free: train it compact"),
    Case("meta-device layer without `compact=True`", "refused: it has no values to mask", lambda: _meta_head(1000, False),
         InvalidConfigError, r"1.weight \(1000, 768\) lives on the meta device \(no values\): it can only start compact"),
    Case("HF `Conv1D` (weight stored `(in, out)`) named in `compact_types`",
         "refused at construction (it has no compact twin; masked storage trains it)", _transposed_weight_type_compact,
         InvalidConfigError, r"compact_types \['Conv1D'\]: a weight stored \(in, out\) .* trains masked-dense"),
    *[
        Case(f"`sparsity={s}`", "refused at construction", lambda s=s: make(sparsity=s), InvalidSparsityError,
             rf"sparsity must be in \[0, 1\), got {re.escape(str(float(s)))}")
        for s in (-0.1, 1.0, 1.5, math.nan)
    ],
    Case("`sparsity=\"abc\"`", "refused at construction", lambda: make(sparsity="abc"), InvalidSparsityError,
         r"sparsity must be a number in \[0, 1\), got 'abc'"),
    Case("`sparsity=0.0`", "refused: nothing to sparsify (train dense instead)", lambda: make(sparsity=0.0),
         NoSparsifiableLayerError, r"every selected tensor of Sequential is dense at sparsity 0.0"),
    Case("ERK target infeasible for constant fan-in (`Linear(3, 50)` at 0.99)", "refused; names the largest feasible sparsity",
         lambda: make(model_kw={"fan_in": 3, "hidden": 50}, sparsity=0.99), InfeasibleSparsityError,
         r"layer 0.weight \(50, 3\) would get density 0.0116, below its minimum 0.333 .*largest feasible erk sparsity is 0.7115"),
    Case("fan-in too small for the density (`Linear(3, 50)`, uniform 0.9, SRigL)", "refused; names the largest feasible sparsity",
         lambda: make(model_kw={"fan_in": 3, "hidden": 50}, sparsity=0.9, distribution="uniform"), InfeasibleSparsityError,
         r"layer 0.weight \(50, 3\) would get density 0.1, below its minimum 0.333 \(one weight per neuron\); "
         r"the largest feasible uniform sparsity is 0.6666"),
    Case("explicit map `{\"0.weight\": 0.9, ...}` on `Linear(3, 50)`, SRigL", "refused; names the layer and its minimum density",
         lambda: make(model_kw={"fan_in": 3, "hidden": 50}, sparsity={"0.weight": 0.9, "2.weight": 0.5}),
         InfeasibleSparsityError, r"layer 0.weight \(50, 3\) would get density 0.1, below its minimum 0.333 \(one weight per neuron\)"),
    Case("unknown distribution `\"gaussian\"`", "refused; lists the valid names", lambda: make(distribution="gaussian"),
         InvalidSparsityError, r"unknown sparsity distribution 'gaussian'; choose one of \['erk', 'uniform'\]"),
    Case("unknown algorithm `\"rigl2\"`", "refused; lists the valid names", lambda: srigl.get_algorithm("rigl2"),
         InvalidConfigError, r"unknown algorithm 'rigl2'; choose one of \['rigl', 'set', 'srigl', 'static'\]"),
    *[
        Case(f"`gamma_sal={g}`", "refused at construction", lambda g=g: make(gamma_sal=g), InvalidConfigError,
             rf"gamma_sal must be in \[0, 1\], got {re.escape(str(g))}")
        for g in (-0.1, 1.5, math.nan)
    ],
    *[
        Case(f"`gamma_sal={g!r}`", "refused at construction", lambda g=g: make(gamma_sal=g), InvalidConfigError,
             rf"gamma_sal must be in \[0, 1\], got {re.escape(repr(g))}")
        for g in ("abc", None)
    ],
    *[
        Case(f"`delta={d}`", "refused at construction", lambda d=d: make(delta=d), InvalidConfigError,
             rf"delta must be a positive integer, got {re.escape(str(d))}")
        for d in (0, -5, 2.5)
    ],
    Case("`alpha=1.5`", "refused at construction", lambda: make(alpha=1.5), InvalidConfigError,
         r"alpha must be in \[0, 1\], got 1.5"),
    Case("`t_end=200` with `total_steps=100`", "refused at construction", lambda: make(t_end=200), InvalidConfigError,
         r"t_end=200 is beyond total_steps=100"),
    *[
        Case(f"`{alg.__name__}` without `total_steps` (and no `t_end`)", "refused: it would never update its masks",
             lambda alg=alg: make(alg, total_steps=None), InvalidConfigError,
             rf"{alg.__name__} updates masks until t_end = 0.75 \* total_steps; pass total_steps")
        for alg in (srigl.RigL, srigl.SET, srigl.SRigL)
    ],
    *[
        Case(f"`total_steps={t}`", "refused at construction", lambda t=t: make(total_steps=t), InvalidConfigError,
             rf"total_steps must be a positive integer, got {re.escape(str(t))}")
        for t in (0, -5, 100.5)
    ],
    Case("sparse parameters missing from the optimizer", "refused; names them", _not_in_optimizer,
         ParameterNotInOptimizerError, r"1 of 2 sparse tensors are not in the optimizer: \['2.weight'\]"),
    Case("model without a sparsifiable layer", "refused; says what was looked at", _no_sparsifiable_layer,
         NoSparsifiableLayerError, r"no tensor of Sequential was selected for sparsification \(2 parameters looked at"),
    Case("`sp.step()` before any `optimizer.step()`", "refused", _step_before_optimizer_step, StepOrderError,
         r"sparsifier.step\(\) called at step 0 without optimizer.step\(\) since the last call"),
    Case("`sp.step()` twice after one `optimizer.step()`", "refused", _step_twice, StepOrderError,
         r"called at step 1 without optimizer.step\(\)"),
    *[
        Case(f"{word} gradient at a mask-update step", "update skipped, masks unchanged, training goes on",
             lambda v=v: _non_finite_at_update(v), None,
             r"non-finite dense gradients at step 2 in 2 tensors .*mask update skipped, masks unchanged")
        for word, v in (("NaN", math.nan), ("inf", math.inf))
    ],
    Case("sparsifier state dict from another model", "refused, nothing loaded",
         lambda: _state_dict_from({}, target_model={"hidden": 32}), StateDictMismatchError,
         r"saved mask shape \(20, 10\) != parameter shape \(32, 10\)"),
    Case("sparsifier state dict from another sparsity", "refused, nothing loaded",
         lambda: _state_dict_from({"sparsity": 0.5}, {"sparsity": 0.8}), StateDictMismatchError,
         r"state dict was saved with sparsity=0.5, this sparsifier has sparsity=0.8"),
    Case("sparsifier state dict from another algorithm", "refused, nothing loaded",
         lambda: _state_dict_from({"algorithm": srigl.RigL}, {"algorithm": srigl.SRigL}), StateDictMismatchError,
         r"state dict was saved with algorithm='rigl', this sparsifier has algorithm='srigl'"),
    Case("checkpoint from another model", "refused before anything is loaded; lists the names",
         _checkpoint_from_other_model, CheckpointMismatchError,
         r"checkpoint is from another model than Sequential: 3 with other shapes \[0.bias: checkpoint \[20\] vs model \[32\]"),
    Case("checkpoint from another sparsity", "refused before anything is loaded", _checkpoint_other_sparsity,
         CheckpointMismatchError, r"checkpoint was saved with sparsity=0.5, this sparsifier has sparsity=0.8"),
    Case("truncated checkpoint (first half of the file)", "refused; names the path and size",
         lambda: _corrupt_checkpoint("truncated"), CheckpointError,
         r"last.pt: cannot read checkpoint: the file is corrupt or truncated \(\d+ bytes; the zip archive has no end record"),
    Case("checkpoint with one flipped bit in a weight", "refused (torch.load alone would load it silently)",
         lambda: _corrupt_checkpoint("bit flip"), CheckpointError,
         r"last.pt: cannot read checkpoint: the file is corrupt \(\d+ bytes; record '[^']+/data/\d+' fails its CRC-32 check\)"),
    Case("checkpoint overwritten with other bytes", "refused; names the path and size",
         lambda: _corrupt_checkpoint("garbage"), CheckpointError,
         r"last.pt: cannot read checkpoint: the file is corrupt or not a checkpoint \(\d+ bytes"),
    # --- #14 core: misuse that used to pass silently
    Case("a mask row edited by hand (`weight_mask[0, :] = True`)", "refused at the next update (it would ablate most neurons)",
         _edited_mask_row, MaskError,
         r"0.weight: its mask no longer fits ConstantFanIn\(\) with budget 80 at step 2: fan-in not constant: "
         r"active neurons hold \[4, 10\] weights"),
    Case("sparsifier state dict whose masks exceed the saved budget", "refused, nothing loaded",
         _state_dict_masks_over_budget, StateDictMismatchError,
         r"0.weight: 20 active neurons with fan-in 10, but budget 80 gives them 4 each"),
    Case("`optimizer.step(); sparsifier.step()` with no backward on an update step", "update skipped, masks unchanged",
         _no_backward_update, None, r"no backward pass since the last step \(step 2\): no dense gradient to regrow by"),
    Case("a sparse parameter replaced after the sparsifier was built", "refused at the next optimizer step",
         _replaced_parameter, MaskError, r"0.weight was replaced by another Parameter after the sparsifier was built"),
    Case("two `optimizer.step()` per `sparsifier.step()`", "refused (the schedule would run at half speed)",
         _two_optimizer_steps, StepOrderError, r"2 optimizer steps since the last sparsifier.step\(\) \(at step 0\)"),
    Case("a second sparsifier on the same model", "refused (it would replace the first one's masks)",
         _second_sparsifier, InvalidConfigError, r"0.weight is already sparsified by another SRigL \(step 0\)"),
    Case("a list of optimizers", "refused; says to build one sparsifier per optimizer", _several_optimizers,
         InvalidConfigError, r"a sparsifier takes one optimizer, got a list of 2: build one sparsifier per optimizer"),
    Case("`pickle.dumps(sparsifier)`", "refused; says to save `state_dict()`", _pickled_sparsifier, TypeError,
         r"a SRigL cannot be pickled .* save sparsifier.state_dict\(\)"),
    Case("dense weights loaded with `model.load_state_dict` under a sparsifier", "refused (the masks cannot be re-derived)",
         _dense_weights_loaded_under_masks, MaskError,
         r"0.weight: the loaded weights have \d+ non-zeros outside the sparsifier's mask"),
    Case("`copy.deepcopy(model)` trained without the sparsifier, then condensed", "refused by `condense`: weights outside the copied masks",
         _copy_trained_without_its_sparsifier, MaskError, r"0.weight: \d+ weights are nonzero where the mask is False"),
    # --- #14 io
    Case("condensed file of 300 bytes whose spec declares `Linear(60000, 60000)`",
         "refused before allocating anything (the spec is built on the meta device)",
         lambda: _load_crafted({"type": "Linear", "args": {"in_features": 60000, "out_features": 60000, "bias": False},
                                "children": {}}, {"weight": torch.zeros(1)}),
         CorruptFileError, r"f.safetensors: tensors of the file's module spec disagree with the tensors stored: "
                           r"1 with other shapes \[weight: spec \(60000, 60000\), stored \(1,\)\]"),
    Case("condensed file with one flipped byte in its module spec", "refused: the checksum covers the spec",
         _spec_byte_flipped, CorruptFileError, r"m.safetensors: tensor data or header does not match the checksum"),
    Case("condensed file whose spec gives `CondensedConv2d` `groups=0`", "refused; names the argument",
         lambda: _load_crafted({"type": "CondensedConv2d", "children": {}, "args": {
             "in_channels": 2, "out_channels": 2, "kernel_size": [1, 1], "fan_in": 1, "n_active": 2, "groups": 0}}),
         CorruptFileError, r"f.safetensors: the root: CondensedConv2d argument 'groups' must be an integer >= 1, got 0"),
    Case("condensed file whose spec gives a dtype argument `{\"dtype\": \"load\"}`", "refused; nothing is looked up",
         lambda: _load_crafted({"type": "Linear", "children": {}, "args": {
             "in_features": 2, "out_features": 2, "dtype": {"dtype": "load"}}}),
         CorruptFileError, r"the root: Linear argument 'dtype': \{'dtype': 'load'\} is not a dtype"),
    Case("condensed file with repeated `active_rows`", "refused (each would overwrite the other's output)",
         lambda: _condensed_linear_file([0, 0, 0, 0]), CorruptFileError,
         r"f.safetensors: the root: active_rows repeats at position 1 \(active_rows\[0\] = 0, active_rows\[1\] = 0\)"),
    Case("ONNX export of a layer with a negative index", "refused (onnxruntime would wrap it around)",
         _export_negative_index, IndexOutOfRangeError,
         r"0: indices must lie in \[0, 20\); found min -5 .*first offender indices\[1, 0\] = -5"),
    Case("`srigl.export_onnx` without onnxscript installed", "refused before tracing; names the pip extra",
         _export_without_onnxscript, MissingDependencyError,
         r"srigl.export_onnx needs onnxscript: pip install 'srigl\[export\]' \(or pip install onnxscript\)"),
    Case("decoder given 12 cached + 6 new tokens with context 16", "refused; says how many tokens to drop",
         _decoder_past_its_context, ContextLengthError,
         r"12 cached \+ 6 new tokens = 18 exceed the context length 16: drop the oldest 2 tokens"),
    Case("decoder step past its preallocated `KVCache` (6 cached + 3 new, capacity 8)", "refused before writing; "
         "says the capacity to build", _decoder_past_its_cache_capacity, ContextLengthError,
         r"6 cached \+ 3 new tokens = 9 exceed the KVCache's capacity 8: build it with "
         r"Decoder.new_cache\(batch, capacity=9\)"),
    Case("indices overwritten through `.data` after a validated call", "refused by the kernel's own range check, "
         "never read out of bounds", _indices_written_through_data, IndexOutOfRangeError,
         r"indices must lie in \[0, 64\); found min 32767 and max 32767"),
    Case("checkpoint carrying a pickle payload (`os.system`)", "refused as unsafe; nothing runs",
         _pickle_payload_checkpoint, CheckpointError,
         r"last.pt: refused to load checkpoint as unsafe: it holds Python objects beyond tensors.*GLOBAL"),
    Case("checkpoint with a malformed Python RNG state", "refused before anything is loaded",
         _malformed_rng_entry, CheckpointError, r"checkpoint: RNG state 'python' is malformed \(ValueError"),
    Case("gzipped idx file inflating far beyond its header (a gzip bomb)", "refused after one byte past the header's promise",
         _gzip_bomb_idx, CorruptDatasetError,
         r"promises shape \(10, 28, 28\) = 7840 data bytes, but the file holds more than 7840 \(reading stopped there\)"),
    # --- #14 app
    Case("`srigl train --out \"\"` (the current folder)", "refused before anything is written",
         lambda: _run_folder_case("empty out"), InvalidConfigError, r"out must name a run folder, got ''"),
    Case("`srigl train --out FILE` (an existing file)", "refused; the file is untouched",
         lambda: _run_folder_case("out is a file"), InvalidConfigError,
         r"the run folder 'run' is an existing file; give --out a folder"),
    Case("`srigl train --out` that cannot be created (under a file, read-only)", "refused with the reason",
         lambda: _run_folder_case("out under a file"), InvalidConfigError,
         r"cannot create the run folder 'notes/run': Not a directory"),
    Case("new `srigl train` into a folder that holds a run", "refused; points to `--resume` and `--overwrite`",
         lambda: _run_folder_case("holds a run"), InvalidConfigError,
         r"'run' already holds a run \(config.toml, checkpoints/last.pt\); continue it with `srigl train --resume run`, "
         r"or pass --overwrite to replace it"),
    Case("second `srigl train` on a folder another one is writing", "refused at once; names the other process",
         lambda: _run_folder_case("locked"), InvalidConfigError,
         r"another `srigl train` \(pid 4242\) is using the run folder 'run'"),
    Case("`--config` naming a folder", "refused", lambda: _run_folder_case("config is a folder"), InvalidConfigError,
         r"config file '.' is a folder; give a TOML file"),
    Case("`--config` file that is not UTF-8", "refused; names the byte", lambda: _run_folder_case("config not UTF-8"),
         InvalidConfigError, r"config file 'c.toml' is not UTF-8 text \(byte 32: b'\\xff'\)"),
    Case("`--resume` with an edited `config.toml`", "refused; the checkpoint's config is the truth, the keys are named",
         lambda: _run_folder_case("config.toml edited"), InvalidConfigError,
         r"run/config.toml differs from the config in the checkpoint run/checkpoints/last.pt in \['epochs'\] "
         r"\(epochs: checkpoint 2, config.toml 5\)"),
    Case("`--resume` with an empty `config.toml`", "refused; says to delete it to resume from the checkpoint",
         lambda: _run_folder_case("config.toml empty"), InvalidConfigError,
         r"run/config.toml is empty; the checkpoint run/checkpoints/last.pt holds the run's config: delete "
         r"run/config.toml to resume with it"),
    Case("`srigl condense RUN --out RUN/checkpoints/last.pt`", "refused; the training checkpoint stays",
         lambda: _run_folder_case("condense over the checkpoint"), InvalidConfigError,
         r"--out 'run/checkpoints/last.pt' is the input checkpoint"),
    Case("XMC file (`--data xmc:NAME`) with a label id `>= L`", "refused; names the file, the line and the header's count",
         lambda: _xmc_case("label out of range"), XMCIndexRangeError,
         r"toy/train.txt: line 3: label 4 is not below the header's count 4"),
    Case("XMC file with a malformed `index:value` token", "refused; names the file, the line and the token",
         lambda: _xmc_case("malformed token"), XMCTokenError, r"toy/train.txt: line 3: .*2=1"),
    Case("`--xmc-hidden` (or another XMC size) with image data", "refused", lambda: _xmc_case("xmc fields on image data"),
         InvalidConfigError, r"xmc_hidden applies to XMC data \(xmc-synthetic, xmc:NAME\) only, not 'digits'"),
]


def _trigger(case: Case) -> tuple[str, str]:
    """Run a case; return (class name, message) of what it raised or warned."""
    if case.error is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.call()
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, f"{case.input}: expected one RuntimeWarning, got {[str(w.message) for w in caught]}"
        return "RuntimeWarning (no exception)", str(runtime[0].message)
    with pytest.raises(case.error) as info:
        case.call()
    return type(info.value).__name__, str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_gets_a_named_error_with_numbers(case):
    name, message = _trigger(case)
    assert re.search(case.match, message), f"{name}: {message!r} does not match {case.match!r}"


# ---------------------------------------------------------------------- behaviour beyond the message
@pytest.mark.parametrize("distribution, sparsity", [("erk", 0.99), ("uniform", 0.9)])
def test_largest_feasible_sparsity_in_the_message_really_works(distribution, sparsity):
    with pytest.raises(InfeasibleSparsityError) as info:
        make(model_kw={"fan_in": 3, "hidden": 50}, sparsity=sparsity, distribution=distribution)
    printed = float(re.search(rf"largest feasible {distribution} sparsity is ([0-9.]+)", str(info.value)).group(1))
    assert printed <= info.value.max_feasible < printed + 1e-6
    for best in (printed, info.value.max_feasible):  # the number a user copies from the message works
        sp = make(model_kw={"fan_in": 3, "hidden": 50}, sparsity=best, distribution=distribution)
        assert sp.summary()["0.weight"]["fan_in"] == 1  # one weight per neuron: exactly at the boundary
    with pytest.raises(InfeasibleSparsityError):
        make(model_kw={"fan_in": 3, "hidden": 50}, sparsity=info.value.max_feasible + 1e-3, distribution=distribution)


def test_static_and_explicit_t_end_need_no_total_steps():
    assert make(srigl.Static, total_steps=None).schedule.t_end == 0
    sp = make(srigl.RigL, total_steps=None, t_end=40, delta=2)
    assert sp.schedule.is_update_step(2) and not sp.schedule.is_update_step(40)


def _masks_valid(sp) -> None:
    """Constant fan-in over active neurons and the budget kept, for every SRigL layer."""
    for name, entry in sp.summary().items():
        if entry["sparse"]:
            assert entry["fan_in"] is not None, f"{name}: fan-in not constant"
            assert entry["nnz"] == entry["fan_in"] * entry["active_neurons"]


def _off_mask_zero(model, sp) -> None:
    for name, mask in sp.masks().items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), f"{name}: pruned weights not exactly 0"


@pytest.mark.parametrize("algorithm", [srigl.RigL, srigl.SRigL])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_gradient_at_update_step_skips_update(algorithm, bad):
    model, opt = mlp()
    sp = algorithm(model, opt, sparsity=0.5, total_steps=100, delta=2)
    train_step(model, opt, sp)
    before = sp.masks()
    x = torch.randn(8, 10)
    x[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite dense gradients at step 2"):
        stats = train_step(model, opt, sp, x)
    assert stats == {"step": 2, "skipped": True, "reason": "non-finite gradients"}
    for name, mask in sp.masks().items():
        assert torch.equal(mask, before[name])
    # The non-finite values reached the weights (nobody guarded the optimizer step), yet pruned
    # weights stay exactly zero and training goes on without an exception.
    _off_mask_zero(model, sp)
    if algorithm is srigl.SRigL:
        _masks_valid(sp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(4):
            train_step(model, opt, sp)
    _off_mask_zero(model, sp)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_guarded_loop_recovers_after_a_non_finite_update_step(bad):
    """A loop that zeroes non-finite gradients (as AMP loss scaling does) skips one update, then updates again."""
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100, delta=2)
    masks = [sp.masks()]
    for step in range(1, 7):
        x = torch.randn(8, 10)
        if step == 2:
            x[0, 0] = bad
        model(x).pow(2).mean().backward()
        for p in model.parameters():
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = sp.step()
        opt.zero_grad()
        assert len(caught) == (step == 2)
        if step % 2 == 0:
            assert stats["skipped"] if step == 2 else "layers" in stats
            masks.append(sp.masks())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])  # skipped at step 2
    assert any(not torch.equal(masks[1][n], masks[3][n]) for n in masks[0])  # updated at 4 and 6
    _masks_valid(sp)
    _off_mask_zero(model, sp)


def test_nan_at_a_non_update_step_is_harmless():
    model, opt = mlp()
    sp = srigl.SRigL(model, opt, sparsity=0.5, total_steps=100, delta=3)
    before = sp.masks()
    for step in range(1, 4):
        x = torch.randn(8, 10)
        if step == 1:
            x[0, 0] = math.nan
        model(x).pow(2).mean().backward()
        for p in model.parameters():
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning at all
            stats = sp.step()
        opt.zero_grad()
    assert "layers" in stats and not stats.get("skipped")  # the update at step 3 ran
    assert any(not torch.equal(before[n], m) for n, m in sp.masks().items())
    _masks_valid(sp)


@pytest.mark.parametrize(
    "source, target, target_model",
    [({}, None, {"hidden": 32}), ({"sparsity": 0.5}, {"sparsity": 0.8}, None),
     ({"algorithm": srigl.RigL}, {"algorithm": srigl.SRigL}, None)],
    ids=["other-model", "other-sparsity", "other-algorithm"],
)
def test_refused_state_dict_changes_nothing(source, target, target_model):
    saved = make(**source).state_dict()
    sp = make(model_kw=target_model, **(target or source))
    model = sp.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    masks, step = sp.masks(), sp.step_count
    with pytest.raises(StateDictMismatchError):
        sp.load_state_dict(saved)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(masks[n], m) for n, m in sp.masks().items()) and sp.step_count == step


# ---------------------------------------------------------------------- docs/bad_inputs.md
def render_table() -> str:
    """The markdown table of every case in ``CASES`` with the message srigl really gives."""
    lines = [
        "# Bad inputs and what srigl does with them",
        "",
        "Generated by `python tests/test_errors.py > docs/bad_inputs.md` from the real messages;",
        "`tests/test_errors.py` checks every row and that this file is current. All exceptions derive",
        "from `srigl.errors.SriglError` (and from `ValueError` or `RuntimeError` as fits).",
        "",
        "| input | what srigl does | exception | message |",
        "|---|---|---|---|",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for case in CASES:
            name, message = _trigger(case)
            message = message.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {case.input} | {case.does} | `{name}` | {message} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    assert DOC.is_file(), f"{DOC} missing: run `python tests/test_errors.py > docs/bad_inputs.md`"
    assert DOC.read_text() == render_table(), "docs/bad_inputs.md is stale: run `python tests/test_errors.py > docs/bad_inputs.md`"


if __name__ == "__main__":
    sys.stdout.write(render_table())
