"""Parameter and FLOP counting of a (masked) model, per layer and in total.

Counts are for one forward pass of one input (batch 1), in multiply-accumulates (MACs; FLOPs are
twice that). Only the layers that dominate the cost are counted: ``nn.Linear``, ``nn.Conv1d/2d/3d``
and ``nn.MultiheadAttention``; biases, norms, activations and pooling are left out, as in the RigL
and SRigL papers.

A weight ``W`` with mask ``M`` applied at ``P`` output positions (spatial positions of a conv,
tokens of a Linear on ``(B, T, D)``) costs

    dense MACs  = W.numel() * P
    sparse MACs = M.sum()   * P

because each output position multiplies every active weight by one input value exactly once (for a
grouped conv ``W.numel()`` already holds only ``in / groups`` inputs per filter). Masks are read from
the ``<param>_mask`` buffers the sparsifiers leave on the owning module, so counting needs no
sparsifier; condensed layers (``srigl.condensed``, compact training) count their stored ``values``. Attention's two matrix products, ``Q K^T`` and ``softmax(.) V``, have no weights and
count ``2 * T_q * T_k * D`` MACs, dense and sparse alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srigl import masks
from srigl.masks import unwrap

COUNTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one weight tensor (or of attention's weight-free products).

    Attributes:
        name: parameter FQN (``"fc1.weight"``), or ``"<module>.attention"`` for attention's products.
        kind: the owning module's type name.
        shape: the weight's shape (``()`` for attention's products).
        params_dense: ``weight.numel()``.
        params: active weights (mask sum, or numel when the tensor has no mask).
        macs_dense: MACs of one forward at batch 1 without the mask.
        macs: MACs of one forward at batch 1 with the mask.
        neurons: output neurons (rows of the ``(out, fan_in)`` view); 0 for attention's products.
        active_neurons: neurons with at least one active incoming weight.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params_dense: int
    params: int
    macs_dense: int
    macs: int
    neurons: int
    active_neurons: int

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "params_dense": self.params_dense,
            "params": self.params,
            "macs_dense": self.macs_dense,
            "macs": self.macs,
            "neurons": self.neurons,
            "active_neurons": self.active_neurons,
        }


def _mask_of(module: nn.Module, param_name: str) -> torch.Tensor | None:
    return masks.get_mask(module, param_name)


def _is_condensed(module: nn.Module) -> bool:
    # srigl.condensed layers (and the compact training twins) store (n_active, k) ``values`` and
    # report their dense shape and per-neuron fan-in; recognised by that interface so this module
    # imports none of them. Their dense mask is never formed here: at 670k labels it is 0.5 GB.
    return isinstance(getattr(module, "values", None), torch.Tensor) and callable(getattr(module, "fan_in_counts", None))


def _condensed_cost(name: str, module: nn.Module, positions: int) -> LayerCost:
    n_out, fan_in_flat = module.dense_shape
    return LayerCost(
        name=name,
        kind=type(module).__name__,
        shape=(n_out, fan_in_flat),
        params_dense=n_out * fan_in_flat,
        params=module.values.numel(),
        macs_dense=n_out * fan_in_flat * positions,
        macs=module.values.numel() * positions,
        neurons=n_out,
        active_neurons=int((module.fan_in_counts() > 0).sum()),
    )


def _weight_cost(name: str, module: nn.Module, param_name: str, weight: torch.Tensor, positions: int,
                 rows: slice | None = None) -> LayerCost:
    """Cost of ``weight`` (optionally only ``rows`` of it) applied at ``positions`` output positions."""
    mask = _mask_of(module, param_name)
    if rows is not None:
        weight = weight[rows]
        mask = None if mask is None else mask[rows]
    n_rows = weight.shape[0]
    if mask is None:
        # A dense tensor: a neuron is active when any of its weights is non-zero.
        active_rows = int((weight.detach().reshape(n_rows, -1) != 0).any(dim=1).sum())  # (out, fan_in) -> (out,)
        nnz = weight.numel()
    else:
        active_rows = int(mask.reshape(n_rows, -1).any(dim=1).sum())  # (out, fan_in) -> (out,)
        nnz = int(mask.sum())
    return LayerCost(
        name=name,
        kind=type(module).__name__,
        shape=tuple(weight.shape),
        params_dense=weight.numel(),
        params=nnz,
        macs_dense=weight.numel() * positions,
        macs=nnz * positions,
        neurons=n_rows,
        active_neurons=active_rows,
    )


def _attention_costs(prefix: str, mha: nn.MultiheadAttention, t_q: int, t_k: int) -> list[LayerCost]:
    costs = []
    d = mha.embed_dim
    if mha.in_proj_weight is not None:
        # Packed (3D, D) weight: rows [0, D) project queries (T_q positions), [D, 3D) keys and values
        # (T_k positions each).
        weight = mha.in_proj_weight
        q = _weight_cost(prefix + "in_proj_weight", mha, "in_proj_weight", weight, t_q, slice(0, d))
        kv = _weight_cost(prefix + "in_proj_weight", mha, "in_proj_weight", weight, t_k, slice(d, 3 * d))
        costs.append(
            LayerCost(prefix + "in_proj_weight", type(mha).__name__, tuple(weight.shape),
                      q.params_dense + kv.params_dense, q.params + kv.params, q.macs_dense + kv.macs_dense,
                      q.macs + kv.macs, q.neurons + kv.neurons, q.active_neurons + kv.active_neurons)
        )
    else:
        for param_name, positions in (("q_proj_weight", t_q), ("k_proj_weight", t_k), ("v_proj_weight", t_k)):
            costs.append(_weight_cost(prefix + param_name, mha, param_name, getattr(mha, param_name), positions))
    costs.append(_attention_core_cost(prefix, mha, t_q, t_k))
    # out_proj's forward is never called by MultiheadAttention (its weight is used directly), so
    # it is counted here, never by the Linear hook.
    costs.append(_weight_cost(prefix + "out_proj.weight", mha.out_proj, "weight", mha.out_proj.weight, t_q))
    return costs


def _attention_core_cost(prefix: str, mha: nn.Module, t_q: int, t_k: int) -> LayerCost:
    products = 2 * t_q * t_k * mha.embed_dim  # Q K^T and softmax(.) V, no weights
    return LayerCost(prefix + "attention", type(mha).__name__, (), 0, 0, products, products, 0, 0)


def _token_counts(args: tuple, kwargs: dict, batch_first: bool) -> tuple[int, int]:
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    # (B, T, D) when batch_first, (T, B, D) otherwise, (T, D) unbatched.
    token_dim = 1 if batch_first and query.dim() == 3 else 0
    return query.shape[token_dim], key.shape[token_dim]


@torch.no_grad()
def count_costs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """Per-tensor parameter and MAC counts of ``model`` for one input of ``input_shape``.

    Runs one forward pass of a zero input ``(1, *input_shape)`` in eval mode (restoring the
    training flags after) to learn each layer's output size.

    Args:
        model: the model (a DDP wrapper is unwrapped); masks are read from ``<param>_mask`` buffers.
        input_shape: one input without the batch dimension, e.g. ``(1, 28, 28)``.

    Returns:
        One :class:`LayerCost` per counted weight, in call order of the forward pass.
    """
    from srigl.condensed import CondensedMultiheadAttention  # lazy: condensed imports the kernels

    model = unwrap(model)
    names = {module: name for name, module in model.named_modules()}
    costs: list[LayerCost] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        prefix = names[module] + "." if names[module] else ""
        if isinstance(module, nn.MultiheadAttention):
            t_q, t_k = _token_counts(args, kwargs, module.batch_first)
            new = _attention_costs(prefix, module, t_q, t_k)
        elif isinstance(module, CondensedMultiheadAttention):
            # Its in/out projections are compact children counted by their own hooks; only the
            # weight-free attention core is counted here.
            t_q, t_k = _token_counts(args, kwargs, module.batch_first)
            new = [_attention_core_cost(prefix, module, t_q, t_k)]
        else:
            out = output[0] if isinstance(output, tuple) else output
            # Linear on (B, ..., out): one position per leading index beyond the batch; conv on
            # (B, C, *spatial): one per spatial position. Batch is 1, so numel / out channels.
            linear = isinstance(module, nn.Linear) or hasattr(module, "out_features")
            channels = out.shape[-1] if linear else out.shape[1]
            positions = out.numel() // channels
            if _is_condensed(module):
                new = [_condensed_cost(prefix + "weight", module, positions)]
            else:
                new = [_weight_cost(prefix + "weight", module, "weight", module.weight, positions)]
        costs.extend(new)

    counted = [
        m for m in model.modules()
        if isinstance(m, (*COUNTED_TYPES, CondensedMultiheadAttention)) or _is_condensed(m)
    ]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in counted]
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        model.eval()
        model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return _merge_repeats(costs)


def _merge_repeats(costs: list[LayerCost]) -> list[LayerCost]:
    """Sum the MACs of a tensor used by several forward calls (weight sharing); parameters count once."""
    merged: dict[str, LayerCost] = {}
    for cost in costs:
        held = merged.get(cost.name)
        if held is None:
            merged[cost.name] = cost
        else:
            merged[cost.name] = LayerCost(
                held.name, held.kind, held.shape, held.params_dense, held.params,
                held.macs_dense + cost.macs_dense, held.macs + cost.macs, held.neurons, held.active_neurons,
            )
    return list(merged.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(dense, active)`` parameter counts over every parameter (biases and norms included).

    A parameter with a ``<param>_mask`` buffer counts its mask's ``True`` entries as active; every
    other parameter counts in full.
    """
    if hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    dense = active = 0
    for module in model.modules():
        if _is_condensed(module):
            # Stored weights are the active ones; the dense layer would hold the whole mask's size.
            dense += math.prod(module.dense_shape) - module.values.numel()
        for param_name, param in module.named_parameters(recurse=False):
            mask = _mask_of(module, param_name)
            dense += param.numel()
            active += param.numel() if mask is None else int(mask.sum())
    return dense, active


def total(costs: list[LayerCost]) -> dict[str, int]:
    """Totals over ``costs``: weights and MACs, dense and with masks."""
    return {
        "params_dense": sum(c.params_dense for c in costs),
        "params": sum(c.params for c in costs),
        "macs_dense": sum(c.macs_dense for c in costs),
        "macs": sum(c.macs for c in costs),
    }


def fan_in_counts(module: nn.Module, param_name: str) -> list[int]:
    """Active incoming weights of every output neuron of ``module.<param_name>`` (its mask's row sums).

    Without a mask, the non-zero count per row of the weight.
    """
    if _is_condensed(module):
        return module.fan_in_counts().tolist()
    mask = _mask_of(module, param_name)
    active = mask if mask is not None else getattr(module, param_name).detach() != 0
    return active.reshape(active.shape[0], -1).sum(dim=1).tolist()  # (out, fan_in) -> (out,)


def human(n: float) -> str:
    """``1234567`` -> ``"1.23M"``; small numbers unchanged."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.3g}"


__all__ = ["COUNTED_TYPES", "LayerCost", "count_costs", "count_parameters", "fan_in_counts", "human", "total"]

