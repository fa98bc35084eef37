"""What every ``srigl train`` loop shares (image classification in :mod:`srigl.app.train`, extreme
multi-label classification in :mod:`srigl.app.xmc_train`): the optimizer, LR-schedule and sparsifier
builders, the per-step LR formula, where a process runs, the run folder's checkpoint, resume,
interrupt and ``config.toml`` steps, and the final ``summary.json``.

A loop calls, in order: :func:`resume_state` (with ``--resume``), :func:`write_config_toml`, then
per epoch :func:`save_training_state`, :func:`interrupted` when a signal stopped it, and
:func:`write_summary` at the end. Keeping these here, rather than in one loop's module, lets the
two loops write run folders that ``--resume``, ``srigl report`` and the tests treat alike.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from srigl.algorithms import get_algorithm
from srigl.app import flops
from srigl.app.config import METHODS_DENSE, TrainConfig, config_differences, dumps_json, dumps_toml, has_ablation, method_label
from srigl.app.metrics import layer_report, neuron_totals, plot_curves
from srigl.errors import InvalidConfigError, SriglError

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


# ---------------------------------------------------------------------------------- the process
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


class TrainingInterrupted(SriglError):
    """Training was stopped by a signal; a checkpoint to resume from was written (its path is in the message).

    Attributes:
        signal_number: the signal (``signal.SIGINT`` or ``signal.SIGTERM``); the CLI exits with
            ``128 + signal_number`` as shells do (130, 143).
    """

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = int(signal_number)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, sparsifier, scheduler):
    """One training step after the forward, in the order every loop keeps: backward, optimizer,
    sparsifier (after ``optimizer.step()``, before ``zero_grad``), schedule. Returns the sparsifier's
    update statistics (None on ordinary steps or without a sparsifier)."""
    loss.backward()
    optimizer.step()
    stats = sparsifier.step() if sparsifier is not None else None
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def progress(iterable, enabled: bool, **kwargs):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (tqdm is optional otherwise)."""
    if not enabled:
        return iterable
    from srigl._optional import require

    return require("tqdm.auto", "the training progress bar").tqdm(iterable, **kwargs)


# ------------------------------------------------------------------------- the run folder's files
def resume_state(run_dir: Path, cfg: TrainConfig, model, optimizer, sparsifier, scheduler, device, carry: dict[str, float],
                 say) -> tuple[int, int, int, dict[str, float]]:
    """Load ``run_dir``'s latest checkpoint into the live objects; ``(epoch, batch, step, carry)`` to go on from.

    ``carry`` is the loop's per-epoch running sums as a fresh epoch starts them; the checkpoint's
    sums of an epoch cut short replace them.

    Raises:
        InvalidConfigError: no checkpoint, or one trained with another config (the fields named).
        srigl.errors.CheckpointError: the checkpoint is damaged or belongs to another model.
    """
    from srigl.io import checkpoint

    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        raise InvalidConfigError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    state = checkpoint.load_checkpoint(latest, map_location=device)
    saved = state.get("extra", {}).get("config") or {}
    differences = config_differences(saved, cfg.to_dict())
    if differences:
        listed = "; ".join(f"{k}: checkpoint {a!r}, given {b!r}" for k, (a, b) in differences.items())
        raise InvalidConfigError(f"cannot resume {latest} with another config: {listed}")
    extra = checkpoint.restore_training_state(state, model, optimizer, sparsifier, scheduler)
    epoch, batch, step = int(extra["epoch"]), int(extra["batch"]), int(extra["step"])
    carry = {k: float(v) for k, v in extra.get("partial", carry).items()}
    if epoch >= cfg.epochs:
        say(f"{run_dir} already finished all {cfg.epochs} epochs ({latest}); rewriting its summary")
    else:
        say(f"resuming {run_dir} from {latest}: epoch {epoch + 1}/{cfg.epochs}, batch {batch}, step {step}")
    return epoch, batch, step, carry


def write_config_toml(run_dir: Path, cfg: TrainConfig) -> None:
    """Write ``config.toml`` (atomically), unless it already holds exactly this config."""
    from srigl.io.atomic import atomic_write

    text = dumps_toml(cfg.to_dict())
    toml = run_dir / "config.toml"
    if not toml.exists() or toml.read_bytes() != text.encode():
        atomic_write(toml, lambda file: file.write(text.encode()))


def save_training_state(run_dir: Path, cfg: TrainConfig, model, optimizer, sparsifier, scheduler, *, epoch: int,
                        batch: int, step: int, partial: Mapping[str, float], **extra: Any) -> Path:
    """Write ``checkpoints/last.pt``: everything to resume after ``batch`` batches of epoch ``epoch`` (0-based).

    ``extra`` goes into the checkpoint's ``extra`` entry too (an XMC run's model sizes).
    """
    from srigl.io import checkpoint

    state = checkpoint.training_state(
        model, optimizer, sparsifier, scheduler,
        epoch=epoch, batch=batch, step=step, partial=dict(partial), config=cfg.to_dict(), **extra,
    )
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / CHECKPOINT_NAME
    checkpoint.save_checkpoint(path, state)
    return path


def interrupted(received: int | None, where: str, step: int, path: Path | None, run_dir: Path) -> TrainingInterrupted:
    """The error a loop raises after a signal stopped it ``where`` and ``path`` was saved."""
    signum = received if received is not None else signal.SIGINT  # another rank's signal
    return TrainingInterrupted(
        f"interrupted by {signal.Signals(signum).name} {where}, step {step}; "
        + (f"checkpoint {path}" if path else "rank 0 writes the checkpoint")
        + f"; continue with `srigl train --resume {run_dir}`",
        signum,
    )


def write_summary(cfg: TrainConfig, model: nn.Module, sparsifier, input_shape: tuple[int, ...], rows: list[Mapping[str, Any]],
                  run_dir: Path, total_steps: int, steps_per_epoch: int, step: int, world: int = 1,
                  final_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the run's summary, write ``summary.json`` (and ``curves.png`` with ``cfg.plot``), return it.

    Args:
        rows: the metrics rows, one per epoch; the last one gives the final metrics.
        final_extra: more entries of ``summary["final"]`` (an XMC run's P@k and nDCG@k).
    """
    from srigl.io.atomic import atomic_write

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
            "world_size": world,
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
            **dict(final_extra or {}),
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
    text = dumps_json(summary) + "\n"
    atomic_write(run_dir / "summary.json", lambda file: file.write(text.encode()))
    if cfg.plot and rows:
        plot_curves(rows, run_dir / "curves.png", f"{summary['label']} {cfg.model} {cfg.data} s={cfg.sparsity:g}")
    return summary
