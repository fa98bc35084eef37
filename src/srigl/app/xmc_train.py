"""``srigl train`` on extreme multi-label (XMC) data: ``--data xmc-synthetic`` or ``--data xmc:NAME``.

:func:`srigl.app.train.train` hands an XMC config to :func:`run` after claiming the run folder and
installing the signal handlers, so an XMC run folder is an ordinary one (``config.toml``,
``metrics.csv``, ``summary.json``, ``checkpoints/last.pt``, ``--resume``, ``--overwrite``, Ctrl-C)
and ``srigl report`` reads it. What differs:

* data: :func:`srigl.app.datasets.xmc_sources.load_xmc`; a batch's features are densified to
  ``(B, F)`` (``4 * B * F`` bytes), its labels stay CSR;
* model: :mod:`srigl.app.xmc_models` (the ``L``-way head is sparsified, never ablated); with
  ``--compact`` the head is created on the ``meta`` device and only its ``(L, k)`` values and
  indices are ever allocated (:func:`build_xmc_model`); otherwise a dense head that would not fit
  is refused before it is allocated (:func:`check_dense_head_fits`);
* loss: binary cross-entropy on the logits (:func:`~srigl.app.datasets.xmc_batches.bce_with_logits_csr`),
  summed over the ``L`` labels and averaged over the points (averaged over ``L`` too, the gradient
  of each logit would shrink with the label count);
* metrics: after every epoch, P@1/3/5 and nDCG@1/3/5 on the test split (:mod:`srigl.app.xmc_metrics`)
  are ``metrics.csv`` columns and ``summary.json`` ``final`` entries. ``train_acc`` and
  ``test_acc`` are P@1 (the fraction of points whose top label is a true one), so that the report
  and the plot read an XMC run as they read any other.

The data order of epoch ``e`` is a pure function of ``(seed, e)``
(:func:`~srigl.app.datasets.xmc_batches.iterate_batches`), so a resumed run is bit-identical to an
uninterrupted one. One process only: under ``torchrun`` (``WORLD_SIZE > 1``) an XMC run is refused.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srigl.app.config import METHODS_DENSE, TrainConfig, method_label
from srigl.app.metrics import METRIC_COLUMNS, XMC_RANK_METRICS, MetricsLog, neuron_totals
from srigl.app.run_common import (
    Process,
    TrainingInterrupted,
    build_optimizer,
    build_scheduler,
    build_sparsifier,
    interrupted,
    optimizer_step,
    progress,
    resume_state,
    save_training_state,
    write_config_toml,
    write_summary,
)
from srigl.app.run_dir import StopSignals
from srigl.app.xmc_models import DEFAULT_HIDDEN, create_xmc_model, has_hidden, init_prior_bias
from srigl.errors import InvalidConfigError, LayerTooLargeError

XMC_COLUMNS = (*METRIC_COLUMNS, *XMC_RANK_METRICS)
RANKS = (1, 3, 5)


def xmc_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Binary cross-entropy of ``(B, L)`` logits against CSR labels: summed over labels, mean over points."""
    from srigl.app.datasets.xmc_batches import bce_with_logits_csr

    return bce_with_logits_csr(logits, labels, reduction="sum") / max(labels.n_rows, 1)


@torch.no_grad()
def evaluate_xmc(model: nn.Module, dataset, batch_size: int, device: torch.device) -> tuple[float, dict[str, float]]:
    """``(mean loss, {"P@1": ..., "nDCG@5": ...})`` of ``model`` on ``dataset`` in its stored order."""
    from srigl.app.datasets.xmc_batches import iterate_batches
    from srigl.app.xmc_metrics import per_point_metrics, top_k_labels

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in XMC_RANK_METRICS}
    k = min(max(RANKS), dataset.n_labels)
    for batch in iterate_batches(dataset, batch_size, shuffle=False):
        logits = model(batch.features.to(device))  # (B, L)
        loss_sum += xmc_loss(logits, batch.labels).double() * batch.labels.n_rows
        top_k = top_k_labels(logits, k)  # (B, k)
        if k < max(RANKS):  # fewer labels than 5: pad with an id no true label has
            top_k = torch.cat([top_k, top_k.new_full((len(top_k), max(RANKS) - k), dataset.n_labels)], 1)
        values = per_point_metrics(top_k, batch.labels.indptr, batch.labels.indices, dataset.n_labels + 1, RANKS)
        for name in XMC_RANK_METRICS:
            sums[name] += values[name].sum()
    model.train(was_training)
    n = max(len(dataset), 1)
    return float(loss_sum) / n, {name: float(total) / n for name, total in sums.items()}


def build_xmc_model(cfg: TrainConfig, model_args: dict[str, Any], device: torch.device) -> nn.Module:
    """The run's XMC model on ``device``, its head on the ``meta`` device when ``cfg.compact``.

    A compact run's head is never allocated dense: the sparsifier built next on it creates only its
    ``(L, k)`` values and indices (:func:`srigl.storage.compact.from_meta`, beside the model's other
    parameters); call :func:`finish_meta_head` after it. Any other run allocates the dense head,
    once :func:`check_dense_head_fits` has found room for it.

    Raises:
        LayerTooLargeError: a dense head that would not fit the memory free on ``device``.
    """
    if cfg.compact:
        model = create_xmc_model(cfg.model, **model_args, head_device="meta")
        for child in model.children():  # the layers other than the head (meta tensors cannot be moved)
            if not any(p.is_meta for p in child.parameters()):
                child.to(device)
        return model
    head_fan_in = (model_args["hidden"] or DEFAULT_HIDDEN) if has_hidden(cfg.model) else model_args["n_features"]
    check_dense_head_fits((model_args["n_labels"], head_fan_in), sparse=cfg.method != METHODS_DENSE,
                          optimizer=cfg.optimizer, device=device)
    return create_xmc_model(cfg.model, **model_args).to(device)


def finish_meta_head(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After the sparsifier of a model from :func:`build_xmc_model`: put every layer on ``device``.

    The sparsifier materialises a meta head beside the model's other parameters, on the CPU when
    there are none (``--model linear``): it is moved now (its values keep their identity, so the
    optimizer still holds them). A head the layer-wise distribution leaves dense (ERK gives a head
    much smaller than the feature layer a density above 1) is not materialised by the sparsifier; it
    is drawn here as ``nn.Linear`` draws its weights.
    """
    from srigl.storage.compact import swap_in_optimizer

    for module in model.modules():
        meta = {name: p for name, p in module.named_parameters(recurse=False) if p.is_meta}
        if meta:
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
            for name, old in meta.items():
                swap_in_optimizer(optimizer, old, getattr(module, name), lambda state: state)
    model.to(device)


def check_dense_head_fits(shape: tuple[int, int], *, sparse: bool, optimizer: str, device: torch.device) -> None:
    """Refuse, before allocating it, a dense ``(L, fan_in)`` head whose float32 weight and gradient
    (and bool mask in masked storage: what one training step cannot do without) exceed the memory
    free on ``device``.

    Raises:
        LayerTooLargeError: with the bytes it needs, those its optimizer state adds, and those free.
    """
    from srigl.storage.compact import available_bytes

    entries = math.prod(shape)
    need = entries * (2 * 4 + (1 if sparse else 0))
    state = entries * 4 * (2 if optimizer == "adamw" else 1)  # AdamW: two moments; SGD: momentum
    free = available_bytes(device)
    if free is not None and need > free:
        gb = 1e9
        stored = "weight, gradient and mask (masked storage)" if sparse else "weight and gradient"
        raise LayerTooLargeError(
            f"head.weight {shape} needs {need / gb:.2f} GB ({need:,} bytes) on {device} as a dense layer for its "
            f"{stored}; {optimizer} adds {state / gb:.2f} GB of state, but only {free / gb:.2f} GB are free: train it "
            f"compact (--method srigl --compact builds only its {shape[0]} x k values and indices) or use a "
            "device with more memory"
        )


def _top1_hits(logits: torch.Tensor, labels) -> torch.Tensor:
    """How many rows' highest logit is one of their true labels (a 0-d int64 tensor; no sync)."""
    from srigl.app.xmc_metrics import hits

    top1 = logits.argmax(dim=1, keepdim=True)  # (B, 1)
    return hits(top1, labels.indptr, labels.indices, labels.n_cols).sum()


def run(cfg: TrainConfig, proc: Process, resume: bool, stop: StopSignals, log) -> dict[str, Any]:
    """Train the XMC run ``cfg`` (resolved; its folder claimed) and write its run folder.

    Returns:
        The run's summary (what ``summary.json`` holds).

    Raises:
        InvalidConfigError: a distributed launch, or (``resume``) no checkpoint or another config.
        DatasetNotFoundError, XMCFormatError, CorruptDatasetError: see
            :func:`srigl.app.datasets.xmc_sources.load_xmc`.
        TrainingInterrupted: on SIGINT or SIGTERM, after writing a checkpoint to resume from.
    """
    from srigl.app.datasets.xmc_batches import iterate_batches
    from srigl.app.datasets.xmc_sources import load_xmc

    if proc.world > 1:
        raise InvalidConfigError(
            f"XMC training ({cfg.data}) runs in one process; it was launched as {proc.world} (WORLD_SIZE): "
            "start it without torchrun"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    data = load_xmc(cfg.data, cfg.data_dir, points=cfg.xmc_points, features=cfg.xmc_features, labels=cfg.xmc_labels,
                    limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    train_set, test_set = data.train, data.test
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    input_shape = (data.n_features,)

    torch.manual_seed(cfg.seed)
    model_args = {"n_features": data.n_features, "n_labels": data.n_labels, "hidden": cfg.xmc_hidden}
    model = build_xmc_model(cfg, model_args, proc.device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    sparsifier = build_sparsifier(cfg, model, optimizer, total_steps)
    finish_meta_head(model, optimizer, proc.device)
    # After the head is real: the sparsifier may have replaced it (compact) or built it from meta.
    init_prior_bias(model.head, train_set.labels.indices.numel(), len(train_set), data.n_labels)

    start_epoch, start_batch, step = 0, 0, 0
    fresh = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "grown": 0.0, "seconds": 0.0}
    carry = dict(fresh)
    if resume:
        start_epoch, start_batch, step, carry = resume_state(
            run_dir, cfg, model, optimizer, sparsifier, scheduler, proc.device, carry, log
        )
    write_config_toml(run_dir, cfg)
    metrics = MetricsLog(run_dir, keep_epochs=start_epoch if resume else 0, columns=XMC_COLUMNS)

    def save(epoch: int, batch: int, partial: dict[str, float]) -> Path:
        # The sizes rebuild the model without the data (srigl.app.train.load_trained_model, `srigl condense`).
        return save_training_state(run_dir, cfg, model, optimizer, sparsifier, scheduler, epoch=epoch, batch=batch,
                                   step=step, partial=partial, model_args=model_args)

    def stopped(where: str, path: Path) -> TrainingInterrupted:
        metrics.close()
        return interrupted(stop.received, where, step, path, run_dir)

    show = cfg.progress and sys.stderr.isatty()
    model.train()
    log(
        f"training {cfg.model} on {cfg.data} ({len(train_set)} train / {len(test_set)} test points, "
        f"{data.n_features} features, {data.n_labels} labels), {method_label(cfg.method, cfg.gamma_sal)} at sparsity "
        f"{cfg.sparsity:g}, {cfg.epochs} epochs x {steps_per_epoch} steps, device {proc.device}"
    )
    epoch_bar = progress(range(start_epoch, cfg.epochs), show, desc="epochs", initial=start_epoch, total=cfg.epochs)
    for epoch in epoch_bar:
        skip = start_batch if epoch == start_epoch else 0
        if skip == 0:
            carry = dict(fresh)
        started = time.perf_counter()
        stream = iterate_batches(train_set, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=skip)
        bar = progress(stream, show, desc=f"epoch {epoch + 1}", total=steps_per_epoch, initial=skip, leave=False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=proc.device)
        correct = torch.zeros((), dtype=torch.long, device=proc.device)
        seen, grown, batch_index = 0, 0, skip
        cut = False
        for batch in bar:
            # As in srigl.app.train: a signal is acted on only here, between two whole steps.
            if stop.received is not None:
                cut = True
                break
            logits = model(batch.features.to(proc.device))  # (B, L)
            loss = xmc_loss(logits, batch.labels)
            n_points = batch.labels.n_rows
            loss_sum += loss.detach().double() * n_points
            correct += _top1_hits(logits.detach(), batch.labels)
            # Let the (B, L) logits go with the graph in backward, before a mask update runs (0.17 GB
            # at 670k labels, batch 64), rather than at the next forward.
            del logits
            stats = optimizer_step(loss, optimizer, sparsifier, scheduler)
            step += 1
            batch_index += 1
            seen += n_points
            if stats and "layers" in stats:
                grown += sum(layer["grown"] for layer in stats["layers"].values())
            if show and batch_index % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        partial = {
            "loss_sum": carry["loss_sum"] + float(loss_sum), "correct": carry["correct"] + int(correct),
            "seen": carry["seen"] + seen, "grown": carry["grown"] + grown,
            "seconds": carry["seconds"] + time.perf_counter() - started,
        }
        if cut:
            raise stopped(f"at epoch {epoch + 1}, batch {batch_index}", save(epoch, batch_index, partial))
        test_loss, ranks = evaluate_xmc(model, test_set, cfg.batch_size, proc.device)
        active, neurons = neuron_totals(model, sparsifier, input_shape)
        # From the per-neuron counts: sparsifier.masks() would form every dense mask (0.5 GB at 670k labels).
        n_active_weights = sum(e["nnz"] for e in sparsifier.summary().values() if e["sparse"]) if sparsifier is not None else 0
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
            "train_acc": partial["correct"] / max(partial["seen"], 1),
            "test_loss": test_loss,
            "test_acc": ranks["P@1"],
            "lr": optimizer.param_groups[0]["lr"],
            "global_sparsity": sparsifier.global_sparsity() if sparsifier is not None else 0.0,
            "active_neurons": active,
            "active_neuron_fraction": active / max(neurons, 1),
            "mask_churn": partial["grown"] / n_active_weights if n_active_weights else 0.0,
            "seconds": carry["seconds"] + time.perf_counter() - started,
            **ranks,
        }
        metrics.append(row)
        message = (
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} P@1 {100 * row['train_acc']:.2f} %, "
            f"test loss {test_loss:.4f} " + " ".join(f"{name} {100 * ranks[name]:.2f}" for name in XMC_RANK_METRICS)
            + f" %, active neurons {active}/{neurons}, churn {row['mask_churn']:.3f}, {row['seconds']:.1f} s"
        )
        if show:
            epoch_bar.write(message)
        else:
            log(message)
        path = save(epoch + 1, 0, {k: 0.0 for k in carry})
        if epoch + 1 < cfg.epochs and stop.received is not None:
            raise stopped(f"after epoch {epoch + 1}", path)

    last = metrics.rows[-1] if metrics.rows else {}
    summary = write_summary(
        cfg, model, sparsifier, input_shape, metrics.rows, run_dir, total_steps, steps_per_epoch, step,
        final_extra={**{name: last.get(name) for name in XMC_RANK_METRICS}, "n_features": data.n_features,
                     "n_labels": data.n_labels},
    )
    metrics.close()
    return summary
