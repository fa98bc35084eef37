"""``condense(model)``: a trained constant fan-in model turned into condensed layers (and a report on request).

The steps: find each tensor's mask (:func:`_collect_masks`), decide per layer whether it is
condensed (:func:`_plan`), turn every condensable layer whose weight is stored transposed (Hugging
Face's ``Conv1D``, ``(in, out)``; see :mod:`srigl.orientation`) into the ``nn.Linear`` it equals
(:func:`_as_linear`), remove ablated neurons across layers where the graph allows
(:mod:`srigl.condensed.surgery`), swap every constant fan-in layer of a registered type
(:data:`~srigl.condensed.layers.CONDENSERS`) and every condensable ``nn.MultiheadAttention`` for its
condensed twin, and say in a plain-dict report what happened to each layer and why.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from srigl.masks import get_mask, set_mask
from srigl.orientation import stores_transposed
from srigl.condensed.attention import CondensedMultiheadAttention, why_attention_not_condensable
from srigl.condensed.layers import CONDENSERS
from srigl.condensed.folding import fold_batchnorms
from srigl.condensed.surgery import _Layer, _remove_ablated
from srigl.condensed.tensor import check_mask, constant_fan_in
from srigl.errors import MaskError, NotConstantFanInError

__all__ = ["condense"]


def _fqn(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _collect_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """``{param FQN: mask}`` from ``masks``, else the ``<param>_mask`` buffers, else ``weight != 0``."""
    params = dict(model.named_parameters())
    found: dict[str, torch.Tensor] = {}
    if masks is not None:
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise MaskError(f"masks name {len(unknown)} tensors the model does not have: {unknown[:5]}")
        found.update(masks)
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            fqn = _fqn(module_name, param_name)
            buffered = get_mask(module, param_name)
            if fqn not in found and buffered is not None:
                found[fqn] = buffered
    notes = []
    if masks is not None:
        source = "masks"
    elif found:
        source = "buffers"
    else:
        source = "weight != 0"
        notes.append(
            "no masks given and no <param>_mask buffers found: each condensable layer's mask is taken as "
            "weight != 0 (an active weight that is exactly 0 counts as pruned)"
        )
        for module_name, module in model.named_modules():
            if type(module) in CONDENSERS or stores_transposed(module):
                found[_fqn(module_name, "weight")] = module.weight.detach() != 0
    for fqn, mask in found.items():
        check_mask(params[fqn], mask, fqn)
    return found, source, notes


def _plan(name: str, module: nn.Module, mask: torch.Tensor | None) -> _Layer:
    layer = _Layer(name, module, mask)
    if mask is None:
        layer.reason = "no mask: the layer is not sparse"
        return layer
    try:
        fan_in = constant_fan_in(mask, _fqn(name, "weight"))
    except NotConstantFanInError as error:
        layer.reason = f"not constant fan-in ({error})"
        return layer
    if fan_in == mask[0].numel():
        layer.reason = "every active neuron keeps its whole fan-in: a dense layer is faster"
        return layer
    layer.fan_in = fan_in
    return layer


def _as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a layer with a ``(in, out)`` weight computes (``x @ W + b``):
    its weight is ``W.t()``; the bias Parameter is shared; a ``weight_mask`` buffer is transposed too."""
    in_features, out_features = module.weight.shape
    weight = module.weight.detach()
    linear = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())  # (in, out) -> (out, in)
    linear.weight.requires_grad_(module.weight.requires_grad)
    linear.bias = getattr(module, "bias", None)
    mask = get_mask(module, "weight")
    if isinstance(mask, torch.Tensor):
        set_mask(linear, "weight", mask.t().contiguous())  # (in, out) -> (out, in)
    return linear


def _linearize_transposed(
    model: nn.Module, masks_by_param: dict[str, torch.Tensor]
) -> tuple[nn.Module, dict[str, str], dict[str, tuple[str, list[int]]]]:
    """Swap every masked layer stored ``(in, out)`` that will be condensed for its ``nn.Linear``
    (:func:`_as_linear`), with its mask transposed in ``masks_by_param``; from here on it is condensed
    (and its ablated neurons removed) as any Linear. Returns the model (the root may be swapped) and
    ``{module name: why it stays as it is}`` for the others, and ``{module name: (type name, stored
    shape)}`` for those swapped."""
    kept: dict[str, str] = {}
    swapped: dict[str, tuple[str, list[int]]] = {}
    for name, module in list(model.named_modules()):
        fqn = _fqn(name, "weight")
        if fqn not in masks_by_param or not stores_transposed(module):
            continue
        mask = masks_by_param[fqn].t()  # (in, out) -> (out, in)
        plan = _plan(name, module, mask)
        if plan.fan_in is None:
            kept[name] = plan.reason
            continue
        masks_by_param[fqn] = mask.contiguous()
        swapped[name] = (type(module).__name__, list(module.weight.shape))
        linear = _as_linear(module)
        if name:
            model.set_submodule(name, linear)
        else:
            model = linear
    return model, kept, swapped


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def condense(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    *,
    remove_ablated: bool = True,
    fold_batchnorm: bool = True,
    inplace: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """Turn a trained constant fan-in model into condensed layers that compute the same outputs.

    Steps: find each layer's mask; a layer whose weight is stored ``(in, out)`` (Hugging Face's
    ``Conv1D``, ``x @ W + b``) becomes the ``nn.Linear`` over ``W.t()`` it equals, so that its
    neurons are the weight's columns; where an ablated neuron's output only reaches the next layer
    (through channel-wise steps: activations, dropout, BatchNorm, max/adaptive pooling, flatten),
    remove it and the next layer's matching inputs, folding the constant it still emitted
    (``act(bias)``) into the next layer's bias; then swap every constant fan-in layer of a
    registered type (:data:`CONDENSERS`) for its condensed twin, and every ``nn.MultiheadAttention``
    with a constant fan-in projection for a :class:`CondensedMultiheadAttention` (its ablated q/k/v
    and output rows are kept: they fix the head layout and feed the residual stream). Layers that
    are not sparse, not constant fan-in, or of other types stay dense, as do attentions with
    kdim/vdim, bias_k or inside ``nn.Transformer*Layer`` (whose fast path reads raw tensors); the
    report says why. Outputs equal the masked dense model's in eval mode, up to float rounding.

    Args:
        model: the trained model; its parameters are exactly zero outside their masks.
        masks: ``{param FQN: bool mask}`` (e.g. ``"features.0.weight"``). If None, the
            ``<param>_mask`` buffers the sparsifier registers are used; a model with neither is
            read as ``mask = weight != 0`` (noted in the report).
        remove_ablated: remove ablated neurons across layers where the graph (``torch.fx``) allows.
        fold_batchnorm: fold each eval-mode BatchNorm that reads only a condensed layer's output into
            that layer (rows scaled, bias set; the BatchNorm becomes ``nn.Identity``), so inference
            skips its pass over the activations (:mod:`srigl.condensed.folding`). A BatchNorm in
            training mode is never folded.
        inplace: modify ``model`` itself instead of a deep copy.
        return_report: also return the report of what happened to each layer.

    Returns:
        The condensed model, so ``condense(model)(x)`` works; with ``return_report=True``,
        ``(condensed_model, report)``. ``report["layers"]`` maps each module name to ``kind``,
        ``reason`` (dense layers), ``shape_before``/``shape_after``, ``fan_in``, ``active_neurons``,
        ``ablated_neurons`` (still present), ``removed_neurons``, ``padded_weights``,
        ``params_before``/``params_after``, and ``converted_from`` for a ``Conv1D`` condensed as a
        Linear (its ``shape_before`` as stored, ``(in, out)``); ``report["removals"]`` lists each
        cross-layer removal; ``report["folded_batchnorms"]`` each BatchNorm folded (``batchnorm``,
        ``into``).

    Raises:
        MaskError: a mask names an unknown tensor, has the wrong shape or dtype, or the weight is
            nonzero outside it.
    """
    condensed_model = model if inplace else copy.deepcopy(model)
    masks_by_param, source, notes = _collect_masks(condensed_model, masks)
    condensed_model, transposed_kept, transposed = _linearize_transposed(condensed_model, masks_by_param)
    report: dict[str, Any] = {
        "mask_source": source,
        "notes": notes,
        "params_before": _n_params(condensed_model),
        "layers": {},
        "removals": [],
    }
    layers: dict[str, _Layer] = {}
    before: dict[str, tuple[list[int], int]] = {}
    attentions: dict[str, tuple[nn.MultiheadAttention, dict[str, _Layer]]] = {}
    parents = {name: module for name, module in condensed_model.named_modules()}
    for name, module in condensed_model.named_modules():
        owned = [p for p, _ in module.named_parameters(recurse=False) if _fqn(name, p) in masks_by_param]
        if name.rpartition(".")[0] in attentions:
            continue  # an out_proj: planned, converted and reported with its attention
        if isinstance(module, nn.MultiheadAttention) and (owned or _fqn(name, "out_proj.weight") in masks_by_param):
            parent = parents.get(name.rpartition(".")[0]) if name else None
            why = why_attention_not_condensable(module, parent)
            plans = {} if why else _plan_attention(name, module, masks_by_param)
            if plans and any(plan.fan_in is not None for plan in plans.values()):
                attentions[name] = (module, plans)
                continue
            if not why:
                why = "; ".join(f"{local}: {plan.reason}" for local, plan in plans.items())
            report["layers"][name] = {
                "kind": "dense",
                "reason": why,
                "params_before": _n_params(module),
                "params_after": _n_params(module),
            }
            continue
        if type(module) in CONDENSERS:
            layers[name] = _plan(name, module, masks_by_param.get(_fqn(name, "weight")))
            before[name] = (list(module.weight.shape), _n_params(module))
        elif owned:
            kind = "nn.MultiheadAttention" if isinstance(module, nn.MultiheadAttention) else type(module).__name__
            report["layers"][name] = {
                "kind": "dense",
                "reason": transposed_kept.get(name)
                or f"no condenser for {kind} (masked tensors {owned} stay dense and zero outside their masks)",
                "params_before": _n_params(module),
                "params_after": _n_params(module),
            }
    if remove_ablated:
        _remove_ablated(condensed_model, layers, report)
    report["folded_batchnorms"] = []
    if fold_batchnorm:
        fold_batchnorms(condensed_model, layers, report)
    folded = {entry["into"]: entry["batchnorm"] for entry in report["folded_batchnorms"]}
    for name, layer in layers.items():
        module = layer.module
        if layer.fan_in is not None:
            module = CONDENSERS[type(module)].from_dense(module, layer.mask, name=_fqn(name, "weight"))
            if name:
                condensed_model.set_submodule(name, module)
            else:
                condensed_model = module
        n_ablated = int((~layer.mask.reshape(layer.mask.shape[0], -1).any(dim=1)).sum()) if layer.mask is not None else 0
        shape_before, params_before = before[name]
        entry = {
            "kind": type(module).__name__ if layer.fan_in is not None else "dense",
            "shape_before": shape_before,
            "shape_after": list(layer.module.weight.shape),
            "fan_in": layer.fan_in,
            "active_neurons": layer.module.weight.shape[0] - n_ablated,
            "ablated_neurons": n_ablated,
            "removed_neurons": layer.removed,
            "padded_weights": layer.padded,
            "params_before": params_before,
            "params_after": _n_params(module),
        }
        if layer.reason is not None:
            entry["reason"] = layer.reason
        if name in folded:
            entry["folded_batchnorm"] = folded[name]
        if name in transposed:
            # A Conv1D: shape_before as stored, (in, out); shape_after is of the Linear it became, (out, in).
            entry["converted_from"], entry["shape_before"] = transposed[name]
        if n_ablated and layer.kept_ablated_reason is not None:
            entry["ablated_kept_because"] = layer.kept_ablated_reason
        report["layers"][name] = entry
    for name, (mha, plans) in attentions.items():
        params_before = _n_params(mha)
        masks = {local: plan.mask for local, plan in plans.items() if plan.fan_in is not None}
        attention = CondensedMultiheadAttention.from_masked(mha, masks, name)
        condensed_model.set_submodule(name, attention)
        report["layers"][name] = {
            "kind": "CondensedMultiheadAttention",
            "params_before": params_before,
            "params_after": _n_params(attention),
        }
        for local, plan in plans.items():
            child = "in_proj" if local == "in_proj_weight" else "out_proj"
            projection = attention.get_submodule(child)
            if plan.fan_in is None:
                report["layers"][f"{name}.{child}"] = {"kind": "dense", "reason": plan.reason}
                continue
            n_ablated = int((~plan.mask.any(dim=1)).sum())
            report["layers"][f"{name}.{child}"] = {
                "kind": "CondensedLinear",
                "shape_before": list(plan.mask.shape),
                "shape_after": list(plan.mask.shape),
                "fan_in": plan.fan_in,
                "active_neurons": plan.mask.shape[0] - n_ablated,
                "ablated_neurons": n_ablated,
                "removed_neurons": 0,
                "padded_weights": 0,
                "params_after": _n_params(projection),
                # q/k/v rows set the head layout and out_proj rows feed the residual stream.
                **({"ablated_kept_because": "attention projections keep their width"} if n_ablated else {}),
            }
    report["params_after"] = _n_params(condensed_model)
    return (condensed_model, report) if return_report else condensed_model


def _plan_attention(name: str, mha: nn.MultiheadAttention, masks_by_param: dict[str, torch.Tensor]) -> dict[str, _Layer]:
    """The plan of each masked projection (``"in_proj_weight"``, ``"out_proj.weight"``) of ``mha``."""
    plans = {}
    for local, weight in (("in_proj_weight", mha.in_proj_weight), ("out_proj.weight", mha.out_proj.weight)):
        mask = masks_by_param.get(_fqn(name, local))
        if mask is None:
            continue
        # _plan reads the weight's name and mask only; the module is the attention itself.
        plan = _plan(_fqn(name, local).removesuffix(".weight"), mha, mask)
        if plan.fan_in is not None:
            check_mask(weight, mask, _fqn(name, local))
        plans[local] = plan
    return plans
