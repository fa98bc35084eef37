"""Compact sparse training: constant fan-in layers trained as ``(n_active, k)`` values + indices.

The masked-dense engine (:class:`srigl.SRigL`) keeps every sparse weight dense, with a dense mask,
a dense gradient and dense optimizer state, so a 90 %-sparse model trains as slowly and as large as a
dense one. Constant fan-in allows better: every active output neuron has exactly ``k`` incoming
weights, so a layer *is* a ``(n_active, k)`` block of values plus the same-shaped block of fan-in
positions. :class:`CompactSRigL` trains in that form for the whole run:

* every sparse ``nn.Linear`` and ``nn.Conv2d`` becomes a :class:`srigl.condensed.CondensedLinear` /
  :class:`~srigl.condensed.CondensedConv2d`, and every ``nn.MultiheadAttention`` with sparse
  projections a :class:`CompactMultiheadAttention` whose projections are such layers; their
  ``values`` are the parameters the optimizer steps and their forward and backward run the fan-in
  matmul; the optimizer state is ``(n_active, k)`` too;
* the mask update runs every ``delta`` steps with the *same* seven SRigL steps as the masked-dense
  engine (it calls :meth:`srigl.Sparsifier._update_layer` itself), on a dense weight, mask and
  gradient built for one layer at a time and freed before the next;
* the dense gradient that scores regrowth is never formed during ordinary steps: on the step of an
  update, a forward hook keeps each compact layer's input ``x`` and a tensor hook its output
  gradient ``g``, and at the update ``dense_grad = g^T x`` (what autograd would compute for a dense
  weight) is formed one layer at a time. Where ``x`` and ``g`` together are larger than the
  ``(out, fan_in)`` gradient (many rows: tokens x batch in a transformer), the hook forms that
  layer's ``g^T x`` in backward instead and drops them, so an update step holds, per layer, the
  smaller of the two.

Tensors without a compact twin (Conv1d/Conv3d, Conv2d with string padding or non-zero padding modes,
attentions with ``kdim``/``vdim``, ``bias_k`` or inside ``nn.TransformerEncoderLayer``, whose fast
path reads raw tensors) stay masked-dense under the ordinary hooks; :meth:`CompactSRigL.summary`
says which and why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from srigl.algorithms import STATE_DICT_VERSION, SparseTensor, SRigL, _grad_was_reset
from srigl.condensed import CondensedLinear, CondensedMultiheadAttention, CondensedTensor, condense_tensor
from srigl.condensed.twins import (
    _HOLDER,
    _SPARSE_TENSORS,
    COMPACT_TWINS,
    _convert,
    _unit_of,
    _why_not_compact,
    from_masked_dense,
    to_masked_dense,
)
from srigl.errors import InvalidConfigError, StateDictMismatchError

__all__ = [
    "COMPACT_TWINS",
    "CompactMultiheadAttention",
    "CompactSRigL",
    "CompactTensor",
    "from_masked_dense",
    "to_masked_dense",
]

# ------------------------------------------------------------------------------------------ attention
# The attention with condensed projections lives with the other condensed layers; compact training
# converts with its own projection twins (see _convert).
CompactMultiheadAttention = CondensedMultiheadAttention


def _average_over_ranks(param: nn.Parameter) -> None:
    """Post-accumulate-grad hook: ``param.grad`` becomes its mean over the ranks.

    With gradient accumulation it runs after every backward; averaging the running sum each time
    still gives the mean of the sums (the part averaged before is already equal on every rank).
    """
    import torch.distributed as dist

    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


# ------------------------------------------------------------------------------------------ book-keeping
@dataclass
class CompactTensor:
    """Book-keeping for one compact sparse tensor (the twin of :class:`srigl.algorithms.SparseTensor`).

    ``param`` and ``mask`` are *built on demand* as dense tensors shaped like the original weight
    (for inspection, :meth:`CompactSRigL.masks` and ``summary``); training never reads them.
    """

    name: str  # FQN of the original weight, e.g. "blocks.0.mlp.0.weight"
    module: nn.Module  # its CondensedLinear / CondensedConv2d
    shape: tuple[int, ...]  # the dense weight's shape
    sparsity: float
    budget: int
    ablate: bool

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def param(self) -> torch.Tensor:
        return self.module.dense_weight().view(self.shape)

    @property
    def mask(self) -> torch.Tensor:
        return self.module.dense_mask().view(self.shape)

    def layout(self) -> CondensedTensor:
        """The current ``(active_rows, indices, values)`` of the layer (values detached)."""
        module = self.module
        return CondensedTensor(
            active_rows=module.active_rows,
            indices=module.indices,
            values=module.values.detach(),
            fan_in=module.fan_in,
            out_features=self.n_rows,
            in_features_flat=self.fan_in,
        )


@dataclass(frozen=True)
class _DenseView:
    """One layer seen as dense ``(out, fan_in)`` tensors: what ``Sparsifier._update_layer`` reads."""

    name: str
    param: torch.Tensor  # (out, fan_in)
    mask: torch.Tensor  # (out, fan_in) bool
    budget: int
    ablate: bool

    @property
    def n_rows(self) -> int:
        return self.param.shape[0]

    @property
    def fan_in(self) -> int:
        return self.param.shape[1]


def _dense_grad(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Gradient of the loss w.r.t. the dense weight of ``module`` as ``(out, fan_in)``: what autograd
    computes for a dense layer, from the layer's input and output gradient."""
    if isinstance(module, CondensedLinear):
        x_2d = x.reshape(-1, x.shape[-1])  # (N, in), N = every leading dim
        g_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        return g_2d.t().mm(x_2d)  # (out, in)
    if x.dim() == 3:  # unbatched (C, H, W)
        x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
    weight_size = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    grad = torch.nn.grad.conv2d_weight(
        x, weight_size, grad_out, module.stride, module.padding, module.dilation, module.groups
    )  # (out, C / groups, kh, kw)
    return grad.reshape(module.out_channels, -1)  # (out, fan_in)


# ------------------------------------------------------------------------------------------ the sparsifier
class CompactSRigL(SRigL):
    """SRigL trained in compact form: each sparse layer's weights, gradient and optimizer state are
    ``(n_active, k)`` values + indices for the whole run.

    Usage is the masked-dense usage, plus ``compact=True``: build the optimizer over the dense model
    as usual and hand both over; the sparsifier swaps each sparse layer for its compact twin and
    rewrites the optimizer's param groups *in place* so that each group holds the layer's
    ``values`` where it held the dense ``weight`` (same group, same hyperparameters; optimizer state
    that already exists is condensed with it)::

        model = srigl.models.create_model("mlp")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = srigl.SRigL(model, optimizer, sparsity=0.9, total_steps=T, compact=True)
        # model.fc1 is now a CondensedLinear; optimizer steps model.fc1.values
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step(); sp.step(); optimizer.zero_grad()

    Rewriting the groups (rather than converting first and asking for the optimizer afterwards) keeps
    the training loop, LR schedulers and per-group options exactly as for masked-dense training.
    Because the model changes, do the things that capture parameters *after* construction
    (``torch.compile``, EMA copies). Layers hooked or tied by reference elsewhere should be excluded
    with the ``policy``. DistributedDataParallel only with ``gamma_sal=0``: an ablation step replaces
    ``values`` Parameters (below), which DDP would no longer all-reduce.

    On an update step the layout changes: kept weights keep their values and optimizer state,
    regrown weights start at 0 with zero state, exactly as in the masked-dense engine; every state
    tensor shaped like ``values`` is remapped, and the stale ``.grad`` is set to None. While
    ``(n_active, k)`` stays the same, ``values`` stays the same Parameter. When ablation changes it,
    ``values`` becomes a new Parameter, swapped into the module and the optimizer with its state (so
    read ``module.values`` afresh rather than keeping a reference across updates).

    Checkpoints: ``model.state_dict()`` stores ``values``, ``indices`` and ``active_rows`` (size
    proportional to density); :meth:`state_dict` stores the step, generator, budgets and layouts,
    and dense masks only for tensors trained masked-dense. A compact layer accepts a saved layout of
    another shape in ``load_state_dict``, so model, optimizer and sparsifier load in any order.
    :func:`to_masked_dense` / :func:`from_masked_dense` convert a model between the two forms.

    Args:
        model: as :class:`srigl.SRigL`.
        optimizer: the optimizer over ``model``'s dense parameters; its groups are rewritten.
        sparsity, total_steps, gamma_sal, **kwargs: as :class:`srigl.SRigL`.
        compact: must be True (it is the switch ``srigl.SRigL(..., compact=True)`` routes on).
        compact_types: dense module types trained compact. ``nn.Conv2d`` runs as im2col
            (``F.unfold``) + fan-in matmul, whose saved activation is ``kh * kw`` times the input
            for overlapping kernels: for 3x3-conv networks ``(nn.Linear,)`` can be the better
            trade. Convolutions with ``kernel_size == stride`` (patch embeddings) cost nothing extra.
            ``nn.MultiheadAttention`` becomes a :class:`CompactMultiheadAttention`.

    Raises:
        InvalidConfigError: no optimizer, ``compact=False``, or an unknown type in ``compact_types``.
    """

    is_compact = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float | Mapping[str, float] = 0.9,
        total_steps: int | None = None,
        *,
        gamma_sal: float = 0.3,
        compact: bool = True,
        compact_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.MultiheadAttention),
        **kwargs: Any,
    ):
        if not compact:
            raise InvalidConfigError("CompactSRigL trains compact; use srigl.SRigL for masked-dense training")
        if optimizer is None:
            raise InvalidConfigError(
                "compact training rewrites the optimizer's param groups: build the optimizer over "
                "model.parameters() first and pass it"
            )
        unknown = [t.__name__ for t in compact_types if t not in COMPACT_TWINS]
        if unknown:
            raise InvalidConfigError(f"compact_types {unknown} have no compact twin; choose from "
                                     f"{[t.__name__ for t in COMPACT_TWINS]}")
        self.compact_types = tuple(compact_types)
        self.masked_reasons: dict[str, str] = {}  # tensors kept masked-dense -> why
        self._captured: dict[str, list[list[torch.Tensor | None]]] = {}  # name -> [[x, grad_out], ...]
        self._folded: dict[str, torch.Tensor] = {}  # name -> dense gradient formed during backward
        self._averaging: dict[int, tuple[nn.Parameter, Any]] | None = None  # id -> (values, hook), after wrap_ddp
        super().__init__(model, optimizer, sparsity, total_steps, gamma_sal=gamma_sal, **kwargs)
        self._make_compact()

    # ------------------------------------------------------------------ construction
    def _make_compact(self) -> None:
        """Swap every module holding sparse tensors for its compact twin, in the model and the optimizer."""
        # The base class registered one gradient hook per layer, in layer order, then the step hook.
        *grad_handles, step_handle = self._handles
        grad_handle = {layer.name: handle for layer, handle in zip(self.layers, grad_handles)}
        modules = dict(self.model.named_modules())
        units: dict[str, dict[str, SparseTensor]] = {}  # module to swap -> {local tensor name: layer}
        for layer in self.layers:
            unit, local = _unit_of(layer.name, modules)
            units.setdefault(unit, {})[local] = layer
        compact: dict[str, CompactTensor] = {}
        for unit, tensors in units.items():
            module = modules[unit]
            parent = modules[unit.rpartition(".")[0]] if unit else None
            reason = _why_not_compact(module, parent, self.compact_types)
            if reason is None and not set(tensors) <= set(_SPARSE_TENSORS[type(module)]):
                reason = f"{sorted(tensors)} of {type(module).__name__} have no compact twin"
            if reason is not None:
                self.masked_reasons.update({layer.name: reason for layer in tensors.values()})
                continue
            twin = _convert(module, {local: layer.mask for local, layer in tensors.items()}, unit)
            for local, layer in tensors.items():
                holder = twin.get_submodule(_HOLDER[local])  # the CondensedLinear/Conv2d holding its values
                self._condense_state(layer.param, holder)
                grad_handle.pop(layer.name).remove()
                compact[layer.name] = CompactTensor(
                    layer.name, holder, tuple(layer.param.shape), layer.sparsity, layer.budget, layer.ablate
                )
            self.model.set_submodule(unit, twin)
        self.layers = [compact.get(layer.name, layer) for layer in self.layers]
        hooks = [r.module.register_forward_hook(self._capture_hook(r)) for r in compact.values()]
        self._handles = [*grad_handle.values(), *hooks, step_handle]

    def _swap_in_optimizer(
        self, old: nn.Parameter, new: nn.Parameter, move: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Put ``new`` where the optimizer holds ``old``; ``move`` maps each state tensor shaped like
        ``old`` to one shaped like ``new`` (scalars such as Adam's ``step`` are kept)."""
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.optimizer.state.pop(old, None)
        if state:
            self.optimizer.state[new] = {
                key: move(value) if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }

    def _condense_state(self, dense_weight: nn.Parameter, twin: nn.Module) -> None:
        """Hand the optimizer ``twin.values`` for ``dense_weight``, condensing existing state."""
        rows, cols = twin.active_rows[:, None], twin.indices.long()  # (n_active, 1), (n_active, k)
        n_rows = dense_weight.shape[0]

        def condense(value: torch.Tensor) -> torch.Tensor:
            return value.reshape(n_rows, -1)[rows, cols].clone()  # (out, fan_in) -> (n_active, k)

        self._swap_in_optimizer(dense_weight, twin.values, condense)

    # ------------------------------------------------------------------ hooks
    def _capture_hook(self, layer: CompactTensor) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self._collecting or not output.requires_grad:
                return
            if _grad_was_reset(module.values):
                # zero_grad() since the last backward (a gradient probe, say): what earlier
                # backward passes left is no longer in .grad, so it must not score regrowth either.
                # Entries of this forward still wait for their gradient and stay.
                self._captured[layer.name] = [e for e in self._captured.get(layer.name, []) if e[1] is None and e[0] is not None]
                self._folded.pop(layer.name, None)
            # Only on the step of an update: keep the layer input now (autograd saves it for the
            # backward anyway) and its output gradient in backward, for the update to form the
            # dense gradient g^T x one layer at a time.
            entry: list[torch.Tensor | None] = [args[0].detach(), None]
            self._captured.setdefault(layer.name, []).append(entry)

            def keep_grad(grad: torch.Tensor) -> None:
                x, grad = entry[0], grad.detach()
                if x.numel() + grad.numel() <= layer.n_rows * layer.fan_in:
                    entry[1] = grad
                    return
                # Many rows (tokens x batch): x and g outweigh the (out, fan_in) gradient they form,
                # so form it now and let them go.
                with torch.no_grad():
                    part = _dense_grad(module, x, grad)  # (out, fan_in)
                held = self._folded.get(layer.name)
                self._folded[layer.name] = part if held is None else held.add_(part)
                entry[0] = None

            output.register_hook(keep_grad)

        return hook

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._pending_optimizer_steps += 1
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, SparseTensor):  # compact layers hold no inactive weights to zero
                    layer.param.mul_(layer.mask)

    # ------------------------------------------------------------------ stepping
    def step(self) -> dict[str, Any] | None:
        """As :meth:`srigl.Sparsifier.step`; also frees the inputs and gradients kept for the update."""
        stats = super().step()
        self._captured.clear()
        self._folded.clear()
        if self._averaging is not None:
            self._hook_values_for_averaging()  # an update may have swapped in new values Parameters
        return stats

    # ------------------------------------------------------------------ distributed
    def ddp_ignored_names(self) -> list[str]:
        """Names (relative to the model) of the compact tensors that DDP must not manage.

        ``values``, ``indices`` and ``active_rows`` of every compact layer: their shapes change when
        ablation changes a layout (DDP's buckets cannot follow a new Parameter), and gloo cannot
        broadcast int16 indices. :meth:`wrap_ddp` passes them to DDP and averages the values'
        gradients itself.
        """
        names = {id(module): name for name, module in self.model.named_modules()}
        return [
            f"{names[id(layer.module)]}.{tensor}".lstrip(".")
            for layer in self.layers
            if isinstance(layer, CompactTensor)
            for tensor in ("values", "indices", "active_rows")
        ]

    def wrap_ddp(self, **ddp_kwargs: Any) -> nn.Module:
        """The model wrapped in ``DistributedDataParallel`` for compact training on several ranks.

        DDP averages the gradients of every ordinary parameter (dense layers, biases, norms) and
        leaves the compact tensors alone (:meth:`ddp_ignored_names`); the gradient of every compact
        ``values`` Parameter is averaged over the ranks by a hook as soon as backward has
        accumulated it (so GradScaler's inf check sees averaged gradients, as with DDP). After a mask
        update that swaps in new Parameters, :meth:`step` hooks those too, and the DDP wrapper stays
        valid. Every rank must build the same model with the same seed (the masks are then equal, and
        the updates keep them equal: their dense gradients are averaged too). Call it after building
        the sparsifier and use the returned module for forward.

        Args:
            **ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. ``device_ids``).

        Raises:
            InvalidConfigError: no process group is initialized.
        """
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidConfigError("wrap_ddp needs an initialized process group (torch.distributed.init_process_group)")
        # DDP reads this attribute of the module it wraps: parameters and buffers it must skip.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, self.ddp_ignored_names())
        self._averaging = {}
        self._hook_values_for_averaging()
        return DistributedDataParallel(self.model, **ddp_kwargs)

    def _hook_values_for_averaging(self) -> None:
        """Registers the averaging hook on every compact ``values`` Parameter that lacks one."""
        current = {id(layer.module.values): layer.module.values for layer in self.layers if isinstance(layer, CompactTensor)}
        for key, (param, handle) in list(self._averaging.items()):
            if current.get(key) is not param:  # replaced by an update or a load
                handle.remove()
                del self._averaging[key]
        for key, values in current.items():
            if key not in self._averaging and values.requires_grad:
                self._averaging[key] = (values, values.register_post_accumulate_grad_hook(_average_over_ranks))

    def _layer_dense_grad(self, layer: CompactTensor) -> torch.Tensor:
        """Dense ``(out, fan_in)`` gradient of one compact layer, summed over the captured calls
        (gradient accumulation, layers called twice) and averaged over ranks."""
        grad = self._folded.pop(layer.name, None)
        for x, grad_out in self._captured.get(layer.name, []):
            if x is None or grad_out is None:  # folded already, or a forward without backward
                continue
            part = _dense_grad(layer.module, x, grad_out)
            grad = part if grad is None else grad.add_(part)
        if grad is None:  # unused in this step's forward: zero gradient, as the masked engine has
            grad = layer.module.values.new_zeros(layer.n_rows, layer.fan_in)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(grad)  # every rank updates its layers in the same order
            grad.div_(dist.get_world_size())
        return grad

    def _nonfinite(self) -> list[str]:
        """Names of tensors whose dense gradient would be non-finite, checked before any update.

        For a compact layer, ``g^T x`` is non-finite exactly when ``x`` or ``g`` is (a non-finite
        entry spreads over a whole row or column of the product), barring fp32 overflow of finite
        products; the held inputs are checked (and the gradients folded in backward), so no dense
        gradient has to be formed for the check.
        """
        dense = [*self._dense_grads.items(), *self._folded.items()]
        bad = [name for name, grad in dense if not bool(torch.isfinite(grad).all())]
        for name, entries in self._captured.items():
            tensors = [t for entry in entries if entry[0] is not None and entry[1] is not None for t in entry]
            if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
                bad.append(name)
        return bad

    @torch.no_grad()
    def _update(self, drop_fraction: float) -> dict[str, Any]:
        bad = self._nonfinite()
        if bad:
            return self._skip_update(bad)
        layers_stats = {}
        masked = {layer.name for layer in self.layers if isinstance(layer, SparseTensor)}
        masked_grads = self._gather_masked_grads(masked)
        for layer in self.layers:
            if isinstance(layer, CompactTensor):
                old, new = self._update_compact(layer, drop_fraction)
            else:
                old = layer.mask.clone()
                new = self._update_layer(layer, masked_grads.pop(layer.name), drop_fraction)
                self._apply(layer, old, new)
            layers_stats[layer.name] = self._layer_stats(layer, old, new)
        self.last_update = {"step": self._step, "drop_fraction": drop_fraction, "layers": layers_stats}
        return self.last_update

    def _gather_masked_grads(self, names: set[str]) -> dict[str, torch.Tensor]:
        """Dense gradients of the masked-dense tensors (collected by the base class's hooks)."""
        grads = {}
        for layer in self.layers:
            if layer.name in names:
                held = self._dense_grads.get(layer.name)
                # A tensor unused in this step's forward has zero gradient.
                grads[layer.name] = held if held is not None else torch.zeros_like(layer.param)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name in sorted(grads):  # same order on every rank
                dist.all_reduce(grads[name])
                grads[name].div_(dist.get_world_size())
        return grads

    def _update_compact(self, layer: CompactTensor, drop_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop and regrow one compact layer through the shared template; returns (old, new) masks
        as ``(out, fan_in)`` (dense, freed by the caller)."""
        module = layer.module
        old_layout = layer.layout()
        weight = old_layout.to_dense()  # (out, fan_in): this layer only, freed on return
        old = module.dense_mask()  # (out, fan_in)
        dense_grad = self._layer_dense_grad(layer)  # (out, fan_in)
        view = _DenseView(layer.name, weight, old, layer.budget, layer.ablate)
        new = self._update_layer(view, dense_grad, drop_fraction)  # (out, fan_in)
        del dense_grad
        # Kept weights keep their values; dropped ones go; regrown ones (absent from the old layout,
        # so 0 in its dense scatter) start at exactly 0, as in ``Sparsifier._apply``.
        new_layout = condense_tensor(weight.masked_fill_(~new, 0.0), new, name=layer.name)
        rows, cols = new_layout.active_rows[:, None], new_layout.indices.long()  # (n_active', 1), (n_active', k')

        def move(tensor: torch.Tensor) -> torch.Tensor:
            # Entries of kept weights follow them to the new layout; regrown ones read the zeros of
            # the scatter, like the state reset of the masked-dense engine.
            dense = dataclasses.replace(old_layout, values=tensor).to_dense()  # (out, fan_in)
            return dense[rows, cols]  # (n_active', k')

        values = module.values
        if new_layout.values.shape == values.shape:
            values.copy_(new_layout.values)
            values.grad = None  # laid out for the old indices
            state = self.optimizer.state.get(values, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == values.shape:
                    state[key] = move(value)
        else:
            # k' or n_active changed (ablation): a new Parameter. Assigning a differently shaped
            # ``.data`` would leave autograd's cached gradient accumulator (alive while any graph of
            # the previous step is) expecting the old shape.
            replacement = nn.Parameter(new_layout.values.contiguous(), requires_grad=values.requires_grad)
            self._swap_in_optimizer(values, replacement, move)
            module.values = replacement
        module.indices = new_layout.indices
        module.active_rows = new_layout.active_rows
        return old, new

    # ------------------------------------------------------------------ inspection
    def summary(self) -> dict[str, dict[str, Any]]:
        """As :meth:`srigl.Sparsifier.summary`, plus ``storage``: ``"compact"`` with the layout
        ``(n_active, k)``, or ``"masked-dense"`` with the reason."""
        report = super().summary()
        for layer in self.layers:
            if isinstance(layer, CompactTensor):
                report[layer.name].update(
                    storage="compact", module=type(layer.module).__name__, layout=tuple(layer.module.values.shape)
                )
            else:
                report[layer.name].update(storage="masked-dense", storage_reason=self.masked_reasons[layer.name])
        return report

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        return {**super().config(), "compact": True, "compact_types": [t.__name__ for t in self.compact_types]}

    def state_dict(self) -> dict[str, Any]:
        """Step, generator, budgets, compact layouts and masks of the masked-dense tensors only.

        The compact layers' indices live in the model's own ``state_dict``; a dense mask here would
        be larger than the condensed layer itself.
        """
        masked = [layer for layer in self.layers if isinstance(layer, SparseTensor)]
        compact = [layer for layer in self.layers if isinstance(layer, CompactTensor)]
        return {
            "version": STATE_DICT_VERSION,
            "config": self.config(),
            "step": self._step,
            "masks": {layer.name: layer.mask.detach().clone() for layer in masked},
            "layouts": {layer.name: tuple(layer.module.values.shape) for layer in compact},
            "budgets": {layer.name: layer.budget for layer in self.layers},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a state from another model, configuration or engine.

        A compact layer whose current layout differs from the saved one is resized (contents
        undefined until ``model.load_state_dict`` fills them), so the order of loading does not matter.
        """
        if not isinstance(state, Mapping) or "layouts" not in state or "config" not in state:
            raise StateDictMismatchError(
                "not a compact srigl sparsifier state dict (no 'layouts'/'config' entries); a masked-dense "
                "run is continued compact by loading it masked-dense and converting with from_masked_dense"
            )
        mine, theirs = self.config(), state["config"]
        for key in ("algorithm", "sparsity", "distribution", "structure", "compact"):
            if mine[key] != theirs.get(key):
                raise StateDictMismatchError(
                    f"state dict was saved with {key}={theirs.get(key)!r}, this sparsifier has {key}={mine[key]!r}"
                )
        masked = {layer.name: layer for layer in self.layers if isinstance(layer, SparseTensor)}
        compact = {layer.name: layer for layer in self.layers if isinstance(layer, CompactTensor)}
        for kind, live, saved in (("masks", masked, state["masks"]), ("layouts", compact, state["layouts"])):
            if set(live) != set(saved):
                raise StateDictMismatchError(
                    f"state dict {kind} name other tensors: missing {sorted(set(live) - set(saved))[:5]}, "
                    f"unexpected {sorted(set(saved) - set(live))[:5]}"
                )
        for name, layer in masked.items():
            if tuple(state["masks"][name].shape) != tuple(layer.mask.shape):
                raise StateDictMismatchError(
                    f"{name}: saved mask shape {tuple(state['masks'][name].shape)} != parameter shape "
                    f"{tuple(layer.mask.shape)}"
                )
        for name, layer in compact.items():
            n_active, k = state["layouts"][name]
            if not (1 <= n_active <= layer.n_rows and 1 <= k <= layer.fan_in):
                raise StateDictMismatchError(
                    f"{name}: saved layout ({n_active}, {k}) does not fit a {layer.shape} weight"
                )
        with torch.no_grad():
            for name, layer in masked.items():
                layer.mask.copy_(state["masks"][name].to(layer.mask.device, torch.bool))
                layer.param.mul_(layer.mask)
            for name, layer in compact.items():
                module, shape = layer.module, tuple(state["layouts"][name])
                if tuple(module.values.shape) != shape:
                    requires_grad = module.values.requires_grad
                    replacement = nn.Parameter(module.values.new_zeros(shape), requires_grad=requires_grad)
                    self._swap_in_optimizer(module.values, replacement, lambda value: value.new_zeros(shape))
                    module.values = replacement
                    module.indices = module.indices.new_zeros(shape)
                    module.active_rows = module.active_rows.new_zeros(shape[0])
            for layer in self.layers:
                layer.budget = int(state["budgets"][layer.name])
        if self._averaging is not None:
            self._hook_values_for_averaging()  # loading may have swapped in new values Parameters
        self._step = int(state["step"])
        self.generator.set_state(state["generator"])
        self._pending_optimizer_steps = 0
        self._dense_grads.clear()
        self._captured.clear()
        self._folded.clear()
        self._collecting = self.needs_dense_grad and self.schedule.is_update_step(self._step + 1)
