"""Dynamic sparse training algorithms on one template: scores -> drop -> grow -> reset.

``Static`` never changes its masks; ``SET`` regrows at random; ``RigL`` regrows where the dense
gradient is largest; ``SRigL`` is RigL with the constant fan-in structure and neuron ablation. The
update itself (:meth:`Sparsifier._update_layer`) is written once; algorithms override only their grow
scores, their default structure and which neurons survive.

Masks live on the module that owns the parameter, as a non-persistent bool buffer named
``<param>_mask`` (``fc.weight`` -> ``fc.weight_mask``), so they follow ``.to(device)`` and
:func:`srigl.condense` can find them, while the model's own ``state_dict`` keeps its usual keys. The
parameter itself is exactly zero wherever the mask is False after every optimizer step, so
``model.fc.weight`` always reads as the effective (masked) weight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from srigl import ablation, initial
from srigl.distributions import layer_sparsities
from srigl.errors import (
    FanInTooSmallError,
    InvalidConfigError,
    NoSparsifiableLayerError,
    NotConstantFanInError,
    ParameterNotInOptimizerError,
    StateDictMismatchError,
    StepOrderError,
)
from srigl.schedules import CosineDrop
from srigl.selection import Candidate, SparsityPolicy, select
from srigl.structures import NM, ConstantFanIn, Structure, Unstructured, check_shape, topk_mask
from srigl.summary import Summary

ALGORITHMS: dict[str, type["Sparsifier"]] = {}

STATE_DICT_VERSION = 1


def register_algorithm(name: str) -> Callable[[type["Sparsifier"]], type["Sparsifier"]]:
    """Class decorator adding a sparsifier to :data:`ALGORITHMS` under ``name``."""

    def decorate(cls: type["Sparsifier"]) -> type["Sparsifier"]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def get_algorithm(name: str) -> type["Sparsifier"]:
    """Look up an algorithm class by name, listing the valid names when it is unknown."""
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise InvalidConfigError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None


@dataclass
class SparseTensor:
    """Book-keeping for one sparsified parameter. Holds no tensors that are serialised."""

    name: str  # FQN, e.g. "layer1.0.conv1.weight"
    module: nn.Module
    param_name: str
    sparsity: float  # target from the distribution
    budget: int  # number of active weights this tensor keeps (fixed for the whole run)
    ablate: bool  # whether neurons of this tensor may be ablated

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.param_name + "_mask")

    @property
    def n_rows(self) -> int:
        return self.param.shape[0]

    @property
    def fan_in(self) -> int:
        return self.param[0].numel()


def _describe(structure: Structure) -> str:
    return repr(structure)


def _grad_was_reset(param: nn.Parameter) -> bool:
    """Whether ``param.grad`` was cleared since the last backward: None (``zero_grad()``), or all
    zeros (``zero_grad(set_to_none=False)``). Checked only on the step before a mask update."""
    return param.grad is None or not bool(param.grad.any())


class Sparsifier:
    """Base class: masks, hooks, schedule, state dict, summary; ``Static`` behaviour.

    Args:
        model: any ``nn.Module`` (or a DDP wrapper; its ``.module`` names are used).
        optimizer: the optimizer stepping ``model``'s parameters.
        sparsity: global target in [0, 1), or a ``{param FQN: sparsity}`` map.
        total_steps: optimizer steps in the whole run (sets ``t_end`` = 0.75 of it).
        distribution: ``"erk"`` or ``"uniform"`` (ignored for an explicit map or N:M).
        delta: steps between mask updates (ΔT).
        alpha: initial drop fraction.
        t_end: last step at which masks may change; default ``int(0.75 * total_steps)``.
        structure: ``Unstructured()``, ``ConstantFanIn()`` or ``NM(n, m)``; algorithm default if None.
        policy: which tensors become sparse; :class:`SparsityPolicy` defaults if None.
        no_ablation: fnmatch patterns of parameter FQNs whose neurons are never ablated (the output
            layer never is).
        seed: seed of the sparsifier's own generator (initial masks, SET regrowth), hashed so that
            it never replays the stream ``torch.manual_seed(seed)`` gave the weights. Every rank of
            a distributed run must use the same seed.
        erk_power: exponent of the ERK ratio.
        mask_init: the first masks: ``"random"`` (a fresh model), ``"magnitude"`` (the largest
            ``|w|`` per unit: a pretrained model) or ``"nonzero"`` (adopt the weights' zeros: an
            already-sparse model; refused when they break the structure or budget). See
            :mod:`srigl.initial`.
        sparse_init: with ``mask_init="random"``, rescale each sparse neuron's freshly initialised
            weights by ``sqrt(dense fan-in / sparse fan-in)`` (the SRigL reference's sparse Kaiming
            init); without it, high sparsities may not train. Never applied to ``"magnitude"`` or
            ``"nonzero"`` masks, whose weights are trained ones.
        output_layer: FQN of the output layer's weight (never ablated; ``dense_last`` keeps it
            dense). Default: the last selected layer *called* in the forward (traced with
            ``torch.fx``), or the last one registered when the model cannot be traced.
    """

    name = "static"
    default_structure: Structure = Unstructured()
    needs_dense_grad = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float | Mapping[str, float] = 0.9,
        total_steps: int | None = None,
        *,
        distribution: str = "erk",
        delta: int = 100,
        alpha: float = 0.3,
        t_end: int | None = None,
        structure: Structure | None = None,
        policy: SparsityPolicy | None = None,
        no_ablation: tuple[str, ...] = (),
        seed: int = 0,
        erk_power: float = 1.0,
        mask_init: str = "random",
        sparse_init: bool = True,
        output_layer: str | None = None,
    ):
        self.model = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
        self.optimizer = optimizer
        self.structure = structure if structure is not None else self.default_structure
        self.policy = policy or SparsityPolicy()
        self.distribution = distribution
        self.target_sparsity = dict(sparsity) if isinstance(sparsity, Mapping) else sparsity
        self.total_steps = total_steps
        self.schedule = self._make_schedule(total_steps, delta, alpha, t_end)
        self.no_ablation = tuple(no_ablation)
        self.seed = seed
        self.erk_power = erk_power
        self.mask_init = initial.check_mask_init(mask_init)
        self.sparse_init = bool(sparse_init)
        self.generator = torch.Generator().manual_seed(initial.mask_stream_seed(seed))

        self.decisions: list[Candidate] = select(self.model, self.policy, output=output_layer)
        chosen = [c for c in self.decisions if c.sparse]
        if not chosen:
            raise NoSparsifiableLayerError(
                f"no tensor of {type(self.model).__name__} was selected for sparsification "
                f"({len(self.decisions)} parameters looked at; types {[t.__name__ for t in self.policy.types]})"
            )
        self._check_in_optimizer(chosen)
        self.layers: list[SparseTensor] = self._init_layers(chosen)
        if not self.layers:
            raise NoSparsifiableLayerError(
                f"every selected tensor of {type(self.model).__name__} is dense at sparsity {self.target_sparsity}"
            )

        self._step = 0
        self._pending_optimizer_steps = 0
        #: Calls of :meth:`step` that found the optimizer step skipped for non-finite gradients.
        self.skipped_steps = 0
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._collecting = self.needs_dense_grad and self.schedule.is_update_step(1)
        self.last_update: dict[str, Any] = {}
        self._handles = [layer.param.register_hook(self._grad_hook(layer)) for layer in self.layers]
        self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    # ------------------------------------------------------------------ construction
    def _make_schedule(self, total_steps: int | None, delta: int, alpha: float, t_end: int | None) -> CosineDrop:
        if total_steps is not None:
            try:
                steps = operator.index(total_steps)  # ints and numpy ints; not 100.5
            except TypeError:
                steps = 0
            if steps <= 0 or isinstance(total_steps, bool):
                raise InvalidConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
            total_steps = steps
        if t_end is None:
            if total_steps is None:
                # t_end = 0 would silently turn a dynamic algorithm into a static one.
                raise InvalidConfigError(
                    f"{type(self).__name__} updates masks until t_end = 0.75 * total_steps; pass total_steps "
                    "(optimizer steps in the whole run) or t_end"
                )
            t_end = int(0.75 * total_steps)
        if total_steps is not None and t_end > total_steps:
            raise InvalidConfigError(f"t_end={t_end} is beyond total_steps={total_steps}")
        return CosineDrop(alpha=alpha, delta=delta, t_end=t_end)

    def _check_in_optimizer(self, chosen: list[Candidate]) -> None:
        optimised = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        params = dict(self.model.named_parameters())
        missing = [c.name for c in chosen if id(params[c.name]) not in optimised]
        if missing:
            raise ParameterNotInOptimizerError(
                f"{len(missing)} of {len(chosen)} sparse tensors are not in the optimizer: {missing[:5]}"
            )

    def _min_density(self, c: Candidate) -> float:
        """Smallest density a tensor may get: one weight per neuron (constant fan-in) or per tensor."""
        n_rows, fan_in = c.shape[0], math.prod(c.shape[1:])
        if isinstance(self.structure, ConstantFanIn):
            return 1.0 / fan_in
        return 1.0 / (n_rows * fan_in)

    def _init_layers(self, chosen: list[Candidate]) -> list[SparseTensor]:
        shapes = {c.name: c.shape for c in chosen}
        if isinstance(self.structure, NM):
            # The density of an N:M tensor is fixed by its structure.
            sparsities = {n: 1.0 - self.structure.n / self.structure.m for n in shapes}
        else:
            min_density = {c.name: self._min_density(c) for c in chosen}
            sparsities = layer_sparsities(
                shapes, self.target_sparsity, self.distribution, min_density, erk_power=self.erk_power
            )
        # A tensor the distribution leaves fully dense (ERK overflow, explicit 0) is not masked at all.
        kept_dense = {n for n, s in sparsities.items() if s == 0.0}
        why_dense = "explicit sparsity 0" if isinstance(self.target_sparsity, Mapping) else (
            f"{self.distribution} gives density 1"
        )
        self.decisions = [
            dataclasses.replace(c, sparse=False, reason=why_dense) if c.name in kept_dense else c
            for c in self.decisions
        ]
        # Compute every mask before touching any module: a refused configuration leaves the model as it was.
        planned = []
        for c in (c for c in chosen if c.name not in kept_dense):
            module = self.model.get_submodule(c.module_name) if c.module_name else self.model
            param = getattr(module, c.param_name)
            n_rows, fan_in = c.shape[0], math.prod(c.shape[1:])
            check_shape(self.structure, n_rows, fan_in, c.name)
            density = 1.0 - sparsities[c.name]
            n = self.structure.n_per_unit(density, n_rows, fan_in)
            if n < 1:
                raise FanInTooSmallError(
                    f"{c.name} {c.shape}: fan-in {fan_in} is too small for density {density:.4g} "
                    f"({density * fan_in:.3g} weights per neuron); lower the sparsity or keep it dense"
                )
            planned.append((c, module, param, self._initial_mask(param, n, c.name), self.structure.units(n_rows, fan_in) * n))
        layers = []
        for c, module, param, mask, budget in planned:
            module.register_buffer(c.param_name + "_mask", mask, persistent=False)
            with torch.no_grad():
                param.masked_fill_(~mask, 0.0)
                if self.mask_init == "random" and self.sparse_init:
                    initial.rescale_to_sparse_fan_in(param, mask)
            ablate = (
                isinstance(self.structure, ConstantFanIn)
                and not c.is_output
                and not any(fnmatch.fnmatchcase(c.name, p) for p in self.no_ablation)
            )
            layers.append(SparseTensor(c.name, module, c.param_name, sparsities[c.name], budget, ablate))
        for layer in layers:
            self._reset_state(layer, layer.mask)
        return layers

    def _initial_mask(self, param: nn.Parameter, n: int, name: str) -> torch.Tensor:
        """The first mask of ``param`` (shaped like it), keeping ``n`` per unit, by :attr:`mask_init`."""
        n_rows = param.shape[0]
        weight = param.detach().reshape(n_rows, -1)  # (out, fan_in)
        if self.mask_init == "magnitude":
            mask = initial.magnitude_mask(weight, n, self.structure)
        elif self.mask_init == "nonzero":
            mask = initial.nonzero_mask(weight, self.structure, n, name)
        else:
            mask = initial.random_mask(n_rows, weight.shape[1], n, self.structure, self.generator)
        return mask.to(param.device).view_as(param)

    # ------------------------------------------------------------------ hooks
    def _grad_hook(self, layer: SparseTensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._collecting:
                # The dense gradient (of masked weights too) scores regrowth; keep it only for the
                # step that updates masks. Gradient accumulation sums over backward calls, but only
                # as long as .grad does: a zero_grad() since the last backward (after a gradient
                # probe, say) starts the sum afresh, so regrowth follows what .grad saw.
                held = None if _grad_was_reset(layer.param) else self._dense_grads.get(layer.name)
                self._dense_grads[layer.name] = grad.detach().clone() if held is None else held.add_(grad)
            # masked_fill, not a product: NaN * 0 is NaN, and a pruned weight must stay exactly 0.
            return grad.masked_fill(~layer.mask, 0.0)

        return hook

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._pending_optimizer_steps += 1
        with torch.no_grad():
            for layer in self.layers:
                layer.param.masked_fill_(~layer.mask, 0.0)

    def remove_hooks(self) -> None:
        """Detach every hook srigl installed (masks stay on the modules)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ stepping
    def step(self) -> dict[str, Any] | None:
        """Count one training step; on update steps, drop and regrow every sparse tensor.

        Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``. With
        ``torch.amp.GradScaler``, call it after ``scaler.step(optimizer)`` as usual: when the
        scaler skipped the optimizer step (a gradient overflowed), the skip is recognised by the
        non-finite gradients it leaves, and the step is not counted (:attr:`skipped_steps`).

        Returns:
            The update's statistics (a plain dict) on update steps, else None.

        Raises:
            StepOrderError: no ``optimizer.step()`` happened since the previous call, and the
                gradients are finite (so no gradient scaler skipped it).
        """
        if self._pending_optimizer_steps == 0:
            if self._gradients_non_finite():
                # The optimizer step was skipped for overflowing gradients (GradScaler does this
                # routinely while it calibrates its scale): no training step happened, so none is
                # counted, and dense gradients kept for an update are dropped (the next backward
                # collects them again).
                self.skipped_steps += 1
                self._dense_grads.clear()
                return None
            raise StepOrderError(
                f"sparsifier.step() called at step {self._step} without optimizer.step() since the last call; "
                "call optimizer.step() first (a step that torch.amp.GradScaler skipped for non-finite "
                "gradients is recognised and not counted)"
            )
        self._pending_optimizer_steps = 0
        self._step += 1
        stats = None
        if self.schedule.is_update_step(self._step):
            stats = self._update(self.schedule.drop_fraction(self._step))
        self._dense_grads.clear()
        self._collecting = self.needs_dense_grad and self.schedule.is_update_step(self._step + 1)
        return stats

    def _gradients_non_finite(self) -> bool:
        """Whether any gradient the optimizer holds is NaN or inf (what a skipped AMP step leaves)."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not all(bool(torch.isfinite(g).all()) for g in grads)

    @torch.no_grad()
    def _update(self, drop_fraction: float) -> dict[str, Any]:
        dense_grads = self._gather_dense_grads() if self.needs_dense_grad else {}
        if dense_grads:
            finite = torch.stack([torch.isfinite(g).all() for g in dense_grads.values()]).all()
            if not bool(finite):
                return self._skip_update([n for n, g in dense_grads.items() if not bool(torch.isfinite(g).all())])
        layers_stats = {}
        for layer in self.layers:
            old = layer.mask.clone()
            new = self._update_layer(layer, dense_grads.get(layer.name), drop_fraction)
            self._apply(layer, old, new)
            layers_stats[layer.name] = self._layer_stats(layer, old, new)
        self.last_update = {"step": self._step, "drop_fraction": drop_fraction, "layers": layers_stats}
        return self.last_update

    @staticmethod
    def _layer_stats(layer, old: torch.Tensor, new: torch.Tensor) -> dict[str, int]:
        """What one update did to a tensor: weights grown, neurons left with any weight."""
        return {
            "grown": int((new & ~old).sum()),
            "active_neurons": int(new.reshape(layer.n_rows, -1).any(dim=1).sum()),
        }

    def _skip_update(self, bad: list[str]) -> dict[str, Any]:
        """Leave every mask as it is this step: some dense gradients are NaN or inf."""
        warnings.warn(
            f"srigl: non-finite dense gradients at step {self._step} in {len(bad)} tensors "
            f"({bad[:3]}); mask update skipped, masks unchanged",
            RuntimeWarning,
            stacklevel=4,
        )
        self.last_update = {"step": self._step, "skipped": True, "reason": "non-finite gradients"}
        return self.last_update

    def _gather_dense_grads(self) -> dict[str, torch.Tensor]:
        """Dense gradients for scoring, averaged over ranks so every rank picks the same masks."""
        grads = dict(self._dense_grads)
        for layer in self.layers:
            if layer.name not in grads:
                # A tensor unused in this step's forward has zero gradient.
                grads[layer.name] = torch.zeros_like(layer.param)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for name in sorted(grads):  # same order on every rank
                dist.all_reduce(grads[name])
                grads[name].div_(world)
        return grads

    # ------------------------------------------------------------------ the template
    def drop_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Score of keeping an active weight: its magnitude."""
        return weight.abs()

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        """Score of growing an inactive weight; algorithms override this."""
        raise NotImplementedError

    def surviving_rows(
        self, layer: SparseTensor, mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, n_drop: int
    ) -> torch.Tensor:
        """Output neurons that stay active this step, ``(out,)`` bool. Default: all of them."""
        return torch.ones(layer.n_rows, dtype=torch.bool, device=mask.device)

    def _per_unit(self, layer: SparseTensor, alive: torch.Tensor) -> int:
        """Weights each unit of the structure keeps after the update."""
        if isinstance(self.structure, Unstructured):
            return layer.budget
        if isinstance(self.structure, NM):
            return self.structure.n
        # Constant fan-in: the layer budget spread over the surviving neurons (k').
        return min(layer.budget // int(alive.sum()), layer.fan_in)

    def _update_layer(self, layer: SparseTensor, dense_grad: torch.Tensor | None, drop_fraction: float) -> torch.Tensor:
        rows, fan_in = layer.n_rows, layer.fan_in
        weight = layer.param.detach().reshape(rows, fan_in)  # (out, fan_in)
        mask = layer.mask.reshape(rows, fan_in)  # (out, fan_in)
        grad = None if dense_grad is None else dense_grad.reshape(rows, fan_in)
        n_active = int(mask.sum())
        # K, raised to drop every active weight that is exactly 0 (it carries nothing to keep;
        # its slot is regrown by gradient like the others). See docs/algorithm.md, choice (f).
        n_zero = int((mask & (weight == 0)).sum())
        n_drop = max(int(drop_fraction * n_active), n_zero) if drop_fraction > 0 else 0
        drop = self.drop_scores(weight)
        grow = self.grow_scores(weight, grad)

        alive = self.surviving_rows(layer, mask, drop, grow, n_drop)  # (out,)
        per_unit = self._per_unit(layer, alive)
        alive_2d = alive[:, None]  # (out, 1)

        # Drop: of the active weights in surviving neurons, keep all but the K smallest magnitudes
        # (over the whole layer, not per neuron).
        candidates = mask & alive_2d
        n_keep = max(int(candidates.sum()) - n_drop, 0)
        keep = topk_mask(torch.where(candidates, drop, -torch.inf), n_keep, Unstructured())
        if not isinstance(self.structure, Unstructured):
            # A unit cannot keep more than its new quota (k' may shrink when neurons revive).
            keep &= topk_mask(torch.where(keep, drop, -torch.inf), per_unit, self.structure)

        # Grow: kept weights are certain (+inf), ablated neurons impossible (-inf); the rest by score.
        lifted = torch.where(keep, torch.inf, grow)
        lifted = torch.where(alive_2d, lifted, -torch.inf)
        new = topk_mask(lifted, per_unit, self.structure) & alive_2d
        self._check_invariants(layer, new, alive, per_unit)
        return new.view_as(layer.mask)

    def _check_invariants(self, layer: SparseTensor, new: torch.Tensor, alive: torch.Tensor, per_unit: int) -> None:
        """Cheap vectorised checks; an internal error, never a user error."""
        if isinstance(self.structure, ConstantFanIn):
            counts = new.sum(dim=1)  # (out,)
            expected = torch.where(alive, per_unit, 0)
            if not bool((counts == expected).all()):
                raise NotConstantFanInError(
                    f"{layer.name}: fan-in after update is not constant: counts {counts.unique().tolist()} "
                    f"for k'={per_unit}"
                )
        elif isinstance(self.structure, Unstructured) and int(new.sum()) != layer.budget:
            raise NotConstantFanInError(f"{layer.name}: {int(new.sum())} active weights, budget {layer.budget}")

    def _apply(self, layer: SparseTensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Install ``new``: zero dropped weights, start regrown ones at 0, reset their optimizer state."""
        layer.mask.copy_(new)
        layer.param.masked_fill_(~(new & old), 0.0)  # dropped -> 0; regrown (not in old) start at exactly 0
        if layer.param.grad is not None:
            # The gradient of a just-dropped weight would otherwise live on until zero_grad (and
            # move the weight in an optimizer step taken before it).
            layer.param.grad.masked_fill_(~new, 0.0)
        self._reset_state(layer, new & old)

    def _reset_state(self, layer: SparseTensor, keep: torch.Tensor) -> None:
        """Zero every optimizer state tensor shaped like the parameter outside ``keep``."""
        for value in self.optimizer.state.get(layer.param, {}).values():
            if torch.is_tensor(value) and value.shape == layer.param.shape:
                value.masked_fill_(~keep, 0)

    # ------------------------------------------------------------------ inspection
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter FQN: bool mask}`` (copies) for every sparse tensor."""
        return {layer.name: layer.mask.detach().clone() for layer in self.layers}

    @property
    def step_count(self) -> int:
        """Sparsifier steps taken so far."""
        return self._step

    def summary(self) -> Summary:
        """Per-parameter report: shape, sparse or dense and why, sparsity, fan-in, active neurons.

        A dict ``{FQN: entry}`` that prints as a table (``print(sparsifier.summary())``).
        """
        by_name = {layer.name: layer for layer in self.layers}
        report = Summary()
        for c in self.decisions:
            numel = math.prod(c.shape)
            entry: dict[str, Any] = {"shape": c.shape, "sparse": c.sparse, "reason": c.reason, "numel": numel}
            layer = by_name.get(c.name)
            if layer is None:
                entry.update(nnz=numel, sparsity=0.0)
            else:
                counts = layer.mask.reshape(layer.n_rows, -1).sum(dim=1)  # (out,)
                active = counts > 0
                nnz = int(counts.sum())
                fan_ins = counts[active].unique().tolist()
                entry.update(
                    nnz=nnz,
                    sparsity=1.0 - nnz / numel,
                    target_sparsity=layer.sparsity,
                    fan_in=fan_ins[0] if len(fan_ins) == 1 else None,
                    mean_fan_in=float(counts[active].float().mean()) if bool(active.any()) else 0.0,
                    dense_fan_in=layer.fan_in,
                    active_neurons=int(active.sum()),
                    neurons=layer.n_rows,
                    ablation=layer.ablate,
                    structure=_describe(self.structure),
                )
            report[c.name] = entry
        return report

    def global_sparsity(self) -> float:
        """Fraction of zeros over all sparse tensors together."""
        total = sum(layer.mask.numel() for layer in self.layers)
        return 1.0 - sum(int(layer.mask.sum()) for layer in self.layers) / total

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        """Plain, serialisable hyperparameters (no module references)."""
        return {
            "algorithm": self.name,
            "sparsity": self.target_sparsity,
            "distribution": self.distribution,
            "structure": _describe(self.structure),
            "delta": self.schedule.delta,
            "alpha": self.schedule.alpha,
            "t_end": self.schedule.t_end,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "erk_power": self.erk_power,
            "mask_init": self.mask_init,
            "sparse_init": self.sparse_init,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: masks by FQN, step, generator, config."""
        return {
            "version": STATE_DICT_VERSION,
            "config": self.config(),
            "step": self._step,
            "masks": self.masks(),
            "budgets": {layer.name: layer.budget for layer in self.layers},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a state from another model or configuration."""
        if not isinstance(state, Mapping) or "masks" not in state or "config" not in state:
            raise StateDictMismatchError("not a srigl sparsifier state dict (no 'masks'/'config' entries)")
        mine, theirs = self.config(), state["config"]
        for key in ("algorithm", "sparsity", "distribution", "structure"):
            if mine[key] != theirs.get(key):
                raise StateDictMismatchError(
                    f"state dict was saved with {key}={theirs.get(key)!r}, this sparsifier has {key}={mine[key]!r}"
                )
        names = {layer.name for layer in self.layers}
        saved = set(state["masks"])
        if names != saved:
            raise StateDictMismatchError(
                f"state dict masks other tensors: missing {sorted(names - saved)[:5]}, "
                f"unexpected {sorted(saved - names)[:5]}"
            )
        for layer in self.layers:
            mask = state["masks"][layer.name]
            if tuple(mask.shape) != tuple(layer.mask.shape):
                raise StateDictMismatchError(
                    f"{layer.name}: saved mask shape {tuple(mask.shape)} != parameter shape {tuple(layer.mask.shape)}"
                )
        with torch.no_grad():
            for layer in self.layers:
                layer.mask.copy_(state["masks"][layer.name].to(layer.mask.device, torch.bool))
                layer.budget = int(state["budgets"][layer.name])
                layer.param.masked_fill_(~layer.mask, 0.0)
        self._step = int(state["step"])
        self.generator.set_state(state["generator"])
        self._pending_optimizer_steps = 0
        self._dense_grads.clear()
        self._collecting = self.needs_dense_grad and self.schedule.is_update_step(self._step + 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.target_sparsity}, structure={self.structure}, "
            f"layers={len(self.layers)}, step={self._step}, schedule={self.schedule})"
        )


@register_algorithm("static")
class Static(Sparsifier):
    """Fixed random masks for the whole run (the sparse baseline)."""

    def _make_schedule(self, total_steps, delta, alpha, t_end) -> CosineDrop:
        # Static needs no total_steps: its masks never change whatever t_end would be.
        schedule = super()._make_schedule(total_steps, delta, alpha, 0 if t_end is None else t_end)
        return dataclasses.replace(schedule, t_end=0)  # no update step ever


@register_algorithm("set")
class SET(Sparsifier):
    """Sparse Evolutionary Training: drop the smallest magnitudes, regrow at random."""

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)


@register_algorithm("rigl")
class RigL(Sparsifier):
    """Rigged Lottery: drop the smallest magnitudes, regrow where the dense gradient is largest."""

    needs_dense_grad = True

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        return dense_grad.abs()


@register_algorithm("srigl")
class SRigL(RigL):
    """Structured RigL: constant fan-in per neuron, with dynamic neuron ablation.

    Args:
        gamma_sal: minimum fraction of a neuron's ``k`` weights that must be salient for it to stay
            active (0.3 for CNNs, 0.95 for ViTs in the paper); 0 disables ablation, giving plain
            constant fan-in RigL.
        compact: train each sparse layer as ``(n_active, k)`` values + indices instead of a masked
            dense weight; returns a :class:`srigl.compact.CompactSRigL` (see its usage notes).
        **kwargs: as :class:`Sparsifier`.
    """

    default_structure = ConstantFanIn()

    def __new__(cls, *args: Any, compact: bool = False, **kwargs: Any):
        # compact=True dispatches to the compact engine, imported on demand so the core stays torch-only.
        if compact and not getattr(cls, "is_compact", False):
            if cls is not SRigL:
                raise InvalidConfigError(f"compact=True is available for SRigL itself, not its subclass {cls.__name__}")
            from srigl.compact import CompactSRigL

            cls = CompactSRigL
        return super().__new__(cls)

    def __init__(
        self, model, optimizer, sparsity=0.9, total_steps=None, *, gamma_sal: float = 0.3, compact: bool = False, **kwargs
    ):
        del compact  # consumed by __new__
        try:
            value = math.nan if isinstance(gamma_sal, (str, bytes)) else float(gamma_sal)
        except (TypeError, ValueError):
            value = math.nan  # None, objects: refused below with the value named
        if not (0.0 <= value <= 1.0):
            raise InvalidConfigError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
        self.gamma_sal = float(gamma_sal)
        structure = kwargs.get("structure")
        if structure is not None and not isinstance(structure, ConstantFanIn):
            # Checked before the base class masks anything, so the model is left untouched.
            raise InvalidConfigError(f"SRigL needs the ConstantFanIn structure, got {structure!r}")
        super().__init__(model, optimizer, sparsity, total_steps, **kwargs)

    def surviving_rows(self, layer, mask, drop, grow, n_drop) -> torch.Tensor:
        if not layer.ablate or self.gamma_sal == 0.0:
            return torch.ones(layer.n_rows, dtype=torch.bool, device=mask.device)
        counts = mask.sum(dim=1)  # (out,)
        k = int(counts.max())  # the current constant fan-in of active neurons
        salient = ablation.salient_weights(mask, drop, grow, n_drop)
        return ablation.surviving_neurons(
            salient, k, self.gamma_sal, ablation.min_neurons_for(layer.budget, layer.fan_in)
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma_sal": self.gamma_sal}
