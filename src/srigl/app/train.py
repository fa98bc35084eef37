"""The training application behind ``srigl train``: config, loop, metrics and the run folder.

One run = one :class:`TrainConfig`. :func:`resolve_config` checks it and fills the defaults that
depend on other fields (sparsity 0 for ``dense``, ``gamma_sal`` 0.95 for ViTs, ...); :func:`train`
runs it and writes, into ``config.out``::

    config.toml          the fully resolved config (feed it back with ``--config``)
    metrics.csv          one row per epoch
    summary.json         final metrics, per-layer summary (incl. every neuron's fan-in), costs
    checkpoints/last.pt  written every epoch and at the end; ``--resume RUN_DIR`` continues from it
    curves.png           learning curves (with ``plot=True``)
    tb/                  TensorBoard events (only when tensorboard is installed)

Reproducibility: the model is initialised from ``torch.manual_seed(seed)``, masks from the
sparsifier's own generator seeded with ``seed``, and the order (and augmentation seeds) of epoch
``e`` is a pure function of ``(seed, e)`` (:func:`epoch_order`), so a resumed run replays exactly
the batches the interrupted one would have seen.

Distributed: when ``WORLD_SIZE > 1`` (``torchrun``), the process group is initialised (gloo on CPU,
nccl on CUDA), the model is wrapped in DDP, each rank trains on its shard of the epoch's order
(the same strided split a ``DistributedSampler`` makes) and only rank 0 prints and writes files.

Only torch and srigl's core are imported at module level; data, models, tqdm, matplotlib,
TensorBoard and the checkpoint module are imported where they are used.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from srigl.app import flops
from srigl.algorithms import ALGORITHMS, SRigL, get_algorithm
from srigl.errors import InvalidConfigError, SriglError

METHODS_DENSE = "dense"
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
DISTRIBUTIONS = ("erk", "uniform")
DEVICES = ("auto", "cpu", "cuda")
# The step schedule divides the learning rate by 5 at these fractions of the post-warm-up steps
# (RigL's CIFAR recipe: /5 at 30k, 60k, 90k of 97.6k steps).
STEP_MILESTONES = (0.3, 0.6, 0.9)
STEP_FACTOR = 0.2
# gamma_sal defaults from the SRigL paper: 0.3 for CNNs and MLPs, 0.95 for ViTs.
GAMMA_SAL_DEFAULT = 0.3
GAMMA_SAL_VIT = 0.95
METRIC_COLUMNS = (
    "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "global_sparsity",
    "active_neurons", "active_neuron_fraction", "mask_churn", "seconds",
)
CHECKPOINT_NAME = "last.pt"


def methods() -> list[str]:
    """Valid ``method`` names: ``dense`` plus every registered sparse algorithm."""
    return [METHODS_DENSE, *sorted(ALGORITHMS)]


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "resolved from the other fields".

    Attributes:
        data: data set name (``srigl.app.datasets.list_datasets()``).
        data_dir: directory searched first for the data files.
        model: model name (``srigl.app.models.list_models()``).
        method: ``dense`` or a sparse algorithm (``static``, ``set``, ``rigl``, ``srigl``).
        sparsity: global target in [0, 1); None -> 0.9 for sparse methods, 0.0 for ``dense``.
        distribution: layer-wise sparsity, ``erk`` or ``uniform``.
        gamma_sal: SRigL's salient-weight threshold; None -> 0.3 (0.95 for ``vit-tiny``) for srigl.
        no_ablation: SRigL without neuron ablation (``gamma_sal = 0``).
        delta: steps between mask updates.
        alpha: initial drop fraction.
        t_end_fraction: masks stop changing after this fraction of the total steps.
        epochs: training epochs.
        batch_size: items per optimizer step (per process in a distributed run).
        optimizer: ``sgd`` (Nesterov, momentum 0.9) or ``adamw``.
        lr: peak learning rate; None -> 0.1 for SGD, 1e-3 for AdamW.
        lr_schedule: ``cosine`` (to 0), ``step`` (x0.2 at 30/60/90 %) or ``constant``, per step.
        warmup_epochs: linear warm-up from 0 to ``lr`` over this many epochs.
        weight_decay: None -> 5e-4 for SGD, 0.05 for AdamW.
        label_smoothing: cross-entropy label smoothing.
        seed: seeds the model initialisation, the masks and the data order.
        out: run folder; None -> ``runs/<data>-<model>-<method>-s<sparsity>-seed<seed>`` (see :func:`run_name`).
        limit_train: use only the first N training items (quick runs).
        limit_test: use only the first N test items.
        plot: write ``curves.png``.
        threads: ``torch.set_num_threads``; None leaves torch's default.
        progress: tqdm progress bars (only on a terminal).
        compact: train the sparse layers of srigl in compact ``(n_active, k)`` form (``srigl.compact``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        sparse_init: rescale each sparse neuron's initial weights to its sparse fan-in
            (:func:`rescale_to_sparse_fan_in`), as the SRigL reference's sparse Kaiming init does.
    """

    data: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "mlp"
    method: str = "srigl"
    sparsity: float | None = None
    distribution: str = "erk"
    gamma_sal: float | None = None
    no_ablation: bool = False
    delta: int = 100
    alpha: float = 0.3
    t_end_fraction: float = 0.75
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    weight_decay: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    out: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    plot: bool = False
    threads: int | None = None
    progress: bool = True
    compact: bool = False
    device: str = "auto"
    sparse_init: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Field values as a plain dict (``None`` included)."""
        return dataclasses.asdict(self)


# Options that only change how a run executes, not what it computes: a resumed run may change them.
RUNTIME_FIELDS = frozenset({"data_dir", "plot", "threads", "progress", "device"})


def config_fields() -> dict[str, type]:
    """``{field name: scalar type}`` of :class:`TrainConfig` (``int``, ``float``, ``str`` or ``bool``)."""
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        annotation = str(f.type)
        kinds[f.name] = next(t for t in (bool, int, float, str) if t.__name__ in annotation)
    return kinds


def config_from_mapping(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping (a parsed TOML file), checking keys and types.

    Raises:
        InvalidConfigError: an unknown key (the message lists the valid ones) or a value of the
            wrong type.
    """
    kinds = config_fields()
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise InvalidConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(kinds)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        kind = kinds[key]
        # bool is a subclass of int: refuse `epochs = true`; accept an int where a float is expected.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise InvalidConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        clean[key] = value
    return TrainConfig(**clean)


def _choice(name: str, value: str, valid: list[str] | tuple[str, ...]) -> None:
    if value not in valid:
        raise InvalidConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")


def _check_range(name: str, value: float | None, low: float, high: float, *, low_open=False, high_open=False) -> None:
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or (isinstance(value, float) and math.isnan(value)):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidConfigError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check ``config`` and fill every field that depends on the others.

    Resolving is idempotent: a resolved config (e.g. read back from ``config.toml``) resolves to
    itself.

    Raises:
        InvalidConfigError: an unknown name (the message lists the valid ones), a value out of
            range, or an impossible combination (``gamma_sal`` with a method other than srigl,
            ``no_ablation`` with ``gamma_sal > 0``, a sparsity with ``dense``, ...).
    """
    from srigl.app.datasets import list_datasets
    from srigl.app.models import list_models

    c = dataclasses.replace(config)
    _choice("data set", c.data, list_datasets())
    _choice("model", c.model, list_models())
    _choice("method", c.method, methods())
    _choice("distribution", c.distribution, DISTRIBUTIONS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("lr schedule", c.lr_schedule, LR_SCHEDULES)
    _choice("device", c.device, DEVICES)

    sparse = c.method != METHODS_DENSE
    if c.sparsity is not None:
        _check_range("sparsity", c.sparsity, 0.0, 1.0, high_open=True)
    if not sparse:
        if c.sparsity not in (None, 0.0):
            raise InvalidConfigError(
                f"method 'dense' trains no sparse weights but sparsity={c.sparsity} was given; "
                f"use a sparse method ({', '.join(sorted(ALGORITHMS))}) or drop the sparsity"
            )
        c.sparsity = 0.0
    else:
        c.sparsity = 0.9 if c.sparsity is None else c.sparsity
        if c.sparsity == 0.0:
            raise InvalidConfigError(f"method {c.method!r} needs a sparsity in (0, 1), got 0.0; use method 'dense'")

    if not has_ablation(c.method):
        if c.gamma_sal is not None:
            raise InvalidConfigError(f"gamma_sal applies to method 'srigl' only, not {c.method!r}")
        if c.no_ablation:
            raise InvalidConfigError(f"no_ablation applies to method 'srigl' only, not {c.method!r}")
    else:
        if c.no_ablation and c.gamma_sal not in (None, 0.0):
            raise InvalidConfigError(
                f"no_ablation means gamma_sal = 0 but gamma_sal={c.gamma_sal} was given; give one of them"
            )
        if c.gamma_sal is None:
            c.gamma_sal = 0.0 if c.no_ablation else (GAMMA_SAL_VIT if c.model.startswith("vit") else GAMMA_SAL_DEFAULT)
        _check_range("gamma_sal", c.gamma_sal, 0.0, 1.0)

    if c.delta < 1:
        raise InvalidConfigError(f"delta must be >= 1 step, got {c.delta}")
    _check_range("alpha", c.alpha, 0.0, 1.0)
    _check_range("t_end_fraction", c.t_end_fraction, 0.0, 1.0, low_open=True)
    for name in ("epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise InvalidConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("limit_train", "limit_test", "threads"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise InvalidConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    if not (0 <= c.warmup_epochs <= c.epochs):
        raise InvalidConfigError(f"warmup_epochs must be in [0, epochs={c.epochs}], got {c.warmup_epochs}")
    if c.lr is None:
        c.lr = 0.1 if c.optimizer == "sgd" else 1e-3
    _check_range("lr", c.lr, 0.0, math.inf, low_open=True, high_open=True)
    if c.weight_decay is None:
        c.weight_decay = 5e-4 if c.optimizer == "sgd" else 0.05
    _check_range("weight_decay", c.weight_decay, 0.0, math.inf, high_open=True)
    _check_range("label_smoothing", c.label_smoothing, 0.0, 1.0, high_open=True)
    if c.compact:
        import importlib.util

        if importlib.util.find_spec("srigl.compact") is None:
            raise InvalidConfigError("--compact is not available yet: the module srigl.compact is not installed")
        if c.method != "srigl":
            raise InvalidConfigError(f"compact training is for method 'srigl' (constant fan-in) only, not {c.method!r}")
    if c.out is None:
        c.out = str(Path("runs") / run_name(c))
    return c


def has_ablation(method: str) -> bool:
    """Whether ``method`` takes ``gamma_sal``: srigl, and any registered subclass of :class:`srigl.SRigL`."""
    cls = ALGORITHMS.get(method)
    return cls is not None and issubclass(cls, SRigL)


def run_name(config: TrainConfig) -> str:
    """A folder name that tells runs of a sweep apart: ``fashion-mnist-mlp-srigl-g0.3-s0.9-seed0``."""
    method = config.method
    if has_ablation(method):
        method += f"-g{config.gamma_sal:g}" if config.gamma_sal else "-noablation"
    return f"{config.data}-{config.model}-{method}-s{config.sparsity:g}-seed{config.seed}"


def method_label(method: str, gamma_sal: float | None) -> str:
    """Name of a method variant in tables: srigl is split by ablation on/off (``gamma_sal`` None: no such knob)."""
    if gamma_sal is None:
        return method
    if not gamma_sal:
        return f"{method} (no ablation)"
    return f"{method} (γ_sal={gamma_sal:g})"


# ------------------------------------------------------------------------------------------- TOML
def _toml_key(key: str) -> str:
    bare = key and all(ch.isalnum() or ch in "-_" for ch in key) and key.isascii()
    return key if bare else _toml_string(key)


def _toml_string(text: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest round-tripping form: "0.1", "1e-05", "5.0"
        return text if any(ch in text for ch in ".en") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def dumps_toml(values: Mapping[str, Any]) -> str:
    """A tiny TOML writer: scalars, lists of scalars, and one level of tables; ``None`` is omitted.

    The stdlib reads TOML (``tomllib``) but does not write it; this covers what srigl writes.
    """
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None and not isinstance(v, Mapping)]
    for key, table in values.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def dumps_json(value: Any, level: int = 0) -> str:
    """JSON with one key per line but every list of numbers on a single line (fan-in lists stay short)."""
    pad = " " * level
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [f"{pad} {json.dumps(str(k))}: {dumps_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        items = [f"{pad} {dumps_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, default=str, ensure_ascii=False)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (keys are checked by :func:`config_from_mapping`).

    Raises:
        InvalidConfigError: the file is missing or is not valid TOML.
    """
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InvalidConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


# ------------------------------------------------------------------------------------- schedules
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. After it, with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` in [0, 1):
    ``cosine``: ``(1 + cos(pi p)) / 2``; ``step``: ``0.2 ** (milestones <= p)`` with milestones
    0.3, 0.6, 0.9; ``constant``: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    if schedule == "step":
        return STEP_FACTOR ** sum(p >= m for m in STEP_MILESTONES)
    return 1.0


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov) or AdamW over every parameter of ``model``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor`."""
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch * config.warmup_epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.lr_schedule)
    )


def build_sparsifier(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int):
    """The sparsifier of ``config.method`` (None for ``dense``)."""
    if config.method == METHODS_DENSE:
        return None
    kwargs: dict[str, Any] = dict(
        distribution=config.distribution,
        delta=config.delta,
        alpha=config.alpha,
        t_end=int(config.t_end_fraction * total_steps),
        seed=config.seed,
    )
    if has_ablation(config.method):
        kwargs["gamma_sal"] = config.gamma_sal
        if config.compact:
            kwargs["compact"] = True
    return get_algorithm(config.method)(model, optimizer, config.sparsity, total_steps, **kwargs)


@torch.no_grad()
def rescale_to_sparse_fan_in(sparsifier) -> None:
    """Scale every sparse neuron's initial weights by ``sqrt(dense fan-in / active fan-in)``.

    The models initialise with a standard deviation proportional to ``1 / sqrt(fan_in)`` of the
    dense layer; with only ``k`` of ``fan_in`` weights active, each pre-activation then has
    ``k / fan_in`` of the intended variance and the signal vanishes at high sparsity (at 99 % a
    LeNet-5 does not train at all). Rescaling row ``i`` by ``sqrt(fan_in / k_i)`` restores it:
    the SRigL reference's sparse Kaiming init (``std = gain / sqrt(k_i)``), for any base init.
    """
    for layer in sparsifier.layers:
        values = getattr(layer.module, "values", None)
        if isinstance(values, nn.Parameter):
            # A compact layer (srigl.compact): every stored row holds exactly k = values.shape[1] weights.
            values.mul_(math.sqrt(layer.fan_in / values.shape[1]))
            continue
        rows = layer.n_rows
        counts = layer.mask.reshape(rows, -1).sum(dim=1)  # (out, fan_in) -> (out,)
        scale = torch.sqrt(layer.fan_in / counts.clamp(min=1).to(layer.param.dtype))  # (out,)
        weight = layer.param.view(rows, -1)  # (out, fan_in), a view: scales the parameter in place
        weight.mul_(scale[:, None])


# ------------------------------------------------------------------------------------------ data
def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order: a pure function of ``(seed, epoch)``."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's ``(item index, augmentation seed)`` pairs, as ``srigl.app.datasets.SeededShuffleSampler`` draws them."""
    from srigl.app.datasets import SeededShuffleSampler

    return list(SeededShuffleSampler(num_items, torch.Generator().manual_seed(epoch_seed(seed, epoch))))


def shard(order: list, rank: int, world: int) -> list:
    """This rank's part of ``order``: padded by wrapping to a multiple of ``world``, then strided.

    The same split as ``torch.utils.data.DistributedSampler`` (which would draw its own order);
    here the order comes from :func:`epoch_order` so augmentation seeds stay deterministic.
    """
    if world == 1:
        return order
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def batches(dataset, order: list[tuple[int, int]], batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``dataset`` in ``order``.

    An in-memory ``ImageDataset`` without augmentation is gathered a whole batch at a time
    (about 10x faster than item by item, with the same values); anything else goes through a
    ``DataLoader`` whose sampler is ``order``.
    """
    from srigl.app.datasets import ImageDataset, Normalize

    if isinstance(dataset, ImageDataset) and dataset.transform is None:
        normalize = Normalize(dataset.info.mean, dataset.info.std)
        indices = torch.tensor([i for i, _ in order], dtype=torch.long)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            images = dataset.images[idx]  # (B, C, H, W)
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield normalize(images), dataset.labels[idx]
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers)


# --------------------------------------------------------------------------------- distributed
@dataclass
class Process:
    """Where this process runs: its rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this run initialised the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_process(device: str = "auto") -> Process:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else run alone."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("device 'cuda' was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Process(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Process(dist.get_rank(), dist.get_world_size(), dev, owns_group)


def _all_sum(values: list[float], proc: Process) -> list[float]:
    if proc.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=proc.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, label_smoothing: float = 0.0) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``dataset`` in its stored order."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    order = [(i, 0) for i in range(len(dataset))]
    for images, labels in batches(dataset, order, batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing).double()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    model.train(was_training)
    return float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


def neuron_totals(model: nn.Module, sparsifier, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(active, total)`` output neurons over the sparse layers (over every counted layer when dense).

    A neuron is active when it has at least one active incoming weight.
    """
    if sparsifier is not None:
        entries = [e for e in sparsifier.summary().values() if e["sparse"] and "neurons" in e]
        return sum(e["active_neurons"] for e in entries), sum(e["neurons"] for e in entries)
    costs = [c for c in flops.count_costs(model, input_shape) if c.neurons]
    return sum(c.active_neurons for c in costs), sum(c.neurons for c in costs)


def layer_report(model: nn.Module, sparsifier, input_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Per weight tensor: the sparsifier's summary (when sparse), its costs, and every neuron's fan-in."""
    base = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    summary = sparsifier.summary() if sparsifier is not None else {}
    report: dict[str, dict[str, Any]] = {}
    for cost in flops.count_costs(base, input_shape):
        entry: dict[str, Any] = {k: v for k, v in cost.as_dict().items() if k != "name"}
        info = summary.get(cost.name)
        if info is not None:
            entry.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items() if k not in ("numel", "nnz")})
        else:
            entry.setdefault("sparse", False)
        entry["sparsity"] = 1.0 - cost.params / cost.params_dense if cost.params_dense else 0.0
        if cost.neurons:
            module_name, _, param_name = cost.name.rpartition(".")
            module = base.get_submodule(module_name) if module_name else base
            entry["fan_in_counts"] = flops.fan_in_counts(module, param_name)
        report[cost.name] = entry
    return report


class MetricsLog:
    """``metrics.csv`` (and TensorBoard events when available), one row per epoch."""

    def __init__(self, run_dir: Path, keep_epochs: int = 0):
        self.path = run_dir / "metrics.csv"
        rows = []
        if keep_epochs and self.path.exists():
            # A resumed run keeps the rows of the epochs its checkpoint covers and drops the rest.
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= keep_epochs]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.rows: list[dict[str, Any]] = [{k: float(v) for k, v in r.items()} for r in rows]
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is optional
            pass

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one epoch's row."""
        self.rows.append(dict(row))
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=METRIC_COLUMNS).writerow({k: row[k] for k in METRIC_COLUMNS})
        if self.tensorboard is not None:
            for key in METRIC_COLUMNS[2:]:
                self.tensorboard.add_scalar(key, row[key], int(row["step"]))
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(rows: list[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Loss, accuracy and active-neuron curves per epoch as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    axes[1].plot(epochs, [100 * r["test_acc"] for r in rows], "s-", label="test")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    axes[2].plot(epochs, [100 * r["active_neuron_fraction"] for r in rows], "o-", label="active neurons")
    axes[2].plot(epochs, [100 * r["global_sparsity"] for r in rows], "s-", label="global sparsity")
    axes[2].set(xlabel="epoch", ylabel="%", title="sparsity and active neurons")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(summary: Mapping[str, Any]) -> str:
    """The final report printed at the end of a run: totals, then one line per weight tensor."""
    final = summary["final"]
    lines = [
        f"run {summary['config']['out']}: {summary['label']} on {summary['config']['data']} / {summary['config']['model']}",
        f"test accuracy {100 * final['test_acc']:.2f} %   test loss {final['test_loss']:.4f}   "
        f"global sparsity {100 * final['global_sparsity']:.2f} %   "
        f"active neurons {final['active_neurons']}/{final['neurons']} ({100 * final['active_neuron_fraction']:.1f} %)",
        f"weights {flops.human(final['params'])} of {flops.human(final['params_dense'])} dense "
        f"({final['params'] / max(final['params_dense'], 1):.3f}x); "
        f"MACs/forward {flops.human(final['macs'])} of {flops.human(final['macs_dense'])} "
        f"({final['macs'] / max(final['macs_dense'], 1):.3f}x); all parameters {flops.human(final['all_params'])} "
        f"of {flops.human(final['all_params_dense'])}",
        "",
    ]
    header = ("layer", "shape", "sparsity", "fan-in", "neurons", "weights", "dense", "MACs", "dense MACs")
    rows = []
    for name, e in summary["layers"].items():
        fan_in = e.get("fan_in")
        if fan_in is None and e.get("mean_fan_in") is not None:
            fan_in = f"~{e['mean_fan_in']:.1f}"
        rows.append((
            name,
            "x".join(str(s) for s in e["shape"]) or "-",
            f"{100 * e['sparsity']:.1f} %",
            "dense" if not e.get("sparse") else str(fan_in),
            f"{e['active_neurons']}/{e['neurons']}" if e["neurons"] else "-",
            flops.human(e["params"]),
            flops.human(e["params_dense"]),
            flops.human(e["macs"]),
            flops.human(e["macs_dense"]),
        ))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the run
class TrainingInterrupted(SriglError):
    """Training was interrupted; a checkpoint to resume from was written (its path is in the message)."""


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def train(config: TrainConfig, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Run one training run and write its folder (see the module docstring).

    Args:
        config: the run; resolved with :func:`resolve_config` first.
        resume: continue from ``<config.out>/checkpoints/last.pt``.
        log: where progress lines go (rank 0 only).

    Returns:
        The run's summary (what ``summary.json`` holds); None on ranks other than 0.

    Raises:
        InvalidConfigError: see :func:`resolve_config`.
        TrainingInterrupted: on Ctrl-C, after writing a checkpoint to resume from.
    """
    from srigl.app.datasets import make_loaders
    from srigl.app.models import create_model

    cfg = resolve_config(config)
    proc = init_process(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    say = log if proc.main else (lambda *a, **k: None)

    train_loader, test_loader, info = make_loaders(
        cfg.data, cfg.data_dir, batch_size=cfg.batch_size, seed=cfg.seed,
        limit_train=cfg.limit_train, limit_test=cfg.limit_test,
    )
    train_set, test_set = train_loader.dataset, test_loader.dataset
    items_per_rank = math.ceil(len(train_set) / proc.world)
    steps_per_epoch = math.ceil(items_per_rank / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    input_shape = info.input_shape

    torch.manual_seed(cfg.seed)
    base: nn.Module = create_model(cfg.model, info.in_channels, info.image_size, info.num_classes).to(proc.device)
    optimizer = build_optimizer(cfg, base)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    # The sparsifier comes before DDP: the compact engine swaps modules and parameters, and DDP must
    # capture the final ones. Every rank draws the same masks (same seed), so replicas stay equal.
    sparsifier = build_sparsifier(cfg, base, optimizer, total_steps)
    if sparsifier is not None and cfg.sparse_init:
        rescale_to_sparse_fan_in(sparsifier)
    model = base
    if proc.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [proc.device.index] if proc.device.type == "cuda" else None
        if cfg.compact:
            # Compact values change shape when ablation changes a layout: the sparsifier keeps them
            # out of DDP and averages their gradients itself (CompactSRigL.wrap_ddp).
            model = sparsifier.wrap_ddp(device_ids=device_ids)
        else:
            model = DistributedDataParallel(base, device_ids=device_ids)

    start_epoch, start_batch, step = 0, 0, 0
    carry = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "grown": 0.0, "seconds": 0.0}
    from srigl import checkpoint

    if resume:
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            raise InvalidConfigError(f"nothing to resume: no checkpoint in {ckpt_dir}")
        state = checkpoint.load_checkpoint(latest, map_location=proc.device)
        extra = checkpoint.restore_training_state(state, model, optimizer, sparsifier, scheduler)
        start_epoch, start_batch, step = int(extra["epoch"]), int(extra["batch"]), int(extra["step"])
        carry = {k: float(v) for k, v in extra.get("partial", carry).items()}
        if start_epoch >= cfg.epochs:
            say(f"{run_dir} already finished all {cfg.epochs} epochs ({latest}); rewriting its summary")
        else:
            say(f"resuming {run_dir} from {latest}: epoch {start_epoch + 1}/{cfg.epochs}, batch {start_batch}, step {step}")
    elif proc.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if proc.main:
        (run_dir / "config.toml").write_text(dumps_toml(cfg.to_dict()))
    metrics = MetricsLog(run_dir, keep_epochs=start_epoch if resume else 0) if proc.main else None

    def save(epoch: int, batch: int, partial: Mapping[str, float]) -> Path | None:
        if not proc.main:
            return None
        state = checkpoint.training_state(
            model, optimizer, sparsifier, scheduler,
            epoch=epoch, batch=batch, step=step, partial=dict(partial), config=cfg.to_dict(),
        )
        path = ckpt_dir / CHECKPOINT_NAME
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_checkpoint(path, state)
        return path

    show = cfg.progress and proc.main and sys.stderr.isatty()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    say(
        f"training {cfg.model} on {cfg.data} ({len(train_set)} train / {len(test_set)} test items), "
        f"{method_label(cfg.method, cfg.gamma_sal)} at sparsity {cfg.sparsity:g}, {cfg.epochs} epochs x "
        f"{steps_per_epoch} steps, device {proc.device}" + (f", {proc.world} processes" if proc.world > 1 else "")
    )
    epoch_bar = _progress(range(start_epoch, cfg.epochs), show, desc="epochs", initial=start_epoch, total=cfg.epochs)
    for epoch in epoch_bar:
        skip = start_batch if epoch == start_epoch else 0
        if skip == 0:
            carry = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "grown": 0.0, "seconds": 0.0}
        started = time.perf_counter()
        order = shard(epoch_order(len(train_set), cfg.seed, epoch), proc.rank, proc.world)
        # Skipping already-trained batches of a resumed epoch costs nothing: the order is sliced.
        stream = batches(train_set, order[skip * cfg.batch_size :], cfg.batch_size)
        bar = _progress(stream, show, desc=f"epoch {epoch + 1}", total=steps_per_epoch, initial=skip, leave=False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=proc.device)
        correct = torch.zeros((), dtype=torch.long, device=proc.device)
        seen, grown, batch_index = 0, 0, skip
        try:
            for images, labels in bar:
                images, labels = images.to(proc.device), labels.to(proc.device)
                logits = model(images)
                loss = criterion(logits, labels)
                loss.backward()
                optimizer.step()
                stats = sparsifier.step() if sparsifier is not None else None
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_index += 1
                loss_sum += loss.detach().double() * len(labels)
                correct += (logits.detach().argmax(dim=1) == labels).sum()
                seen += len(labels)
                if stats and "layers" in stats:
                    grown += sum(layer["grown"] for layer in stats["layers"].values())
                if show and batch_index % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        except KeyboardInterrupt:
            partial = {
                "loss_sum": carry["loss_sum"] + float(loss_sum), "correct": carry["correct"] + int(correct),
                "seen": carry["seen"] + seen, "grown": carry["grown"] + grown,
                "seconds": carry["seconds"] + time.perf_counter() - started,
            }
            path = save(epoch, batch_index, partial)
            if metrics is not None:
                metrics.close()
            raise TrainingInterrupted(
                f"interrupted at epoch {epoch + 1}, batch {batch_index}, step {step}; "
                + (f"checkpoint {path}" if path else "rank 0 writes the checkpoint")
                + f"; continue with `srigl train --resume {run_dir}`"
            ) from None
        totals = _all_sum([carry["loss_sum"] + float(loss_sum), carry["correct"] + int(correct), carry["seen"] + seen], proc)
        train_loss, train_acc = totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)
        if proc.main:
            # Evaluation, metrics and files are rank 0's job; the other ranks go on to the next epoch.
            test_loss, test_acc = evaluate(base, test_set, cfg.batch_size, proc.device, cfg.label_smoothing)
            active, neurons = neuron_totals(base, sparsifier, input_shape)
            n_active_weights = sum(int(m.sum()) for m in sparsifier.masks().values()) if sparsifier is not None else 0
            grown_total = carry["grown"] + grown
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "global_sparsity": sparsifier.global_sparsity() if sparsifier is not None else 0.0,
                "active_neurons": active,
                "active_neuron_fraction": active / max(neurons, 1),
                "mask_churn": grown_total / n_active_weights if n_active_weights else 0.0,
                "seconds": carry["seconds"] + time.perf_counter() - started,
            }
            if metrics is not None:
                metrics.append(row)
            message = (
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f} acc {100 * train_acc:.2f} %, "
                f"test loss {test_loss:.4f} acc {100 * test_acc:.2f} %, active neurons {active}/{neurons}, "
                f"churn {row['mask_churn']:.3f}, {row['seconds']:.1f} s"
            )
            if show:
                epoch_bar.write(message)
            else:
                say(message)
        save(epoch + 1, 0, {k: 0.0 for k in carry})

    summary = None
    if proc.main:
        summary = _finish(cfg, base, sparsifier, input_shape, metrics, run_dir, total_steps, steps_per_epoch, step, proc)
        metrics.close()
    if proc.world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank leaves before rank 0 has written the run folder
        if proc.owns_group:
            dist.destroy_process_group()
    return summary


def _finish(cfg, model, sparsifier, input_shape, metrics, run_dir, total_steps, steps_per_epoch, step, proc) -> dict[str, Any]:
    """Build the summary; on rank 0 write summary.json and the plot."""
    rows = metrics.rows if metrics is not None else []
    last = rows[-1] if rows else {}
    layers = layer_report(model, sparsifier, input_shape)
    costs = flops.total(flops.count_costs(model, input_shape))
    all_dense, all_active = flops.count_parameters(model)
    active, neurons = neuron_totals(model, sparsifier, input_shape)
    summary = {
        "label": method_label(cfg.method, cfg.gamma_sal),
        "config": cfg.to_dict(),
        "run": {
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "steps_done": step,
            "t_end": sparsifier.schedule.t_end if sparsifier is not None else None,
            "world_size": proc.world,
            "torch": torch.__version__,
            "seconds": sum(r["seconds"] for r in rows),
            "sparsifier": sparsifier.config() if sparsifier is not None else None,
        },
        "final": {
            "epoch": int(last.get("epoch", 0)),
            "test_acc": last.get("test_acc"),
            "test_loss": last.get("test_loss"),
            "train_acc": last.get("train_acc"),
            "train_loss": last.get("train_loss"),
            "global_sparsity": sparsifier.global_sparsity() if sparsifier is not None else 0.0,
            "active_neurons": active,
            "neurons": neurons,
            "active_neuron_fraction": active / max(neurons, 1),
            "all_params_dense": all_dense,
            "all_params": all_active,
            **costs,
        },
        "layers": layers,
    }
    if proc.main:
        (run_dir / "summary.json").write_text(dumps_json(summary) + "\n")
        if cfg.plot and rows:
            plot_curves(rows, run_dir / "curves.png", f"{summary['label']} {cfg.model} {cfg.data} s={cfg.sparsity:g}")
    return summary


def load_trained_model(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The masked-dense model saved in a ``srigl train`` checkpoint, with its ``<param>_mask`` buffers.

    Works for both engines: a compact run (``--compact``) is rebuilt as it trained, loaded, and
    turned back into masked-dense layers (``srigl.compact.to_masked_dense``).

    Args:
        path: a checkpoint file or a run folder.

    Returns:
        ``(model, config)``; the model is on the CPU in eval mode.

    Raises:
        InvalidConfigError: no checkpoint there, or one that ``srigl train`` did not write.
        srigl.errors.CheckpointError: the file is damaged.
    """
    from srigl.checkpoint import latest_checkpoint, load_checkpoint
    from srigl.app.datasets import dataset_info
    from srigl.app.models import create_model

    found = latest_checkpoint(path)
    if found is None:
        raise InvalidConfigError(f"no checkpoint at {str(path)!r}")
    state = load_checkpoint(found)
    saved = state.get("extra", {}).get("config")
    if saved is None:
        raise InvalidConfigError(f"{found} has no run config in its 'extra' entry; it was not written by `srigl train`")
    config = config_from_mapping({k: v for k, v in saved.items() if v is not None}, str(found))
    info = dataset_info(config.data)
    model = create_model(config.model, info.in_channels, info.image_size, info.num_classes)
    if state.get("sparsifier") is not None:
        # Rebuild the sparsifier as it trained so that the masks (or compact layouts) land where
        # they belong; its schedule does not matter here.
        total_steps = int(state["sparsifier"]["config"]["total_steps"])
        sparsifier = build_sparsifier(config, model, build_optimizer(config, model), total_steps)
        sparsifier.load_state_dict(state["sparsifier"])
        model.load_state_dict(state["model"])
        sparsifier.remove_hooks()
        if config.compact:
            from srigl.compact import to_masked_dense

            to_masked_dense(model)
    else:
        model.load_state_dict(state["model"])
    return model.eval(), config


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``run_dir`` (its ``config.toml``), with runtime options overridden.

    Raises:
        InvalidConfigError: no ``config.toml`` there, or an override that would change what the
            run computes (only ``data_dir``, ``plot``, ``threads``, ``progress`` and ``device`` may change).
    """
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise InvalidConfigError(f"cannot resume {str(run_dir)!r}: no config.toml there")
    values = load_config_file(path)
    overrides = dict(overrides or {})
    changed = sorted(set(overrides) - RUNTIME_FIELDS)
    if changed:
        raise InvalidConfigError(
            f"--resume continues the run with its own config; cannot change {changed} "
            f"(only {sorted(RUNTIME_FIELDS)} may be given)"
        )
    values.update(overrides)
    values["out"] = str(run_dir)
    return config_from_mapping(values, str(path))
