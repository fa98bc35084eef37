"""The sparsifier: one update template over every sparse tensor, whatever its storage.

Every ``delta`` steps until ``t_end`` each sparse tensor is seen as a dense ``(out, fan_in)`` weight,
mask and (for gradient-grown algorithms) dense gradient averaged over ranks; :meth:`Sparsifier._update_layer`
drops and regrows on those, and the tensor's storage installs the new mask. The storage
(:mod:`srigl.storage`) decides how a tensor is held: masked-dense (a ``<param>_mask`` buffer) or
compact (``(n_active, k)`` values + indices); nothing here asks which. Algorithms
(:mod:`srigl.algorithms`) override only their grow scores, default structure and which neurons
survive.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import operator
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from srigl import ablation, blockwise, distributed, guards, initial, masks, state
from srigl.distributions import layer_sparsities
from srigl.errors import (
    FanInTooSmallError,
    InvalidConfigError,
    MaskError,
    NoSparsifiableLayerError,
    ParameterNotInOptimizerError,
    StateDictMismatchError,
    StepOrderError,
)
from srigl.schedules import CosineDrop
from srigl.selection import Candidate, SparsityPolicy, select, type_name
from srigl.storage import SparseParam
from srigl.storage.masked import MaskedParam
from srigl.structures import Structure, Unstructured, topk_mask
from srigl.summary import Summary

class Sparsifier:
    """Base class: masks, hooks, schedule, state dict, summary; ``Static`` behaviour.

    Args:
        model: any ``nn.Module`` (DDP and ``torch.compile`` wrappers are unwrapped: names are the
            user module's).
        optimizer: the one optimizer stepping ``model``'s parameters (wrappers such as accelerate's
            ``AcceleratedOptimizer`` or Lightning's ``LightningOptimizer`` are unwrapped; a list is
            refused: one sparsifier per optimizer).
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
            already-sparse model; refused when they break the structure or budget). ``"auto"`` (the
            default) adopts the zeros of a tensor that is already at least as sparse as its target
            (a sparse model restored from ``model.state_dict()``, which holds no masks) and draws
            random masks for the others. See :mod:`srigl.initial`.
        sparse_init: with ``mask_init="random"``, rescale each sparse neuron's freshly initialised
            weights by ``sqrt(dense fan-in / sparse fan-in)`` (the SRigL reference's sparse Kaiming
            init); without it, high sparsities may not train. Never applied to ``"magnitude"`` or
            ``"nonzero"`` masks, whose weights are trained ones.
        output_layer: FQN of the output layer's weight (never ablated; ``dense_last`` keeps it
            dense). Default: the last selected layer *called* in the forward (traced with
            ``torch.fx``), or the last one registered when the model cannot be traced.
        compact: train each sparse layer as ``(n_active, k)`` values + indices (constant fan-in
            structures only): the layer is swapped for its condensed twin and the optimizer's param
            groups are rewritten in place to hold the twin's ``values`` (see :mod:`srigl.storage.compact`;
            do what captures parameters, such as ``torch.compile`` or EMA copies, afterwards).
            Tensors without a compact twin stay masked; :meth:`summary` says why.
        compact_types: with ``compact``, the dense module types trained compact (default Linear,
            Conv2d, MultiheadAttention). A compact Conv2d saves ``kh * kw`` times its input for
            backward (im2col), so for 3x3-conv networks ``(nn.Linear,)`` can be the better trade.
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
        mask_init: str = "auto",
        sparse_init: bool = True,
        output_layer: str | None = None,
        compact: bool = False,
        compact_types: tuple[type[nn.Module], ...] | None = None,
    ):
        self.model = masks.unwrap(model)
        distributed.refuse_sharded(self.model)
        self.optimizer = self._check_optimizer(optimizer)
        self.structure = structure if structure is not None else self.default_structure
        self.storage = self._check_storage(compact, compact_types)
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
                f"({len(self.decisions)} parameters looked at; types {[type_name(t) for t in self.policy.types]})"
            )
        self._check_in_optimizer(chosen)
        guards.check_unclaimed(self, [c.name for c in chosen])
        self.layers: list[SparseParam] = self._init_layers(chosen)
        if not self.layers:
            raise NoSparsifiableLayerError(
                f"every selected tensor of {type(self.model).__name__} is dense at sparsity {self.target_sparsity}"
            )
        #: Tensors of a compact run kept masked-dense -> why.
        self.masked_reasons: dict[str, str] = {}
        if self.storage == "compact":
            from srigl.storage import compact as compact_storage  # lazy: it needs srigl.condensed

            self.layers, self.masked_reasons = compact_storage.make_compact(self.model, self.layers, self.compact_types)

        self._step = 0
        self._pending_optimizer_steps = 0
        #: Calls of :meth:`step` that found the optimizer step skipped for non-finite gradients.
        self.skipped_steps = 0
        self.last_update: dict[str, Any] = {}
        self._set_collecting(self.needs_dense_grad and self.schedule.is_update_step(1))
        self._step_hook = self.optimizer.register_step_post_hook(self._after_optimizer_step)
        self._load_hooks = [
            layer.module.register_load_state_dict_post_hook(self._after_model_load)
            for layer in {id(layer.module): layer for layer in self.layers if isinstance(layer, MaskedParam)}.values()
        ]
        guards.claim(self)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
        """The torch optimizer to hook: wrappers unwrapped (:func:`srigl.masks.unwrap_optimizer`);
        several optimizers refused (each counts its own steps, and a mask update resets the state of
        the one that holds the tensor)."""
        if isinstance(optimizer, (list, tuple)):
            raise InvalidConfigError(
                f"a sparsifier takes one optimizer, got a {type(optimizer).__name__} of {len(optimizer)}: build one "
                "sparsifier per optimizer, over the parameters that optimizer holds "
                "(policy=srigl.SparsityPolicy(include=(their names, ...)))"
            )
        return None if optimizer is None else masks.unwrap_optimizer(optimizer)

    def _check_storage(self, compact: bool, compact_types) -> str:
        """``"compact"`` or ``"masked"``; refused before anything is touched."""
        if not compact:
            if compact_types is not None:
                raise InvalidConfigError("compact_types applies to compact training only; pass compact=True too")
            self.compact_types: tuple[type[nn.Module], ...] = ()
            return "masked"
        if not getattr(self.structure, "condensable", False):
            raise InvalidConfigError(
                f"compact training stores every active neuron as k values + indices: it needs the "
                f"ConstantFanIn structure, and {type(self).__name__} has {self.structure!r}"
            )
        if self.optimizer is None:
            raise InvalidConfigError(
                "compact training rewrites the optimizer's param groups: build the optimizer over "
                "model.parameters() first and pass it"
            )
        from srigl.storage import compact as compact_storage

        self.compact_types = compact_storage.check_types(
            compact_storage.DEFAULT_TYPES if compact_types is None else compact_types
        )
        return "compact"

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

    def _init_layers(self, chosen: list[Candidate]) -> list[MaskedParam]:
        # ERK reads the stored shapes (a conv's kernel dims count; a 2-D ratio is the same transposed);
        # every size below is of the engine's (out, fan_in) view.
        shapes = {c.name: c.shape for c in chosen}
        fixed = self.structure.fixed_density()
        if fixed is not None:  # N:M: the structure fixes the density
            sparsities = {n: 1.0 - fixed for n in shapes}
        else:
            min_density = {c.name: self.structure.min_density(*c.view.rows_shape) for c in chosen}
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
            n_rows, fan_in = c.view.rows_shape
            self.structure.check_shape(n_rows, fan_in, c.name)
            density = 1.0 - sparsities[c.name]
            n = self.structure.n_per_unit(density, n_rows, fan_in)
            if n < 1:
                raise FanInTooSmallError(
                    f"{c.name} {c.shape}: fan-in {fan_in} is too small for density {density:.4g} "
                    f"({density * fan_in:.3g} weights per neuron); lower the sparsity or keep it dense"
                )
            budget = self.structure.units(n_rows, fan_in) * n
            if param.is_meta:  # no values to read: draw the compact layout (out, k) directly
                from srigl.kernels.checks import index_dtype_for
                from srigl.storage import compact as compact_storage

                parent = self.model.get_submodule(c.module_name.rpartition(".")[0]) if c.module_name else None
                compact_storage.check_meta(c.name, c.shape, module, parent, n, self.storage, self.mask_init,
                                           self.compact_types, compact_storage.materialise_on(self.model))
                how = "random"
                first = initial.random_layout(n_rows, fan_in, n, self.generator, dtype=index_dtype_for(fan_in))
            else:
                how = initial.resolve_mask_init(self.mask_init, param, budget)
                first = initial.first_mask(param, c.view, n, c.name, how, auto=self.mask_init == "auto",
                                           structure=self.structure, generator=self.generator)
            planned.append((c, module, param, first, budget, how))
        adopted = [c.name for c, *_, how in planned if how == "nonzero" and self.mask_init == "auto"]
        if adopted:
            warnings.warn(
                f"srigl: {len(adopted)} tensors already hold no more non-zeros than their budget ({adopted[:3]}): "
                "their zeros are adopted as masks (mask_init='auto'; pass mask_init='random' to draw new ones)",
                UserWarning,
                stacklevel=3,
            )
        #: How each tensor's first mask was drawn ("random", "magnitude" or "nonzero"; "auto" resolved).
        self.initial_masks = {c.name: how for c, *_, how in planned}
        layers = []
        for c, module, param, mask, budget, how in planned:
            ablate = (
                self.structure.ablatable
                and not c.is_output
                and not any(fnmatch.fnmatchcase(c.name, p) for p in self.no_ablation)
            )
            if param.is_meta:
                from srigl.storage import compact as compact_storage

                layers.append(compact_storage.from_meta(
                    self.model, c.module_name, mask, name=c.name, sparsity=sparsities[c.name], budget=budget,
                    ablate=ablate, optimizer=self.optimizer, sparse_init=self.sparse_init,
                ))
                continue
            layer = MaskedParam(
                c.name, module, c.param_name, mask, sparsities[c.name], budget, ablate, self.optimizer,
                transposed=c.transposed,
            )
            if how == "random" and self.sparse_init:
                with torch.no_grad():
                    initial.rescale_to_sparse_fan_in(param, mask, c.view)
            layers.append(layer)
        return layers

    # ------------------------------------------------------------------ hooks
    def _set_collecting(self, flag: bool) -> None:
        for layer in self.layers:
            layer.collecting = flag

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._pending_optimizer_steps += 1
        with torch.no_grad():
            for layer in self.layers:
                layer.after_optimizer_step()

    def _after_model_load(self, module: nn.Module, incompatible_keys) -> None:
        # model.state_dict() holds no masks: weights loaded without theirs must not be zeroed.
        guards.adopt_loaded_weights(self, module)

    def remove_hooks(self) -> None:
        """Detach every hook srigl installed (masks stay on the modules); another sparsifier may then
        take over the tensors."""
        for layer in self.layers:
            layer.remove_hooks()
        guards.release(self)
        self._step_hook.remove()
        for handle in self._load_hooks:
            handle.remove()

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
                # counted, and what was held for an update is dropped (the next backward collects
                # it again).
                self.skipped_steps += 1
                self._clear()
                return None
            raise StepOrderError(
                f"sparsifier.step() called at step {self._step} without optimizer.step() since the last call; "
                "call optimizer.step() first (a step that torch.amp.GradScaler skipped for non-finite "
                "gradients is recognised and not counted)"
            )
        if self._pending_optimizer_steps > 1:
            raise StepOrderError(
                f"{self._pending_optimizer_steps} optimizer steps since the last sparsifier.step() (at step "
                f"{self._step}): the schedule counts one sparsifier step per optimizer step, so call "
                "sparsifier.step() after every optimizer.step()"
            )
        self._pending_optimizer_steps = 0
        self._step += 1
        stats = None
        if self.schedule.is_update_step(self._step):
            stats = self._update(self.schedule.drop_fraction(self._step))
        self._clear()
        self._set_collecting(self.needs_dense_grad and self.schedule.is_update_step(self._step + 1))
        return stats

    def _clear(self) -> None:
        for layer in self.layers:
            layer.clear()

    def _gradients_non_finite(self) -> bool:
        """Whether any gradient the optimizer holds is NaN or inf (what a skipped AMP step leaves)."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not all(bool(torch.isfinite(g).all()) for g in grads)

    @torch.no_grad()
    def _update(self, drop_fraction: float) -> dict[str, Any]:
        for layer in self.layers:
            problem = self.structure.counts_problem(layer.fan_in_counts(), layer.budget, layer.fan_in)
            if problem is not None:
                # A mask edited by hand: one over-full row would make every other neuron look
                # unsalient and ablate most of the layer.
                raise MaskError(
                    f"{layer.name}: its mask no longer fits {self.structure!r} with budget {layer.budget} at step "
                    f"{self._step}: {problem}; masks must be changed only by the sparsifier (load_state_dict)"
                )
        if self.needs_dense_grad:
            bad = [layer.name for layer in self.layers if not layer.grads_finite()]
            no_backward = not any(list(layer.held()) for layer in self.layers)
            # Every rank takes the same branch, or their masks would part.
            any_bad, any_without_backward = distributed.any_rank(bool(bad), no_backward)
            if any_bad:
                return self._skip_update(bad)
            if any_without_backward:
                return self._skip_update([], reason="no backward pass since the last step")
        layers_stats = {}
        # One tensor at a time: at most one dense (out, fan_in) weight, mask and gradient live at
        # once, whatever the storage.
        for layer in self.layers:
            if layer.block_rows is not None:
                # Compact: the same update from the condensed layout, a block of rows at a time.
                layers_stats[layer.name] = blockwise.update_layer(self, layer, drop_fraction)
                continue
            weight, old = layer.dense_view()  # (out, fan_in) each
            # Averaged over ranks so every rank picks the same masks (same layer order everywhere).
            grad = distributed.mean_(layer.dense_grad()) if self.needs_dense_grad else None
            new = self._update_layer(layer, weight, old, grad, drop_fraction)
            del grad
            layer.install(weight, old, new)
            layers_stats[layer.name] = {
                "grown": int((new & ~old).sum()),
                "active_neurons": int(new.any(dim=1).sum()),
            }
        self.last_update = {"step": self._step, "drop_fraction": drop_fraction, "layers": layers_stats}
        return self.last_update

    def _skip_update(self, bad: list[str], reason: str = "non-finite gradients") -> dict[str, Any]:
        """Leave every mask as it is this step: some dense gradients are NaN or inf, or there are none."""
        if reason == "non-finite gradients":
            where = f"in {len(bad)} tensors ({bad[:3]})" if bad else "on another rank"
            what = f"non-finite dense gradients at step {self._step} {where}"
        else:
            what = f"{reason} (step {self._step}): no dense gradient to regrow by"
        warnings.warn(f"srigl: {what}; mask update skipped, masks unchanged", RuntimeWarning, stacklevel=4)
        self.last_update = {"step": self._step, "skipped": True, "reason": reason}
        return self.last_update

    # ------------------------------------------------------------------ the template
    def drop_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Score of keeping an active weight: its magnitude."""
        return weight.abs()

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        """Score of growing an inactive weight; algorithms override this."""
        raise NotImplementedError

    def surviving_rows(
        self, layer: SparseParam, salient_counts: Callable[[], torch.Tensor], k: int
    ) -> torch.Tensor:
        """Output neurons that stay active this step, ``(out,)`` bool. Default: all of them.

        Args:
            layer: the tensor being updated.
            salient_counts: returns salient weights per neuron ``(out,)`` (see :mod:`srigl.ablation`);
                computed only if called (it costs a pass over the dense gradient).
            k: the current constant fan-in of the active neurons.
        """
        return torch.ones(layer.n_rows, dtype=torch.bool)

    def _update_layer(
        self, layer: SparseParam, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor | None, drop_fraction: float
    ) -> torch.Tensor:
        """The new ``(out, fan_in)`` mask of one tensor from its ``(out, fan_in)`` weight, mask and gradient."""
        n_active = int(mask.sum())
        # K, raised to drop every active weight that is exactly 0 (it carries nothing to keep;
        # its slot is regrown by gradient like the others). See docs/algorithm.md, choice (f).
        n_zero = int((mask & (weight == 0)).sum())
        n_drop = max(int(drop_fraction * n_active), n_zero) if drop_fraction > 0 else 0
        drop = self.drop_scores(weight)
        grow = self.grow_scores(weight, grad)

        counts = mask.sum(dim=1)  # (out,)
        alive = self.surviving_rows(
            layer, lambda: ablation.salient_weights(mask, drop, grow, n_drop).sum(dim=1), int(counts.max())
        ).to(mask.device)  # (out,)
        per_unit = self.structure.per_unit_after(layer.budget, int(alive.sum()), layer.fan_in)
        alive_2d = alive[:, None]  # (out, 1)

        # Drop: of the active weights in surviving neurons, keep all but the K smallest magnitudes
        # (over the whole layer, not per neuron).
        candidates = mask & alive_2d
        n_keep = max(int(candidates.sum()) - n_drop, 0)
        keep = topk_mask(torch.where(candidates, drop, -torch.inf), n_keep, Unstructured())
        if self.structure != Unstructured():
            # A unit cannot keep more than its new quota (k' may shrink when neurons revive).
            keep &= topk_mask(torch.where(keep, drop, -torch.inf), per_unit, self.structure)

        # Grow: kept weights are certain (+inf), ablated neurons impossible (-inf); the rest by score.
        lifted = torch.where(keep, torch.inf, grow)
        lifted = torch.where(alive_2d, lifted, -torch.inf)
        new = topk_mask(lifted, per_unit, self.structure) & alive_2d
        self.structure.check_update(layer.name, new, alive, per_unit, layer.budget)
        return new

    # ------------------------------------------------------------------ inspection
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter FQN: bool mask}`` (copies, shaped like the dense weights) for every sparse tensor."""
        return {layer.name: layer.mask() for layer in self.layers}

    def held_tensors(self) -> list[torch.Tensor]:
        """What is held right now to form dense gradients for the next update (memory accounting):
        dense gradients of masked tensors, inputs and output gradients of compact ones."""
        return [t for layer in self.layers for t in layer.held()]

    @property
    def step_count(self) -> int:
        """Sparsifier steps taken so far."""
        return self._step

    def summary(self) -> Summary:
        """Per-parameter report: shape, sparse or dense and why, sparsity, fan-in, active neurons,
        storage (and why a tensor of a compact run stays masked).

        A dict ``{FQN: entry}`` that prints as a table (``print(sparsifier.summary())``).
        """
        return Summary.of(self.decisions, self.layers, repr(self.structure), self.masked_reasons)

    def global_sparsity(self) -> float:
        """Fraction of zeros over all sparse tensors together."""
        total = sum(layer.n_rows * layer.fan_in for layer in self.layers)
        return 1.0 - sum(int(layer.fan_in_counts().sum()) for layer in self.layers) / total

    # ------------------------------------------------------------------ distributed
    def ddp_ignored_names(self) -> list[str]:
        """Names (relative to the model) of the tensors DDP must not manage: those of compact layers."""
        names = {id(module): name for name, module in self.model.named_modules()}
        return [n for layer in self.layers for n in layer.ddp_ignored_names(names)]

    def wrap_ddp(self, **ddp_kwargs: Any) -> nn.Module:
        """The model wrapped in ``DistributedDataParallel``; call it after building the sparsifier.

        DDP averages the gradient of every ordinary parameter; compact tensors
        (:meth:`ddp_ignored_names`) are left to their storage, which averages their gradients as
        soon as backward has accumulated them and follows the Parameters an update swaps in. Every
        rank must build the same model with the same seed (the masks are then equal, and updates
        keep them equal: their dense gradients are averaged too).

        Raises:
            InvalidConfigError: no process group is initialized.
        """
        return distributed.wrap_ddp(self.model, self.layers, self.ddp_ignored_names(), **ddp_kwargs)

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        """Plain, serialisable hyperparameters (no module references)."""
        config = {
            "algorithm": self.name,
            "sparsity": self.target_sparsity,
            "distribution": self.distribution,
            "structure": repr(self.structure),
            "delta": self.schedule.delta,
            "alpha": self.schedule.alpha,
            "t_end": self.schedule.t_end,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "erk_power": self.erk_power,
            "mask_init": self.mask_init,
            "sparse_init": self.sparse_init,
        }
        if self.storage == "compact":
            config.update(compact=True, compact_types=[t.__name__ for t in self.compact_types])
        return config

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (see :func:`srigl.state.dump`): step, generator,
        config, budgets, and each tensor's mask or compact layout."""
        return state.dump(self)

    def check_state_dict(
        self, saved: Any, error: type[StateDictMismatchError] = StateDictMismatchError, what: str = "state dict"
    ) -> None:
        """Raise ``error`` unless :meth:`load_state_dict` can take ``saved``; changes nothing. The one
        validator of a sparsifier state (:mod:`srigl.io.checkpoint` calls it with ``what="checkpoint"``):
        the settings that give masks their meaning, the tensors, and masks that fit the structure and budget."""
        state.check(self, saved, error, what)

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses (before changing anything) a state from another
        model, configuration or storage. A compact layer takes the saved layout's shape (contents
        undefined until ``model.load_state_dict`` fills them), so the order of loading does not matter."""
        state.load(self, saved)
        self._step = int(saved["step"])
        self._pending_optimizer_steps = 0
        self._clear()
        self._set_collecting(self.needs_dense_grad and self.schedule.is_update_step(self._step + 1))

    def __getstate__(self) -> dict[str, Any]:
        # Pickling would carry the model, the optimizer and live hooks; what resumes a run is small.
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled (it holds the model, the optimizer and hooks): save "
            "sparsifier.state_dict() (with srigl.save_checkpoint), and load it into a new sparsifier"
        )

    def __deepcopy__(self, memo: dict) -> "Sparsifier":
        # copy.deepcopy(sparsifier) copies the model and optimizer with it: allowed (the copy is bound
        # to the copies), though pickling is not.
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, copy.deepcopy(value, memo))
        return clone

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.target_sparsity}, structure={self.structure}, "
            f"storage={self.storage!r}, layers={len(self.layers)}, step={self._step}, schedule={self.schedule})"
        )
