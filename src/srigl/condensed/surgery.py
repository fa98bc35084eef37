"""Removal of ablated neurons across layers, by ``torch.fx`` graph surgery.

An ablated neuron (no active weight) still emits a constant, ``act(bias)``. Where its output only
reaches the next layer through channel-wise steps (activations, dropout, BatchNorm, max/adaptive
pooling, flatten), :func:`_remove_ablated` drops the neuron (:func:`_keep_rows`) and the next layer's
matching inputs (:func:`_drop_inputs`), folding that constant (:func:`_constants`) into the next
layer's bias, so the model computes the same outputs with narrower layers. :func:`_find_chain` says
where this is possible and, where it is not, why. Each layer's decisions are kept in its
:class:`_Layer` record, which :func:`srigl.condensed.condense` reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from srigl.masks import get_mask, set_mask
from srigl.condensed.layers import _pad_amounts


@dataclasses.dataclass
class _Layer:
    """A module of a registered type, its mask (None: not sparse) and what condense decides for it."""

    name: str
    module: nn.Module
    mask: torch.Tensor | None
    fan_in: int | None = None  # constant fan-in when it will be condensed
    reason: str | None = None  # why it stays dense
    removed: int = 0  # ablated neurons removed together with the next layer's inputs
    padded: int = 0  # zero weights added to keep its fan-in constant after inputs were removed
    kept_ablated_reason: str | None = None


# Channel-wise modules through which a channel that is the same constant for every sample (and
# pixel) stays a constant, in eval mode. Elementwise ones map the constant; the others pass it on.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
)
_ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.hardswish)
_ELEMENTWISE_METHODS = ("relu", "sigmoid", "tanh")
_IDENTITY_ON_CONSTANTS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
# Max pooling pads with -inf and adaptive pooling has no padding, so a constant plane stays constant.
_SPATIAL_POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclasses.dataclass
class _Chain:
    """``producer -> transparent steps -> consumer`` where only the consumer reads the producer."""

    producer: str
    consumer: str
    steps: list  # fx nodes between them, in order
    flattened: bool  # a flatten(1) turns conv channels into Linear inputs


def _flatten_start(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """``start_dim`` when ``node`` flattens dims ``start_dim..-1``, else None."""
    if node.op == "call_module" and type(modules[node.target]) is nn.Flatten:
        flatten = modules[node.target]
        return flatten.start_dim if flatten.end_dim == -1 else None
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        positional = node.args[1:]  # torch.flatten(input, start_dim=0, end_dim=-1)
        start = node.kwargs.get("start_dim", positional[0] if positional else 0)
        end = node.kwargs.get("end_dim", positional[1] if len(positional) > 1 else -1)
        return start if end == -1 else None
    return None


def _find_chain(node: torch.fx.Node, modules, calls: dict[str, int], layers: dict[str, _Layer]) -> _Chain | str:
    """The chain from producer ``node`` to the layer reading it, or a reason why there is none."""
    producer = modules[node.target]
    is_conv = type(producer) is nn.Conv2d
    steps: list[torch.fx.Node] = []
    flattened = False
    current = node
    while True:
        if len(current.users) != 1:
            return f"{current.name} feeds {len(current.users)} operations"
        (user,) = current.users
        if user.op == "output":
            return "it is a model output"
        other_args = [*user.args[1:], *user.kwargs.values()]
        if not user.args or user.args[0] is not current or any(isinstance(a, torch.fx.Node) for a in other_args):
            return f"its output reaches {user.name}, which is not a channel-wise step"
        module = modules.get(user.target) if user.op == "call_module" else None
        # Layers and BatchNorms get sliced, so they must serve this chain alone; a stateless
        # step (a shared MaxPool, say) may be called anywhere else too.
        sliced = user.target in layers or type(module) in (nn.BatchNorm1d, nn.BatchNorm2d)
        if module is not None and sliced and calls[user.target] != 1:
            return f"{user.target} is called {calls[user.target]} times"
        if user.op == "call_module" and user.target in layers:
            expected = (nn.Linear,) if (flattened or not is_conv) else (nn.Conv2d,)
            if type(module) not in expected or getattr(module, "groups", 1) != 1:
                return f"{user.target} ({type(module).__name__}) cannot drop the matching inputs"
            return _Chain(node.target, user.target, steps, flattened)
        start = _flatten_start(user, modules)
        if start is not None:
            if not is_conv or flattened or start != 1:
                return f"{user.name} is a flatten that does not map channels to features"
            flattened = True
        elif module is not None and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            wanted = nn.BatchNorm2d if is_conv else nn.BatchNorm1d
            if type(module) is not wanted or flattened or module.running_mean is None:
                return f"{user.target} is not a per-channel affine map of this output in eval mode"
        elif module is not None and type(module) in _SPATIAL_POOLS:
            if not is_conv or flattened:
                return f"{user.target} pools something other than conv channels"
        elif not (
            (module is not None and type(module) in _ELEMENTWISE_MODULES + _IDENTITY_ON_CONSTANTS)
            or (user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS)
            or (user.op == "call_method" and user.target in _ELEMENTWISE_METHODS)
        ):
            return f"its output reaches {user.name}, which is not a channel-wise step"
        steps.append(user)
        current = user


def _constants(chain: _Chain, removed: torch.Tensor, modules) -> torch.Tensor:
    """What each removed (ablated) neuron feeds the consumer: its bias through the chain, ``(n_removed,)``."""
    producer = modules[chain.producer]
    weight = producer.weight
    bias = producer.bias[removed] if producer.bias is not None else weight.new_zeros(removed.numel())
    value = bias.detach().unsqueeze(0)  # (1, n_removed): one sample, one channel per removed neuron
    for node in chain.steps:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            stats = [t[removed] if t is not None else None for t in (module.running_mean, module.running_var, module.weight, module.bias)]
            value = F.batch_norm(value, *stats, training=False, eps=module.eps)
        elif module is not None and type(module) in _ELEMENTWISE_MODULES:
            value = module(value)
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            value = node.target(value, *node.args[1:], **node.kwargs)
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            value = getattr(value, node.target)()
        # Identity, dropout (eval), max/adaptive pooling and flatten keep a constant channel as is.
    return value.squeeze(0)


def _keep_rows(module: nn.Module, layer: _Layer | None, keep: torch.Tensor) -> None:
    """Drop the output neurons (Linear/Conv2d) or channels (BatchNorm) where ``keep`` is False."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(tensor[keep].clone(), requires_grad=tensor.requires_grad))
            elif isinstance(tensor, torch.Tensor):
                setattr(module, name, tensor[keep].clone())
    n_kept = int(keep.sum())
    for size in ("out_features", "out_channels", "num_features"):
        if hasattr(module, size):
            setattr(module, size, n_kept)
    if layer is not None and layer.mask is not None:
        layer.mask = layer.mask[keep]
        _refresh_mask_buffer(module, layer.mask)


def _refresh_mask_buffer(module: nn.Module, mask: torch.Tensor) -> None:
    # A layer left dense keeps its (non-persistent) mask buffer, which must match the sliced weight.
    if isinstance(get_mask(module, "weight"), torch.Tensor):
        set_mask(module, "weight", mask)


def _drop_inputs(consumer: nn.Module, layer: _Layer, keep_cols: torch.Tensor, fold: torch.Tensor) -> None:
    """Drop the consumer's inputs where ``keep_cols`` is False after adding ``fold`` to its bias."""
    with torch.no_grad():
        if bool(fold.any()):
            if consumer.bias is None:
                consumer.bias = nn.Parameter(fold.clone())
            else:
                consumer.bias.add_(fold)
        consumer.weight = nn.Parameter(consumer.weight[:, keep_cols].clone(), requires_grad=consumer.weight.requires_grad)
    n_kept = int(keep_cols.sum())
    if type(consumer) is nn.Linear:
        consumer.in_features = n_kept
    else:
        consumer.in_channels = n_kept
    if layer.mask is None:
        return
    mask = layer.mask
    was_active = mask.reshape(mask.shape[0], -1).any(dim=1)  # (out,)
    mask = mask[:, keep_cols]
    if layer.fan_in is not None:
        # Rows that lost active inputs get zero weights at their first inactive positions, so the
        # layer keeps one fan-in (and stays condensable). The weights there are exactly zero.
        mask_2d = mask.reshape(mask.shape[0], -1).clone()  # (out, in_flat)
        target = min(layer.fan_in, mask_2d.shape[1])
        layer.fan_in = target
        missing = (target - mask_2d.sum(dim=1)).clamp(min=0) * was_active  # (out,)
        inactive_rank = (~mask_2d).cumsum(dim=1)  # (out, in_flat): 1, 2, ... over inactive positions
        padding = ~mask_2d & (inactive_rank <= missing.unsqueeze(1))
        layer.padded += int(padding.sum())
        mask = (mask_2d | padding).view_as(mask)
    layer.mask = mask
    _refresh_mask_buffer(consumer, mask)


def _trace(model: nn.Module, report: dict[str, Any], consequence: str):
    """``(graph, modules by name, calls per module name)`` of ``model`` traced by ``torch.fx``, or None
    (noted in ``report`` with ``consequence``) where it cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # any tracing failure just means: no graph surgery
        report["notes"].append(f"torch.fx could not trace the model ({type(error).__name__}: {error}); {consequence}")
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return graph, dict(model.named_modules()), calls


def _remove_ablated(model: nn.Module, layers: dict[str, _Layer], report: dict[str, Any]) -> None:
    """Remove ablated neurons of every producer whose output only reaches the next layer."""
    traced = _trace(model, report, "no neuron removed")
    if traced is None:
        return
    graph, modules, calls = traced
    for node in graph.nodes:
        layer = layers.get(node.target) if node.op == "call_module" else None
        if layer is None or layer.mask is None:
            continue
        ablated = ~layer.mask.reshape(layer.mask.shape[0], -1).any(dim=1)  # (out,)
        if not bool(ablated.any()):
            continue
        producer = layer.module
        if calls[node.target] != 1 or getattr(producer, "groups", 1) != 1:
            layer.kept_ablated_reason = "the layer is called more than once or is a grouped convolution"
            continue
        chain = _find_chain(node, modules, calls, layers)
        if isinstance(chain, str):
            layer.kept_ablated_reason = chain
            continue
        consumer = layers[chain.consumer]
        removed = ablated.nonzero().squeeze(1)  # (n_ablated,)
        constants = _constants(chain, removed, modules)  # (n_ablated,)
        removable = torch.isfinite(constants)
        zero_padded = type(consumer.module) is nn.Conv2d and consumer.module.padding_mode == "zeros" and any(
            _pad_amounts(consumer.module.padding, consumer.module.kernel_size, consumer.module.dilation)
        )
        if zero_padded:
            # Zero padding reads 0 where the constant channel would read its constant, so only
            # channels whose constant is exactly 0 can go without changing border outputs.
            removable &= constants == 0
        removed, constants = removed[removable], constants[removable]
        if removed.numel() < int(ablated.sum()):
            layer.kept_ablated_reason = (
                f"{int(ablated.sum()) - removed.numel()} ablated neurons output a nonzero constant into "
                f"zero-padded {chain.consumer}, whose borders would change"
            )
        if removed.numel() == 0:
            continue
        weight = consumer.module.weight.detach()
        if consumer.mask is not None:
            weight = weight * consumer.mask
        n_producer = producer.weight.shape[0]
        if chain.flattened:
            # flatten(1) lays channel c out as inputs c*H*W ... (c+1)*H*W - 1.
            weight = weight.reshape(weight.shape[0], n_producer, -1)  # (out, C, H*W)
        per_neuron = weight[:, removed].reshape(weight.shape[0], removed.numel(), -1).sum(-1)  # (out, n_removed)
        fold = per_neuron @ constants.to(per_neuron.dtype)  # (out,)
        keep = torch.ones(n_producer, dtype=torch.bool, device=removed.device)
        keep[removed] = False
        keep_cols = keep.repeat_interleave(weight.shape[2]) if chain.flattened else keep
        _drop_inputs(consumer.module, consumer, keep_cols, fold)
        _keep_rows(producer, layer, keep)
        for step in chain.steps:
            if step.op == "call_module" and type(modules[step.target]) in (nn.BatchNorm1d, nn.BatchNorm2d):
                _keep_rows(modules[step.target], None, keep)
        layer.removed = removed.numel()
        report["removals"].append(
            {
                "producer": chain.producer,
                "consumer": chain.consumer,
                "through": [step.target if step.op == "call_module" else step.name for step in chain.steps],
                "neurons": removed.numel(),
                "folded_into_bias": bool(fold.any()),
            }
        )
