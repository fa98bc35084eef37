"""What a condensed layer computes while ``torch.export`` traces it (the ONNX export).

torch.export cannot trace :mod:`srigl.kernels` (an autograd Function around a JIT-built operator,
data-dependent index checks, batch-size-dependent routes), so while
``torch.compiler.is_exporting()`` is True a condensed layer computes its product in plain aten ops,
in one of two layouts (:data:`EXPORT_LAYOUTS`; :func:`srigl.export_onnx` picks one per export):

``"matmul"`` (the default)
    The file stores the condensed weights (values + indices, nothing larger), and one
    ``ScatterElements`` expands them into a dense weight when the model is loaded: a subgraph of
    constants, which onnxruntime folds into an ordinary initializer at session creation. The product
    is then an ordinary ``MatMul`` (over the layer's *active* neurons only, for a Linear) or
    ``Conv`` (over all its output channels), run by the runtime's dense kernels. So the runtime is as
    fast as the dense model, faster by the neurons ablation removed from Linear layers, and holds
    the expanded weights in memory.
``"gather"``
    ``Gather`` -> ``Mul`` -> ``ReduceSum`` on the condensed weights (Convs through an unfold). Never
    expanded, exact in any runtime, but it materialises one ``(tokens, out, fan_in)`` tensor of
    gathered inputs per layer, which makes it far slower than the dense model in onnxruntime
    (``results/real_models.md``). For runtimes that must not hold dense weights.

ONNX has no operator for the fused gather-multiply-add that srigl's kernels run, which is why
neither layout keeps the condensed speed; a custom runtime operator would be needed for that.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from srigl.kernels.dispatch import place_active_rows

__all__ = ["EXPORT_LAYOUTS", "export_layout", "gather_matmul", "scatter_conv2d", "scatter_matmul", "using_export_layout"]

EXPORT_LAYOUTS = ("matmul", "gather")

# Read by the condensed layers while torch.export traces them; set only around one export (a plain
# module global rather than a ContextVar: tracing runs in the caller's thread, and dynamo treats a
# global read as a constant).
_layout = EXPORT_LAYOUTS[0]


def export_layout() -> str:
    """The layout condensed layers trace into right now (see the module docstring)."""
    return _layout


@contextmanager
def using_export_layout(layout: str) -> Iterator[None]:
    """Trace condensed layers in ``layout`` inside the block.

    Raises:
        ValueError: ``layout`` is not one of :data:`EXPORT_LAYOUTS`.
    """
    global _layout
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, EXPORT_LAYOUTS))}, got {layout!r}")
    previous, _layout = _layout, layout
    try:
        yield
    finally:
        _layout = previous


def gather_matmul(x, values, indices, bias):
    """The fan-in matmul as one gather -> multiply -> sum in plain aten ops, for any batch shape.

    What a condensed layer exports to in the ``"gather"`` layout; a reference for benchmarks.
    """
    # ONNX Gather takes int32/int64 indices only.
    indices = indices.long()
    gathered = x.index_select(-1, indices.reshape(-1)).unflatten(-1, indices.shape)  # (..., out, k)
    y = (gathered * values).sum(-1)  # (..., out)
    return y if bias is None else y + bias


def _dense_rows(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(rows, in_features)``: each row of ``values`` placed at its ``indices``, zeros elsewhere.

    Duplicate indices within a row add up, as in :func:`srigl.kernels.fanin_to_dense` (ONNX
    ``ScatterElements`` with ``reduction="add"``).
    """
    dense = values.new_zeros(values.shape[0], in_features)  # (rows, in)
    return dense.scatter_add(1, indices.long(), values)


def scatter_matmul(x, values, indices, rows, out_features, bias):
    """``y (..., out_features)`` of a condensed Linear in the ``"matmul"`` layout.

    A dense ``(n_active, in)`` weight scattered from the condensed one, an ordinary ``linear``, and
    the active columns placed among the ablated ones (which output their bias, or 0).
    """
    in_features = x.shape[-1]

    def product(x, values, indices, bias):
        return F.linear(x, _dense_rows(values, indices, in_features), bias)  # (..., n_active)

    if values.shape[0] == out_features:
        return product(x, values, indices, bias)
    return place_active_rows(product, x, values, indices, rows, out_features, bias)


def scatter_conv2d(x, values, indices, rows, out_channels, kernel_size, stride, dilation, groups, bias):
    """A condensed Conv2d in the ``"matmul"`` layout, on an input already padded.

    The dense ``(out, in / groups, kh, kw)`` weight (ablated channels all zero) scattered from the
    condensed one, then an ordinary ``conv2d``. Every output channel is computed, ablated ones
    included: dropping them would break the channel-to-group assignment of a grouped convolution.
    """
    fan_in = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
    # Each active row's entries at row * fan_in + index of the flattened (out, fan_in) weight.
    flat = (rows.unsqueeze(1) * fan_in + indices.long()).reshape(1, -1)  # (1, n_active * k)
    weight = values.new_zeros(1, out_channels * fan_in).scatter_add(1, flat, values.reshape(1, -1))
    weight = weight.view(out_channels, x.shape[1] // groups, *kernel_size)  # (out, in / groups, kh, kw)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)
