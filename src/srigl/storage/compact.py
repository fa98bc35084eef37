"""Compact storage: a constant fan-in layer trained as ``(n_active, k)`` values + indices.

Masked-dense storage keeps every sparse weight dense, with a dense mask, gradient and optimizer
state, so a 90 %-sparse model trains as slowly and as large as a dense one. Constant fan-in allows
better: every active output neuron has exactly ``k`` incoming weights, so a layer *is* a
``(n_active, k)`` block of values plus the same-shaped block of fan-in positions.

* :func:`make_compact` swaps every sparse ``nn.Linear`` / ``nn.Conv2d`` for its condensed twin
  (:class:`srigl.condensed.CondensedLinear` / ``CondensedConv2d``) and every ``nn.MultiheadAttention``
  with sparse projections for a :class:`srigl.condensed.CondensedMultiheadAttention`, and rewrites the
  optimizer's param groups in place so each holds the twin's ``values`` where it held the dense
  weight (existing state condensed with it).
* The dense gradient that scores regrowth is never formed during ordinary steps: on the step before
  an update a forward hook keeps each layer's input ``x`` and a tensor hook its output gradient
  ``g``, and :meth:`CompactParam.dense_grad` forms ``g^T x`` (what autograd computes for a dense
  weight) one layer at a time. Where ``x`` and ``g`` together outweigh the ``(out, fan_in)``
  gradient (tokens x batch rows in a transformer), the hook forms it in backward and lets them go.
* :meth:`CompactParam.install` rebuilds the layout: kept weights keep their values and optimizer
  state, regrown ones start at 0 with zero state. While ``(n_active, k)`` stays the same,
  ``values`` stays the same Parameter; when ablation changes it, a new Parameter is swapped into
  the module and the optimizer with its state.

Tensors without a compact twin (Conv1d/Conv3d, Hugging Face's ``Conv1D`` whose weight is stored
``(in, out)``, Conv2d with string padding or non-zero padding modes, attentions with
``kdim``/``vdim``, ``bias_k`` or inside ``nn.TransformerEncoderLayer``) stay masked-dense;
:func:`make_compact` returns why (naming ``Conv1D`` in ``compact_types`` is refused).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from srigl import blockwise, distributed
from srigl.condensed import CondensedConv2d, CondensedLinear, CondensedTensor, condense_tensor
from srigl.condensed.twins import (
    _HOLDER,
    _SPARSE_TENSORS,
    COMPACT_TWINS,
    _convert,
    _resize_to_incoming,
    _unit_of,
    _why_not_compact,
)
from srigl.errors import InvalidConfigError, LayerTooLargeError
from srigl.orientation import TRANSPOSED_WEIGHT_TYPES, qualnames
from srigl.storage import grad_was_reset
from srigl.storage.masked import MaskedParam

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def check_types(types: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    """``types`` as a tuple, refusing any without a compact twin."""
    types = tuple(types)
    transposed = [t for t in types if isinstance(t, type) and qualnames(t) & TRANSPOSED_WEIGHT_TYPES]
    if transposed:
        raise InvalidConfigError(
            f"compact_types {[t.__name__ for t in transposed]}: a weight stored (in, out) (Hugging Face Conv1D) has "
            "no compact twin; leave it out of compact_types: in a compact run it trains masked-dense (storage "
            "\"masked\" supports it fully), and srigl.condense turns it into a CondensedLinear afterwards"
        )
    unknown = [t.__name__ if isinstance(t, type) else repr(t) for t in types if t not in COMPACT_TWINS]
    if unknown:
        raise InvalidConfigError(
            f"compact_types {unknown} have no compact twin; choose from {[t.__name__ for t in COMPACT_TWINS]}"
        )
    return types


def dense_weight_grad(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Gradient of the loss w.r.t. the dense weight of a compact ``module`` as ``(out, fan_in)``: what
    autograd computes for a dense layer, from the layer's input and output gradient. Under autocast
    the two may differ in dtype (an fp32 input, a bf16 gradient): the product is formed in at least
    fp32, so regrowth scores do not tie where bf16 would round them together."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, grad_out.dtype), torch.float32)
    x, grad_out = x.to(dtype), grad_out.to(dtype)
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


def swap_in_optimizer(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, move: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Put ``new`` where ``optimizer`` holds ``old``; ``move`` maps each state tensor shaped like
    ``old`` to one shaped like ``new`` (scalars such as Adam's ``step`` are kept)."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: move(value) if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()
        }


class CompactParam:
    """One sparse tensor trained compact (see :class:`srigl.storage.SparseParam`).

    Args:
        name: FQN of the original dense weight, e.g. ``"blocks.0.mlp.0.weight"``.
        module: the condensed layer (``CondensedLinear`` / ``CondensedConv2d``) holding its values.
        shape: the dense weight's shape.
        sparsity, budget, ablate: see :class:`srigl.storage.SparseParam`.
        optimizer: the optimizer stepping ``module.values``.
    """

    state_key = "layouts"

    def __init__(self, name: str, module: nn.Module, shape: tuple[int, ...], sparsity: float, budget: int,
                 ablate: bool, optimizer: torch.optim.Optimizer):
        self.name, self.module, self.shape = name, module, tuple(shape)
        self.sparsity, self.budget, self.ablate = sparsity, budget, ablate
        self.optimizer = optimizer
        self.collecting = False
        self._captured: list[list[torch.Tensor | None]] = []  # [[x, grad_out], ...] of this step
        self._folded: torch.Tensor | None = None  # dense gradient formed during backward
        self._averaging: tuple[nn.Parameter, Any] | None = None  # (values, hook) once averaging
        self._averages = False
        self._handle = module.register_forward_hook(self._capture)

    @property
    def stepped(self) -> nn.Parameter:
        return self.module.values  # read afresh: an ablating update swaps in a new Parameter

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    def layout(self) -> CondensedTensor:
        """The current ``(active_rows, indices, values)`` of the layer (values detached)."""
        m = self.module
        return CondensedTensor(active_rows=m.active_rows, indices=m.indices, values=m.values.detach(),
                               fan_in=m.fan_in, out_features=self.n_rows, in_features_flat=self.fan_in)

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        # This layer only, built now and freed after its update.
        return self.layout().to_dense(), self.module.dense_mask()  # (out, fan_in) each

    @property
    def block_rows(self) -> int:
        """Output rows per block of an update (:mod:`srigl.blockwise`): a Linear's gradient rows are
        formed a block at a time; a Conv2d's (small, and grouped ones do not split by rows) at once."""
        if isinstance(self.module, CondensedLinear):
            return blockwise.rows_per_block(self.fan_in)
        return self.n_rows

    def weight_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The dense ``(r1 - r0, fan_in)`` weight of output rows ``[r0, r1)``."""
        m = self.module
        a0, a1 = blockwise.entries(m.active_rows, r0, r1)
        rows = m.values.new_zeros(a1 - a0, self.fan_in).scatter_(1, m.indices[a0:a1].long(), m.values.detach()[a0:a1])
        return m.values.new_zeros(r1 - r0, self.fan_in).index_copy_(0, m.active_rows[a0:a1] - r0, rows)

    def grad_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of :meth:`dense_grad`, ``(r1 - r0, fan_in)``, formed for those rows only
        (and leaving what they are formed from in place for the next block)."""
        grad = None if self._folded is None else self._folded[r0:r1].clone()
        for x, grad_out in self._pairs():
            dtype = torch.promote_types(torch.promote_types(x.dtype, grad_out.dtype), torch.float32)
            if isinstance(self.module, CondensedLinear):
                x_2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
                g_2d = grad_out.reshape(-1, grad_out.shape[-1])[:, r0:r1].to(dtype)  # (N, r1 - r0)
                part = g_2d.t().mm(x_2d)  # (r1 - r0, in)
            else:
                part = dense_weight_grad(self.module, x, grad_out)[r0:r1]  # (out, fan_in) -> its rows
            grad = part if grad is None else grad.add_(part)
        if grad is None:  # unused in this step's forward: zero gradient
            grad = self.module.values.new_zeros(r1 - r0, self.fan_in)
        return grad  # (r1 - r0, fan_in)

    def fan_in_counts(self) -> torch.Tensor:
        counts = torch.zeros(self.n_rows, dtype=torch.long, device=self.module.indices.device)
        counts[self.module.active_rows.long()] = self.module.values.shape[1]
        return counts  # (out,)

    def mask(self) -> torch.Tensor:
        return self.module.dense_mask().view(self.shape)

    # ------------------------------------------------------------------ gradients
    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.collecting or not output.requires_grad:
            return
        if grad_was_reset(module.values):
            # zero_grad() since the last backward (a gradient probe, say): what earlier backward
            # passes left is no longer in .grad, so it must not score regrowth either. Entries of
            # this step's forwards still waiting for their gradient stay.
            self._captured = [e for e in self._captured if e[1] is None and e[0] is not None]
            self._folded = None
        # Keep the layer input now (autograd saves it for the backward anyway) and its output
        # gradient in backward.
        entry: list[torch.Tensor | None] = [args[0].detach(), None]
        self._captured.append(entry)

        def keep_grad(grad: torch.Tensor) -> None:
            x, grad = entry[0], grad.detach()
            if x.numel() + grad.numel() <= self.n_rows * self.fan_in:
                entry[1] = grad
                return
            # Many rows (tokens x batch): x and g outweigh the (out, fan_in) gradient they form.
            with torch.no_grad():
                part = dense_weight_grad(module, x, grad)  # (out, fan_in)
            self._folded = part if self._folded is None else self._folded.add_(part)
            entry[0] = None

        output.register_hook(keep_grad)

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Entries folded already, or from a forward without backward, hold a None.
        return [(x, g) for x, g in self._captured if x is not None and g is not None]

    def dense_grad(self) -> torch.Tensor:
        """Summed over the captured calls (gradient accumulation, layers called twice)."""
        grad, self._folded = self._folded, None
        for x, grad_out in self._pairs():
            part = dense_weight_grad(self.module, x, grad_out)
            grad = part if grad is None else grad.add_(part)
        self._captured = []
        if grad is None:  # unused in this step's forward: zero gradient
            grad = self.module.values.new_zeros(self.n_rows, self.fan_in)
        return grad  # (out, fan_in)

    def grads_finite(self) -> bool:
        # g^T x is non-finite exactly when x or g is (a non-finite entry spreads over a row or
        # column of the product), barring fp32 overflow of finite products: no need to form it.
        tensors = [t for pair in self._pairs() for t in pair] + ([] if self._folded is None else [self._folded])
        return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def clear(self) -> None:
        self._captured, self._folded = [], None

    def held(self) -> Iterable[torch.Tensor]:
        entries = [t for entry in self._captured for t in entry if t is not None]
        return entries + ([] if self._folded is None else [self._folded])

    # ------------------------------------------------------------------ installing masks
    def install(self, weight: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        module, old_layout = self.module, self.layout()
        # Kept weights keep their values; dropped ones go; regrown ones (absent from the old layout,
        # so 0 in its dense scatter) start at exactly 0.
        new_layout = condense_tensor(weight.masked_fill_(~new, 0.0), new, name=self.name)
        rows, cols = new_layout.active_rows[:, None], new_layout.indices.long()  # (n_active', 1), (n_active', k')

        def move(tensor: torch.Tensor) -> torch.Tensor:
            # State entries of kept weights follow them; regrown ones read the scatter's zeros.
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
            swap_in_optimizer(self.optimizer, values, replacement, move)
            module.values = replacement
            self._rehook()
        module.indices = new_layout.indices
        module.active_rows = new_layout.active_rows

    def install_layout(self, active_rows: torch.Tensor, indices: torch.Tensor, source: torch.Tensor) -> None:
        """Make ``(active_rows, indices)`` the layout (what :func:`srigl.blockwise.update` returns):
        entry ``(i, j)`` keeps the old value and optimizer state at flat position ``source[i, j]``,
        or starts at exactly 0 with zero state where ``source`` is -1 (regrown)."""
        module = self.module
        kept = source >= 0  # (n_active', k')
        at = source.clamp(min=0)

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(-1)[at].masked_fill_(~kept, 0)  # (n_active', k')

        values = module.values
        new_values = move(values.detach())
        if new_values.shape == values.shape:
            values.copy_(new_values)
            values.grad = None  # laid out for the old indices
            state = self.optimizer.state.get(values, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == values.shape:
                    state[key] = move(value)
        else:
            # k' or n_active changed (ablation): a new Parameter (see install).
            replacement = nn.Parameter(new_values.contiguous(), requires_grad=values.requires_grad)
            swap_in_optimizer(self.optimizer, values, replacement, move)
            module.values = replacement
            self._rehook()
        module.indices = indices.to(module.indices.dtype)
        module.active_rows = active_rows

    def after_optimizer_step(self) -> None:
        pass  # no inactive weight is stored

    # ------------------------------------------------------------------ state
    def saved(self) -> tuple[int, int]:
        return tuple(self.module.values.shape)

    def problem_with(self, entry: Any) -> str | None:
        try:
            n_active, k = (int(v) for v in entry)
        except (TypeError, ValueError):
            return f"saved layout {entry!r} is not (n_active, k)"
        if not (1 <= n_active <= self.n_rows and 1 <= k <= self.fan_in):
            return f"saved layout ({n_active}, {k}) does not fit a {self.shape} weight"
        return None

    def entry_problem(self, entry: Any, structure: Any, budget: int) -> str | None:
        """Why a saved ``(n_active, k)`` layout breaks ``structure`` with ``budget``, or None."""
        n_active, k = (int(v) for v in entry)
        return structure.counts_problem(torch.full((n_active,), k), budget, self.fan_in)

    def load(self, entry: tuple[int, int]) -> None:
        """Resize to the saved layout (contents undefined until ``model.load_state_dict`` fills
        them), so model, optimizer and sparsifier load in any order."""
        module, shape = self.module, tuple(int(v) for v in entry)
        if tuple(module.values.shape) != shape:
            replacement = nn.Parameter(module.values.new_zeros(shape), requires_grad=module.values.requires_grad)
            swap_in_optimizer(self.optimizer, module.values, replacement, lambda value: value.new_zeros(shape))
            module.values = replacement
            module.indices = module.indices.new_zeros(shape)
            module.active_rows = module.active_rows.new_zeros(shape[0])
            self._rehook()
        self.clear()

    # ------------------------------------------------------------------ the rest of the contract
    def describe(self) -> dict[str, Any]:
        return {"storage": "compact", "module": type(self.module).__name__, "layout": tuple(self.module.values.shape)}

    def ddp_ignored_names(self, module_names: dict[int, str]) -> list[str]:
        # values, indices and active_rows: their shapes change when ablation changes a layout (DDP's
        # buckets cannot follow a new Parameter), and gloo cannot broadcast int16 indices.
        prefix = module_names[id(self.module)]
        return [f"{prefix}.{tensor}".lstrip(".") for tensor in ("values", "indices", "active_rows")]

    def average_over_ranks(self) -> None:
        """Average ``values.grad`` over the ranks as soon as backward has accumulated it (so
        GradScaler's inf check sees averaged gradients, as with DDP); follows swapped Parameters."""
        self._averages = True
        self._rehook()

    def _rehook(self) -> None:
        if not self._averages:
            return
        values = self.module.values
        if self._averaging is not None:
            if self._averaging[0] is values:
                return
            self._averaging[1].remove()
        self._averaging = None
        if values.requires_grad:
            self._averaging = (values, values.register_post_accumulate_grad_hook(_average_grad))

    def remove_hooks(self) -> None:
        self._handle.remove()
        if self._averaging is not None:
            self._averaging[1].remove()
            self._averaging = None
        self._averages = False

    def __repr__(self) -> str:
        return f"CompactParam({self.name!r}, shape={self.shape}, layout={tuple(self.module.values.shape)})"


def _average_grad(param: nn.Parameter) -> None:
    # With gradient accumulation this runs after every backward; averaging the running sum each time
    # still gives the mean of the sums (the part averaged before is already equal on every rank).
    distributed.mean_(param.grad)


def make_compact(
    model: nn.Module, params: list[MaskedParam], types: tuple[type[nn.Module], ...]
) -> tuple[list[MaskedParam | CompactParam], dict[str, str]]:
    """Swap every module holding masked tensors for its compact twin, in ``model`` and the optimizer.

    Returns:
        The tensors in the same order, compact where converted, and ``{FQN: why}`` for those that
        stay masked-dense.
    """
    modules = dict(model.named_modules())
    units: dict[str, dict[str, MaskedParam]] = {}  # module to swap -> {local tensor name: tensor}
    for p in params:
        if isinstance(p, CompactParam):  # started compact (from the meta device)
            continue
        unit, local = _unit_of(p.name, modules)
        units.setdefault(unit, {})[local] = p
    reasons: dict[str, str] = {}
    compact: dict[str, CompactParam] = {}
    for unit, tensors in units.items():
        module = modules[unit]
        parent = modules[unit.rpartition(".")[0]] if unit else None
        reason = _why_not_compact(module, parent, types)
        if reason is None and not set(tensors) <= set(_SPARSE_TENSORS[type(module)]):
            reason = f"{sorted(tensors)} of {type(module).__name__} have no compact twin"
        if reason is not None:
            reasons.update({p.name: reason for p in tensors.values()})
            continue
        twin = _convert(module, {local: p.live_mask for local, p in tensors.items()}, unit)
        for local, p in tensors.items():
            holder = twin.get_submodule(_HOLDER[local])  # the CondensedLinear/Conv2d holding its values
            rows, cols = holder.active_rows[:, None], holder.indices.long()  # (n_active, 1), (n_active, k)

            def condense(value: torch.Tensor, n_rows: int = p.n_rows) -> torch.Tensor:
                return value.reshape(n_rows, -1)[rows, cols].clone()  # (out, fan_in) -> (n_active, k)

            swap_in_optimizer(p.optimizer, p.param, holder.values, condense)
            p.remove_hooks()
            compact[p.name] = CompactParam(p.name, holder, p.shape, p.sparsity, p.budget, p.ablate, p.optimizer)
        model.set_submodule(unit, twin)
    return [compact.get(p.name, p) for p in params], reasons


def materialise_on(model: nn.Module) -> torch.device:
    """Where meta-device layers are created: beside the model's other parameters (else the CPU)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def check_meta(name: str, shape: tuple[int, ...], module: nn.Module, parent: nn.Module | None, fan_in: int,
               storage: str, mask_init: str, types: tuple[type[nn.Module], ...], device: torch.device) -> None:
    """Refuse a tensor on the ``meta`` device that cannot start compact at ``fan_in``, with the reason
    (before its first layout is drawn): it has no values, so only compact storage from a random
    layout can start it, and it must fit the memory of ``device``, where it will live."""
    shape = tuple(shape)
    if storage != "compact" or mask_init not in ("auto", "random"):
        raise InvalidConfigError(
            f"{name} {shape} lives on the meta device (no values): it can only start compact from a random "
            f"layout (compact=True, mask_init='random' or 'auto'); got storage={storage!r}, mask_init={mask_init!r}"
        )
    reason = _why_not_compact(module, parent, types)
    if reason is None and type(module) not in (nn.Linear, nn.Conv2d):
        reason = f"{type(module).__name__} cannot be drawn from the meta device (only nn.Linear and nn.Conv2d can)"
    if reason is not None:
        raise InvalidConfigError(
            f"{name} lives on the meta device and cannot start compact ({reason}): materialise it first "
            "(module.to_empty(device='cpu'); module.reset_parameters())"
        )
    from srigl.kernels.checks import index_dtype_for

    _check_fits(name, shape, fan_in, module.weight.dtype, index_dtype_for(math.prod(shape[1:])), device)


def from_meta(
    model: nn.Module, unit: str, layout: torch.Tensor, *, name: str, sparsity: float, budget: int, ablate: bool,
    optimizer: torch.optim.Optimizer, sparse_init: bool,
) -> CompactParam:
    """Create the compact twin of a ``meta``-device ``nn.Linear`` / ``nn.Conv2d`` directly: only its
    ``(out, k)`` values and indices (and a dense bias) are ever allocated, on :func:`materialise_on`.

    The values are drawn as the layer's own ``reset_parameters`` would draw its weights (Kaiming
    uniform, bound ``1 / sqrt(fan_in)``, from torch's global generator) and, with ``sparse_init``,
    rescaled to the sparse fan-in (bound ``1 / sqrt(k)``) as :func:`srigl.initial.rescale_to_sparse_fan_in`
    does for a dense layer; the bias as ``reset_parameters`` draws it. The optimizer is given the
    new Parameters where it held the meta ones.

    Args:
        model: the model holding the layer at ``unit``.
        layout: ``(out, k)`` ascending fan-in positions of every neuron
            (:func:`srigl.initial.random_layout`).
    """
    module = model.get_submodule(unit)
    device = materialise_on(model)
    n_rows, k = layout.shape
    fan_in = math.prod(module.weight.shape[1:])
    twin_type = CondensedConv2d if isinstance(module, nn.Conv2d) else CondensedLinear
    twin = twin_type.empty_like(module, k, n_rows, index_dtype=layout.dtype, device=device)
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d: kaiming_uniform_(a=sqrt(5)) gives 1 / sqrt(fan_in)
    value_bound = bound * math.sqrt(fan_in / k) if sparse_init else bound  # = 1 / sqrt(k) when rescaled
    with torch.no_grad():
        twin.indices.copy_(layout)
        twin.values.uniform_(-value_bound, value_bound)
        if twin.bias is not None:
            twin.bias.uniform_(-bound, bound)
            twin.bias.requires_grad_(module.bias.requires_grad)
    twin.values.requires_grad_(module.weight.requires_grad)
    twin.register_load_state_dict_pre_hook(_resize_to_incoming)
    # A meta Parameter cannot have been stepped: whatever state it has holds no values.
    swap_in_optimizer(optimizer, module.weight, twin.values, lambda _: torch.zeros_like(twin.values))
    if module.bias is not None:
        swap_in_optimizer(optimizer, module.bias, twin.bias, lambda _: torch.zeros_like(twin.bias))
    model.set_submodule(unit, twin)
    return CompactParam(name, twin, tuple(module.weight.shape), sparsity, budget, ablate, optimizer)


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's count; CPU: ``MemAvailable`` of
    ``/proc/meminfo``), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


def _check_fits(name: str, shape: tuple[int, ...], k: int, dtype: torch.dtype, index_dtype: torch.dtype,
                device: torch.device) -> None:
    """Refuse, before allocating, a compact layer whose values, indices and values' gradient (what
    one training step cannot do without) exceed what ``device`` has free."""
    n_rows = shape[0]
    value_bytes = n_rows * k * dtype.itemsize
    need = 2 * value_bytes + n_rows * k * index_dtype.itemsize
    free = available_bytes(device)
    if free is not None and need > free:
        gb = 1e9
        raise LayerTooLargeError(
            f"{name} {shape} at fan-in {k} needs {need / gb:.2f} GB on {device} for its values, indices and "
            f"gradient ({n_rows} x {k} entries; Adam adds {2 * value_bytes / gb:.2f} GB of state) but only "
            f"{free / gb:.2f} GB are free: lower the fan-in (raise the sparsity) or use a device with more memory"
        )
