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

Extreme multi-label data (``xmc-synthetic``, ``xmc:NAME``) is trained by :mod:`srigl.app.xmc_train`
once :func:`train` has claimed the folder; what both loops share (builders, checkpoint and resume
steps, the summary) is in :mod:`srigl.app.run_common`.

Only torch and srigl's core (and the app's config, metrics, run_common and FLOP modules) are
imported at module level; data, models, tqdm, matplotlib, TensorBoard and the checkpoint module
are imported where they are used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srigl.app.config import NOT_COMPARED, TrainConfig, config_differences, config_from_mapping, method_label, resolve_config
from srigl.app.metrics import MetricsLog, evaluate, neuron_totals
from srigl.app.run_common import (  # noqa: F401 -- lr_factor, CHECKPOINT_NAME and the rest are this module's API too
    CHECKPOINT_NAME,
    STEP_FACTOR,
    STEP_MILESTONES,
    Process,
    TrainingInterrupted,
    build_optimizer,
    build_scheduler,
    build_sparsifier,
    interrupted,
    optimizer_step,
    lr_factor,
    progress,
    resume_state,
    save_training_state,
    write_config_toml,
    write_summary,
)
from srigl.app.run_dir import StopSignals, claim_run_dir
from srigl.errors import InvalidConfigError, ReplicaDivergenceError, SriglError


# --------------------------------------------------------------------------------- distributed
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
            from srigl.app.datasets.xmc_sources import is_xmc

            if is_xmc(cfg.data):  # extreme multi-label data: its own loop, the same run folder
                from srigl.app import xmc_train

                return xmc_train.run(cfg, proc, resume, stop, log)
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
    if resume:
        start_epoch, start_batch, step, carry = resume_state(
            run_dir, cfg, model, optimizer, sparsifier, scheduler, proc.device, carry, say
        )
    if proc.main:
        write_config_toml(run_dir, cfg)
    metrics = MetricsLog(run_dir, keep_epochs=start_epoch if resume else 0) if proc.main else None

    def save(epoch: int, batch: int, partial: dict[str, float]) -> Path | None:
        if not proc.main:
            return None
        return save_training_state(run_dir, cfg, model, optimizer, sparsifier, scheduler, epoch=epoch, batch=batch,
                                   step=step, partial=partial)

    def stopped(where: str, path: Path | None) -> TrainingInterrupted:
        if metrics is not None:
            metrics.close()
        return interrupted(stop.received, where, step, path, run_dir)

    show = cfg.progress and proc.main and sys.stderr.isatty()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    say(
        f"training {cfg.model} on {cfg.data} ({len(train_set)} train / {len(test_set)} test items), "
        f"{method_label(cfg.method, cfg.gamma_sal)} at sparsity {cfg.sparsity:g}, {cfg.epochs} epochs x "
        f"{steps_per_epoch} steps, device {proc.device}" + (f", {proc.world} processes" if proc.world > 1 else "")
    )
    epoch_bar = progress(range(start_epoch, cfg.epochs), show, desc="epochs", initial=start_epoch, total=cfg.epochs)
    for epoch in epoch_bar:
        skip = start_batch if epoch == start_epoch else 0
        if skip == 0:
            carry = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "grown": 0.0, "seconds": 0.0}
        started = time.perf_counter()
        order = datasets.shard(datasets.epoch_order(len(train_set), cfg.seed, epoch), proc.rank, proc.world)
        # Skipping already-trained batches of a resumed epoch costs nothing: the order is sliced.
        stream = datasets.batches(train_set, order[skip * cfg.batch_size :], cfg.batch_size)
        bar = progress(stream, show, desc=f"epoch {epoch + 1}", total=steps_per_epoch, initial=skip, leave=False)
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
            stats = optimizer_step(loss, optimizer, sparsifier, scheduler)
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
            raise stopped(f"at epoch {epoch + 1}, batch {batch_index}", save(epoch, batch_index, partial))
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
            raise stopped(f"after epoch {epoch + 1}", path)

    summary = None
    if proc.main:
        summary = write_summary(cfg, base, sparsifier, input_shape, metrics.rows, run_dir, total_steps, steps_per_epoch,
                                step, proc.world)
        metrics.close()
    if proc.world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank leaves before rank 0 has written the run folder
        if proc.owns_group:
            dist.destroy_process_group()
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
    from srigl.app.datasets.xmc_sources import is_xmc
    from srigl.app.models import create_model
    from srigl.app.xmc_models import create_xmc_model

    found = latest_checkpoint(path)
    if found is None:
        raise InvalidConfigError(f"no checkpoint at {str(path)!r}")
    state = load_checkpoint(found)
    saved = state.get("extra", {}).get("config")
    if saved is None:
        raise InvalidConfigError(f"{found} has no run config in its 'extra' entry; it was not written by `srigl train`")
    config = config_from_mapping({k: v for k, v in saved.items() if v is not None}, str(found))
    if is_xmc(config.data):
        model_args = state["extra"].get("model_args")
        if not isinstance(model_args, dict):
            raise InvalidConfigError(f"{found} is an XMC run's checkpoint without its model sizes ('model_args')")
        # A compact run's head starts on the meta device, as it trained (srigl.app.xmc_train.build_xmc_model).
        model = create_xmc_model(config.model, **model_args, head_device="meta" if config.compact else None)
    else:
        info = dataset_info(config.data)
        model = create_model(config.model, info.in_channels, info.image_size, info.num_classes)
    if state.get("sparsifier") is not None:
        # Rebuild the sparsifier as it trained so that the masks (or compact layouts) land where
        # they belong; its schedule does not matter here.
        total_steps = int(state["sparsifier"]["config"]["total_steps"])
        optimizer = build_optimizer(config, model)
        sparsifier = build_sparsifier(config, model, optimizer, total_steps)
        if is_xmc(config.data) and config.compact:
            from srigl.app.xmc_train import finish_meta_head

            finish_meta_head(model, optimizer, torch.device("cpu"))
        sparsifier.load_state_dict(state["sparsifier"])
        model.load_state_dict(state["model"])
        sparsifier.remove_hooks()
        if config.compact:
            from srigl.condensed.twins import to_masked_dense

            to_masked_dense(model)
    else:
        model.load_state_dict(state["model"])
    return model.eval(), config
