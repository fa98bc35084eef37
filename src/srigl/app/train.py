"""The training run behind ``srigl train``: builders, the loop, resume, and the trained model.

:func:`train` runs one resolved :class:`srigl.app.config.TrainConfig` and writes, into ``config.out``::

    .srigl.lock          held while a ``srigl train`` writes the folder (see srigl.app.run_dir)
    config.toml          the fully resolved config (feed it back with ``--config``)
    metrics.csv          one row per epoch
    summary.json         final metrics, per-layer summary (incl. every neuron's fan-in), costs
    checkpoints/last.pt  written every epoch and at the end; ``--resume RUN_DIR`` continues from it
    curves.png           learning curves (with ``plot=True``)
    tb/                  TensorBoard events (only when tensorboard is installed)

Reproducibility: the model is initialised from ``torch.manual_seed(seed)``, masks from the
sparsifier's own generator seeded with ``seed``, and the order (and augmentation seeds) of epoch
``e`` is a pure function of ``(seed, e)`` (:func:`srigl.app.datasets.epoch_order`), so a resumed
run replays exactly the batches the interrupted one would have seen.

Nothing lost: a new run refuses a folder that holds a run (``--resume`` continues it,
``--overwrite`` replaces it) and a folder another ``srigl train`` is writing; files are written
atomically; SIGINT (Ctrl-C) and SIGTERM stop the run between two whole steps, after which a
checkpoint of that exact state is written and :class:`TrainingInterrupted` raised (exit status 130
or 143), so that ``--resume`` continues bit for bit. A second signal while that checkpoint is
written is ignored: the save completes.

Distributed: when ``WORLD_SIZE > 1`` (``torchrun``), the process group is initialised (gloo on CPU,
nccl on CUDA) with a timeout (``dist_timeout``), so that a frozen rank ends the run in bounded
time; the ranks compare their configs and initial masks (and the masks after every update) and
stop with :class:`srigl.errors.ReplicaDivergenceError` when they differ; the model is wrapped in
DDP, each rank trains on its shard of the epoch's order (the same strided split a
``DistributedSampler`` makes) and only rank 0 prints and writes files.

Only torch and srigl's core (and the app's config, metrics and FLOP modules) are imported at module
level; data, models, tqdm, matplotlib, TensorBoard and the checkpoint module are imported where
they are used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from srigl.algorithms import get_algorithm
from srigl.app import flops
from srigl.app.config import (
    METHODS_DENSE,
    NOT_COMPARED,
    TrainConfig,
    config_differences,
    config_from_mapping,
    dumps_json,
    dumps_toml,
    has_ablation,
    method_label,
    resolve_config,
)
from srigl.app.metrics import MetricsLog, evaluate, layer_report, neuron_totals, plot_curves
from srigl.app.run_dir import StopSignals, claim_run_dir
from srigl.errors import InvalidConfigError, ReplicaDivergenceError, SriglError

# The step schedule divides the learning rate by 5 at these fractions of the post-warm-up steps
# (RigL's CIFAR recipe: /5 at 30k, 60k, 90k of 97.6k steps).
STEP_MILESTONES = (0.3, 0.6, 0.9)
STEP_FACTOR = 0.2
CHECKPOINT_NAME = "last.pt"


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
        sparse_init=config.sparse_init,
    )
    if has_ablation(config.method):
        kwargs["gamma_sal"] = config.gamma_sal
    if config.compact:
        kwargs["compact"] = True
    return get_algorithm(config.method)(model, optimizer, config.sparsity, total_steps, **kwargs)


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


def init_process(device: str = "auto", timeout: float = 300.0) -> Process:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else run alone.

    ``timeout`` (seconds) bounds every collective: a rank that stops answering (frozen, not dead)
    makes the others fail after that long instead of gloo's default 30 minutes.
    """
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
        from datetime import timedelta

        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Process(dist.get_rank(), dist.get_world_size(), dev, owns_group)


def _all_sum(values: list[float], proc: Process) -> list[float]:
    if proc.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=proc.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _check_ranks_agree(cfg: TrainConfig, proc: Process, setup_error: InvalidConfigError | None) -> None:
    """Raise on every rank when the ranks' configs differ, or when rank 0 could not claim the run folder.

    One collective: every rank contributes the fields that define the run (runtime options and
    ``out`` aside) and rank 0 its set-up error, so that all ranks stop together instead of the
    others waiting for rank 0 until the timeout.
    """
    if proc.world == 1:
        if setup_error is not None:
            raise setup_error
        return
    import torch.distributed as dist

    mine = {k: v for k, v in cfg.to_dict().items() if k not in NOT_COMPARED}
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    gathered: list[Any] = [None] * proc.world
    dist.all_gather_object(gathered, (digest, mine, None if setup_error is None else str(setup_error)))
    if setup_error is not None:
        raise setup_error
    if gathered[0][2] is not None:
        raise InvalidConfigError(f"rank 0 cannot start the run: {gathered[0][2]}")
    differing = {}
    for other, (other_digest, values, _) in enumerate(gathered):
        if other_digest != gathered[0][0]:
            for name, (a, b) in config_differences(gathered[0][1], values).items():
                differing.setdefault(name, []).append(f"rank {other}: {b!r}")
    if differing:
        listed = "; ".join(f"{name} (rank 0: {gathered[0][1].get(name)!r}, {', '.join(v)})" for name, v in differing.items())
        raise ReplicaDivergenceError(
            f"the ranks were started with different configs (world size {proc.world}): {listed}; "
            "give every rank the same settings"
        )


# ------------------------------------------------------------------------------------- the run
class RankTimeout(SriglError, RuntimeError):
    """A distributed run stopped because a rank did not answer within ``dist_timeout`` seconds."""


class TrainingInterrupted(SriglError):
    """Training was stopped by a signal; a checkpoint to resume from was written (its path is in the message).

    Attributes:
        signal_number: the signal (``signal.SIGINT`` or ``signal.SIGTERM``); the CLI exits with
            ``128 + signal_number`` as shells do (130, 143).
    """

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = int(signal_number)


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from srigl._optional import require

    return require("tqdm.auto", "the training progress bar").tqdm(iterable, **kwargs)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Run one training run and write its folder (see the module docstring).

    Args:
        config: the run; resolved with :func:`resolve_config` first.
        resume: continue from ``<config.out>/checkpoints/last.pt``.
        overwrite: a new run may replace the run that ``config.out`` holds (its files are deleted
            first); without it such a folder is refused.
        log: where progress lines go (rank 0 only).

    Returns:
        The run's summary (what ``summary.json`` holds); None on ranks other than 0.

    Raises:
        InvalidConfigError: see :func:`resolve_config`; also ``config.out`` holds a run (and neither
            ``resume`` nor ``overwrite`` is set), is a file, cannot be written, is used by another
            ``srigl train``, or (``resume``) the checkpoint was trained with another config.
        ReplicaDivergenceError: distributed ranks with different configs or masks.
        RankTimeout: a distributed rank did not answer within ``config.dist_timeout`` seconds.
        TrainingInterrupted: on SIGINT or SIGTERM, after writing a checkpoint to resume from.
    """
    cfg = resolve_config(config)
    proc = init_process(cfg.device, cfg.dist_timeout)
    with ExitStack() as cleanup:
        stop = cleanup.enter_context(StopSignals())
        setup_error = None
        if proc.main:
            try:
                cleanup.callback(claim_run_dir(cfg.out, resume=resume, overwrite=overwrite).release)
            except InvalidConfigError as error:
                setup_error = error
        _check_ranks_agree(cfg, proc, setup_error)
        try:
            return _run(cfg, proc, resume, stop, log)
        except RuntimeError as error:
            # gloo: "Timed out waiting 5000ms for recv operation"; NCCL's watchdog reports "timeout".
            if proc.world == 1 or isinstance(error, SriglError) or "timed out" not in str(error).lower():
                raise
            raise RankTimeout(
                f"rank {proc.rank}: another rank did not answer within {cfg.dist_timeout:g} s (--dist-timeout); "
                f"it is frozen, dead or far slower ({str(error).splitlines()[0]})"
            ) from error


def _stop_requested(stop: StopSignals, proc: Process) -> bool:
    # Every rank must stop after the same step (a rank that went on would wait for the others in
    # DDP's all-reduce), so in a distributed run the ranks agree: one small all-reduce per step.
    if proc.world == 1:
        return stop.received is not None
    from srigl.distributed import any_rank

    (stop_now,) = any_rank(stop.received is not None)
    return stop_now


def _check_masks(sparsifier, proc: Process, when: str) -> None:
    if sparsifier is not None and proc.world > 1:
        from srigl.distributed import check_replicas_in_sync

        check_replicas_in_sync(sparsifier.masks(), f"masks ({when})")


def _run(cfg: TrainConfig, proc: Process, resume: bool, stop: StopSignals, log) -> dict[str, Any]:
    from srigl.app import datasets
    from srigl.app.models import create_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    say = log if proc.main else (lambda *a, **k: None)

    train_loader, test_loader, info = datasets.make_loaders(
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
    # capture the final ones. Every rank draws the same masks (same seed), so replicas stay equal;
    # checked before DDP, whose start-up broadcast would silently impose rank 0's mask buffers.
    sparsifier = build_sparsifier(cfg, base, optimizer, total_steps)  # rescales to sparse fan-in (sparse_init)
    _check_masks(sparsifier, proc, "at start")
    model = base
    if proc.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [proc.device.index] if proc.device.type == "cuda" else None
        if cfg.compact:
            # Compact values change shape when ablation changes a layout: the sparsifier keeps them
            # out of DDP and averages their gradients itself (Sparsifier.wrap_ddp).
            model = sparsifier.wrap_ddp(device_ids=device_ids)
        else:
            model = DistributedDataParallel(base, device_ids=device_ids)

    start_epoch, start_batch, step = 0, 0, 0
    carry = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "grown": 0.0, "seconds": 0.0}
    from srigl.io import checkpoint
    from srigl.io.atomic import atomic_write

    if resume:
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            raise InvalidConfigError(f"nothing to resume: no checkpoint in {ckpt_dir}")
        state = checkpoint.load_checkpoint(latest, map_location=proc.device)
        saved = state.get("extra", {}).get("config") or {}
        differences = config_differences(saved, cfg.to_dict())
        if differences:
            listed = "; ".join(f"{k}: checkpoint {a!r}, given {b!r}" for k, (a, b) in differences.items())
            raise InvalidConfigError(f"cannot resume {latest} with another config: {listed}")
        extra = checkpoint.restore_training_state(state, model, optimizer, sparsifier, scheduler)
        start_epoch, start_batch, step = int(extra["epoch"]), int(extra["batch"]), int(extra["step"])
        carry = {k: float(v) for k, v in extra.get("partial", carry).items()}
        if start_epoch >= cfg.epochs:
            say(f"{run_dir} already finished all {cfg.epochs} epochs ({latest}); rewriting its summary")
        else:
            say(f"resuming {run_dir} from {latest}: epoch {start_epoch + 1}/{cfg.epochs}, batch {start_batch}, step {step}")
    if proc.main:
        text = dumps_toml(cfg.to_dict())
        toml = run_dir / "config.toml"
        if not toml.exists() or toml.read_bytes() != text.encode():
            atomic_write(toml, lambda file: file.write(text.encode()))
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

    def interrupted(where: str, path: Path | None) -> TrainingInterrupted:
        if metrics is not None:
            metrics.close()
        signum = stop.received if stop.received is not None else signal.SIGINT  # another rank's signal
        return TrainingInterrupted(
            f"interrupted by {signal.Signals(signum).name} {where}, step {step}; "
            + (f"checkpoint {path}" if path else "rank 0 writes the checkpoint")
            + f"; continue with `srigl train --resume {run_dir}`",
            signum,
        )

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
        order = datasets.shard(datasets.epoch_order(len(train_set), cfg.seed, epoch), proc.rank, proc.world)
        # Skipping already-trained batches of a resumed epoch costs nothing: the order is sliced.
        stream = datasets.batches(train_set, order[skip * cfg.batch_size :], cfg.batch_size)
        bar = _progress(stream, show, desc=f"epoch {epoch + 1}", total=steps_per_epoch, initial=skip, leave=False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=proc.device)
        correct = torch.zeros((), dtype=torch.long, device=proc.device)
        seen, grown, batch_index = 0, 0, skip
        cut = False
        for images, labels in bar:
            # A signal is acted on here only, between two whole steps (optimizer, sparsifier and
            # scheduler steps and the counters all done): the checkpoint is then exactly a state
            # the uninterrupted run passes through. The batch just fetched is fetched again on resume.
            if _stop_requested(stop, proc):
                cut = True
                break
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
            if stats is not None:
                _check_masks(sparsifier, proc, f"after the update at step {step}")
            if stats and "layers" in stats:
                grown += sum(layer["grown"] for layer in stats["layers"].values())
            if show and batch_index % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if cut:
            partial = {
                "loss_sum": carry["loss_sum"] + float(loss_sum), "correct": carry["correct"] + int(correct),
                "seen": carry["seen"] + seen, "grown": carry["grown"] + grown,
                "seconds": carry["seconds"] + time.perf_counter() - started,
            }
            raise interrupted(f"at epoch {epoch + 1}, batch {batch_index}", save(epoch, batch_index, partial))
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
        path = save(epoch + 1, 0, {k: 0.0 for k in carry})
        if epoch + 1 < cfg.epochs and _stop_requested(stop, proc):
            # A signal during the last step, the evaluation or the save: the epoch's checkpoint is the one.
            raise interrupted(f"after epoch {epoch + 1}", path)

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
        from srigl.io.atomic import atomic_write

        text = dumps_json(summary) + "\n"
        atomic_write(run_dir / "summary.json", lambda file: file.write(text.encode()))
        if cfg.plot and rows:
            plot_curves(rows, run_dir / "curves.png", f"{summary['label']} {cfg.model} {cfg.data} s={cfg.sparsity:g}")
    return summary


def load_trained_model(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The masked-dense model saved in a ``srigl train`` checkpoint, with its ``<param>_mask`` buffers.

    Works for both engines: a compact run (``--compact``) is rebuilt as it trained, loaded, and
    turned back into masked-dense layers (``srigl.condensed.twins.to_masked_dense``).

    Args:
        path: a checkpoint file or a run folder.

    Returns:
        ``(model, config)``; the model is on the CPU in eval mode.

    Raises:
        InvalidConfigError: no checkpoint there, or one that ``srigl train`` did not write.
        srigl.errors.CheckpointError: the file is damaged.
    """
    from srigl.io.checkpoint import latest_checkpoint, load_checkpoint
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
            from srigl.condensed.twins import to_masked_dense

            to_masked_dense(model)
    else:
        model.load_state_dict(state["model"])
    return model.eval(), config
