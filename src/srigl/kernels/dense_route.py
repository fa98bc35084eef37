"""The dense route: a condensed layer's active rows densified for one call and run by a dense GEMM
or convolution.

Neuron ablation leaves layers with few active neurons, each reading a large share of the inputs
(at 90 % sparsity a ViT-B/16 MLP keeps ~20 % of its neurons at ~50 % fan-in density). On such
rows a dense GEMM over the active rows (MKL / oneDNN, AMX tiles in bf16) outruns the fan-in
kernels at large batches. Densifying costs one pass over an (active rows, inputs) block: per call,
or once where the caller keeps the block (:class:`srigl.kernels.inference.WindowCache` does for
rows dense enough that the copy stays small). :func:`dense_route_pays`
says where, from the crossovers measured by ``benchmarks/dense_route.py``
(``results/dense_route.md``); :func:`srigl.kernels.inference.condensed_linear_inference` and the
no-autograd paths of :func:`srigl.kernels.fanin_matmul` / :func:`~srigl.kernels.fanin_matmul_rows`
take it there. bf16 convolutions, which have no fan-in kernel, always take it
(:func:`dense_conv2d`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srigl.kernels import cpu

__all__ = ["DENSE_ROUTE", "MAX_BLOCK_BYTES", "dense_conv2d", "dense_route", "dense_route_pays"]


#: dtype -> (batch bound, density bound) pairs: a product of at least ``batch`` rows whose layer
#: holds at least ``density`` of its (active rows x in_features) block takes the *dense route*
#: (:func:`dense_route_pays`). Rows that dense are what ablation leaves behind (few neurons, each
#: holding a large share of the inputs), and there a GEMM over the active rows densified per call
#: beats the fan-in kernels: MKL/oneDNN reach several times the gather and tiled kernels'
#: throughput, far more in bf16, where oneDNN runs AMX tiles and our kernels widen to float. The
#: per-call densify (one pass over an (active rows, in_features) block) is what sets the batch
#: bounds. Crossovers measured in results/dense_route.md.
DENSE_ROUTE = {
    torch.float32: ((128, 0.4),),
    torch.float64: ((128, 0.4),),
    torch.bfloat16: ((32, 0.4), (64, 0.2), (128, 0.1)),
}


def dense_route_pays(batch: int, fan_in: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether a condensed product of ``batch`` rows runs faster as a GEMM over the densified active rows.

    True when some ``(batch bound, density bound)`` pair of :data:`DENSE_ROUTE` for ``dtype`` has
    ``batch >= batch bound`` and ``fan_in / in_features >= density bound``.
    """
    if in_features <= 0:
        return False
    density = fan_in / in_features
    return any(batch >= rows and density >= bound for rows, bound in DENSE_ROUTE.get(dtype, ()))


#: The largest densified block the dense route materialises at once; a wider layer (an
#: extreme-output head, say) is densified and multiplied in chunks of rows that fit, so the route
#: never needs more transient memory than this, whatever the layer's size.
MAX_BLOCK_BYTES = 32 << 20


def dense_route(
    x2d: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    in_features: int,
    out_features: int,
    dense_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y (batch, out_features)``: the product as a GEMM over the densified active rows.

    ``dense_rows`` (``(n_active, in_features)``, from a cache the caller keeps in step with the
    weights: :class:`srigl.kernels.inference.WindowCache`) is used as is; without it the rows are
    densified for this call only, in blocks of at most :data:`MAX_BLOCK_BYTES`. Ablated columns get
    their bias, or 0, as on the other routes. Sums run in the GEMM's order, so results agree with
    the fan-in kernels to rounding, not bitwise.
    """
    active_bias = bias if rows is None or bias is None else bias.index_select(0, rows)  # (n_active,)
    if dense_rows is not None:
        active = _gemm(x2d, dense_rows, active_bias)  # (batch, n_active)
    else:
        active = _active_product(x2d, values, indices, active_bias, in_features)  # (batch, n_active)
    if rows is None:
        return active  # (batch, out)
    return cpu.place_columns_op()(active, rows, bias, out_features)  # (batch, out): one pass, in C++


def _gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ weight.T (+ bias)``: ``(batch, rows)`` from ``weight`` ``(rows, in)``."""
    return torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())


def _active_product(x2d, values, indices, bias, in_features: int) -> torch.Tensor:
    """``x2d @ densify(values, indices).T + bias``, ``(batch, n_active)``, densified block by block."""
    densify = cpu.densify_op()  # range-checks every index
    n_active = values.shape[0]
    block = max(1, MAX_BLOCK_BYTES // max(1, in_features * values.element_size()))  # rows per block
    if n_active <= block:
        return _gemm(x2d, densify(values, indices, in_features), bias)
    out = x2d.new_empty(x2d.shape[0], n_active)  # (batch, n_active)
    for start in range(0, n_active, block):
        stop = min(start + block, n_active)
        weight = densify(values[start:stop], indices[start:stop], in_features)  # (stop - start, in)
        out[:, start:stop] = _gemm(x2d, weight, None if bias is None else bias[start:stop])
    return out


def dense_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``y (N, out_channels, H_out, W_out)``: a condensed convolution as the dense one over its active
    filters densified for this call (oneDNN's convolution, no im2col here).

    The route of bf16 condensed convolutions, which have no fan-in kernel of their own (the general
    route would run the fan-in product over an im2col matrix kh*kw times the input). Holds no memory
    between calls. Ablated channels get their bias, or 0.

    Args:
        x: (N, C, H, W), already padded except for ``padding`` (symmetric: (top/bottom, left/right)).
        values, indices: (n_active, k) over each filter's flattened (C/groups, kh, kw) fan-in.
        rows: (n_active,) int64 output channel of each filter.
    """
    kh, kw = kernel_size
    fan_in = x.shape[1] // groups * kh * kw
    weight = cpu.densify_op()(values, indices, fan_in)  # (n_active, C/g*kh*kw): range-checked there
    n_active = weight.shape[0]
    if groups != 1 and n_active != out_channels:
        # A filter's group follows from its output channel: ablated ones become zero filters.
        full = weight.new_zeros(out_channels, fan_in)
        weight = full.index_copy_(0, rows, weight)  # (out, C/g*kh*kw)
        n_active = out_channels
    weight = weight.view(n_active, x.shape[1] // groups, kh, kw)  # (n_active, C/g, kh, kw)
    if n_active == out_channels:  # rows are 0..out-1: a layer's active_rows ascend strictly (its validate())
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (N, out, H_out, W_out)
    active_bias = None if bias is None else bias.index_select(0, rows)
    active = F.conv2d(x, weight, active_bias, stride, padding, dilation, groups)  # (N, n_active, H_out, W_out)
    shape = (active.shape[0], out_channels, *active.shape[2:])
    base = active.new_zeros(shape) if bias is None else bias.view(1, -1, 1, 1).expand(shape).contiguous()
    return base.index_copy_(1, rows, active)  # (N, out, H_out, W_out)
