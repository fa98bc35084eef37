"""Folding an eval-mode BatchNorm into the sparse layer that feeds it, before condensing.

In eval mode ``BatchNorm(layer(x))`` is a per-channel affine map of the layer's output,
``scale * y + shift`` with ``scale = gamma / sqrt(running_var + eps)`` and
``shift = beta - running_mean * scale``, so it folds into the layer: each output row of the weight
times its ``scale`` (zeros stay zeros: the mask, and so the constant fan-in, is unchanged) and a bias
``scale * bias + shift``. The condensed model then skips one pass over every such activation (in a
condensed ResNet-50 the BatchNorms are a visible share of an inference call, results/real_models.md).
Only eval-mode BatchNorms whose whole input is one sparse layer's output, read by nothing else, are
folded; the model computes the same outputs, up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from srigl.condensed.surgery import _Layer, _trace

# The BatchNorm that may follow each layer type: per-channel over conv planes, per-feature after a Linear.
_FOLDABLE = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


def _why_not(bn: nn.Module, producer: nn.Module) -> str | None:
    """Why ``bn`` cannot fold into ``producer``, or None when it can."""
    if bn.training:
        return "it is in training mode (it normalises with batch statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return "it keeps no running statistics"
    if type(bn) is not _FOLDABLE.get(type(producer)) or bn.num_features != producer.weight.shape[0]:
        return f"it does not normalise the {producer.weight.shape[0]} outputs of a {type(producer).__name__}"
    return None


def fold_batchnorms(model: nn.Module, layers: dict[str, _Layer], report: dict[str, Any]) -> nn.Module:
    """Fold every eval-mode BatchNorm that reads only a to-be-condensed layer's output into that layer.

    The layer's weight rows are scaled in place and it gets (or updates) a bias; the BatchNorm is
    replaced by ``nn.Identity``. Each fold is listed in ``report["folded_batchnorms"]`` as
    ``{"batchnorm": name, "into": layer name}``; a BatchNorm right after a sparse layer that is not
    folded gets a note saying why. Returns ``model`` (the same object).
    """
    report.setdefault("folded_batchnorms", [])
    traced = _trace(model, report, "no BatchNorm folded")
    if traced is None:
        return model
    graph, modules, calls = traced
    for node in graph.nodes:
        layer = layers.get(node.target) if node.op == "call_module" else None
        if layer is None or layer.fan_in is None or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        bn = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or user.args[:1] != (node,) or len(user.args) != 1:
            continue
        why = _why_not(bn, layer.module) or (f"it is called {calls[user.target]} times" if calls[user.target] != 1 else None)
        if why is not None:
            report["notes"].append(f"BatchNorm {user.target} after {node.target} not folded: {why}")
            continue
        _fold(layer.module, bn)
        model.set_submodule(user.target, nn.Identity())
        report["folded_batchnorms"].append({"batchnorm": user.target, "into": node.target})
    return model


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """``layer`` becomes ``bn(layer(x))`` (eval mode): rows scaled, bias set."""
    weight = layer.weight
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    # In float64, then rounded once: the folded layer should differ from the pair by one rounding.
    scale = gamma.double() / (bn.running_var.double() + bn.eps).sqrt()  # (out,)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + beta.double()  # (out,)
    shape = (-1,) + (1,) * (weight.dim() - 1)  # (out, 1, ...): one scale per output row
    weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
