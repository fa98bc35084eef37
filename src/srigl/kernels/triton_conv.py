"""Triton kernels for the condensed conv2d on CUDA tensors, with implicit im2col.

The same operation as the C++ ``conv_forward`` / ``conv_backward`` (see
:func:`srigl.kernels.cpu.conv_forward`): ``x`` is already padded, ``indices[i, j]`` is the
position ``(c, a, b)`` in row ``i``'s ``(C / groups, kh, kw)`` fan-in, ``rows[i]`` its output
channel. Nothing im2col-shaped is ever stored: each program decodes the indices of its tile and
gathers the input pixels directly. Imported lazily (it imports triton at its top), as
:mod:`srigl.kernels.triton_kernels`.

Kernels (accumulating in float32, or float64 for float64 inputs), with P the flattened
(batch, output pixel) axis:

* forward, grid (P blocks, row blocks): a (BLOCK_P, BLOCK_O) tile of y, walking k in chunks of
  BLOCK_K and gathering the (BLOCK_P, BLOCK_O, BLOCK_K) input pixels.
* grad_values, grid (row blocks, k blocks, P splits): the same gather, reduced over P; split
  partial sums are combined with atomic adds.
* grad_x, grid (P blocks, row blocks): the scatter of ``values * grad_y`` into the pixels read,
  with atomic adds (many filters and output pixels read one input pixel), as the linear
  kernels' grad_x. Atomic accumulation makes the backward's rounding order nondeterministic.
"""

from __future__ import annotations

import torch

try:  # triton is optional (CUDA installs only)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["conv_forward", "conv_backward"]


if triton is not None:

    @triton.jit
    def _pixels(offs_p, n_pixels, ho, wo, chw, hp, wp, SH: tl.constexpr, SW: tl.constexpr):
        """For flattened (n, oh, ow) positions: mask, batch index, (oh, ow) and the x offset of the
        window's top-left corner (int64)."""
        mask_p = offs_p < n_pixels
        n = offs_p // (ho * wo)
        rem = offs_p % (ho * wo)
        oh = rem // wo
        ow = rem % wo
        corner = n.to(tl.int64) * chw + (oh * SH).to(tl.int64) * wp + ow * SW  # (BLOCK_P,)
        return mask_p, n, rem, corner

    @triton.jit
    def _taps(idx, channel_base, hp, wp, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
        """x offsets (relative to a window corner) of indices (BLOCK_O, BLOCK_K) decoded as (c, a, b)."""
        c = channel_base[:, None] + idx // (KH * KW)
        tap = idx % (KH * KW)
        return (c * hp + (tap // KW) * DH) * wp + (tap % KW) * DW  # (BLOCK_O, BLOCK_K), int64

    @triton.jit
    def _conv_forward_kernel(
        x_ptr, values_ptr, indices_ptr, rows_ptr, y_ptr,
        n_pixels, ho, wo, chw, hp, wp, out_channels, n_active, k, fan_in, cpg, opg,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        mask_p, n, rem, corner = _pixels(offs_p, n_pixels, ho, wo, chw, hp, wp, SH, SW)
        mask_o = offs_o < n_active
        rows = tl.load(rows_ptr + offs_o, mask=mask_o, other=0)  # (BLOCK_O,) int64
        channel_base = (rows // opg * cpg).to(tl.int64)
        row_starts = offs_o.to(tl.int64)[:, None] * k  # (BLOCK_O, 1)
        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=ACC_DTYPE)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_ok = mask_o[:, None] & (offs_k[None, :] < k)  # (BLOCK_O, BLOCK_K)
            idx = tl.load(indices_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(tl.int64)
            w = tl.load(values_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(ACC_DTYPE)
            in_range = mask_ok & (idx >= 0) & (idx < fan_in)  # never read outside x
            taps = _taps(idx, channel_base, hp, wp, KH, KW, DH, DW)
            mask = mask_p[:, None, None] & in_range[None, :, :]  # (BLOCK_P, BLOCK_O, BLOCK_K)
            pixels = tl.load(x_ptr + corner[:, None, None] + taps[None, :, :], mask=mask, other=0).to(ACC_DTYPE)
            acc += tl.sum(pixels * w[None, :, :], axis=2)  # (BLOCK_P, BLOCK_O)
        y_offs = (n.to(tl.int64)[:, None] * out_channels + rows[None, :]) * (ho * wo) + rem[:, None]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])

    @triton.jit
    def _conv_grad_values_kernel(
        grad_y_ptr, x_ptr, indices_ptr, rows_ptr, grad_values_ptr,
        n_pixels, ho, wo, chw, hp, wp, out_channels, n_active, k, fan_in, cpg, opg,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, ACC_DTYPE: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        split = tl.program_id(2)
        splits = tl.num_programs(2)
        mask_o = offs_o < n_active
        mask_ok = mask_o[:, None] & (offs_k[None, :] < k)  # (BLOCK_O, BLOCK_K)
        entry = offs_o.to(tl.int64)[:, None] * k + offs_k[None, :]  # (BLOCK_O, BLOCK_K)
        idx = tl.load(indices_ptr + entry, mask=mask_ok, other=0).to(tl.int64)
        in_range = mask_ok & (idx >= 0) & (idx < fan_in)
        rows = tl.load(rows_ptr + offs_o, mask=mask_o, other=0)
        taps = _taps(idx, (rows // opg * cpg).to(tl.int64), hp, wp, KH, KW, DH, DW)
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
        for p0 in range(split * BLOCK_P, n_pixels, splits * BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p, n, rem, corner = _pixels(offs_p, n_pixels, ho, wo, chw, hp, wp, SH, SW)
            g_offs = (n.to(tl.int64)[:, None] * out_channels + rows[None, :]) * (ho * wo) + rem[:, None]
            g = tl.load(grad_y_ptr + g_offs, mask=mask_p[:, None] & mask_o[None, :], other=0).to(ACC_DTYPE)
            pixels = tl.load(
                x_ptr + corner[:, None, None] + taps[None, :, :],
                mask=mask_p[:, None, None] & in_range[None, :, :],
                other=0,
            ).to(ACC_DTYPE)  # (BLOCK_P, BLOCK_O, BLOCK_K)
            acc += tl.sum(pixels * g[:, :, None], axis=0)  # (BLOCK_O, BLOCK_K)
        if ATOMIC:
            tl.atomic_add(grad_values_ptr + entry, acc, mask=mask_ok, sem="relaxed")
        else:
            tl.store(grad_values_ptr + entry, acc, mask=mask_ok)

    @triton.jit
    def _conv_grad_x_kernel(
        grad_y_ptr, values_ptr, indices_ptr, rows_ptr, grad_x_ptr,
        n_pixels, ho, wo, chw, hp, wp, out_channels, n_active, k, fan_in, cpg, opg,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_p, n, rem, corner = _pixels(offs_p, n_pixels, ho, wo, chw, hp, wp, SH, SW)
        mask_o = offs_o < n_active
        rows = tl.load(rows_ptr + offs_o, mask=mask_o, other=0)
        channel_base = (rows // opg * cpg).to(tl.int64)
        g_offs = (n.to(tl.int64)[:, None] * out_channels + rows[None, :]) * (ho * wo) + rem[:, None]
        g = tl.load(grad_y_ptr + g_offs, mask=mask_p[:, None] & mask_o[None, :], other=0).to(ACC_DTYPE)  # (P, O)
        row_starts = offs_o.to(tl.int64)[:, None] * k
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_ok = mask_o[:, None] & (offs_k[None, :] < k)
            idx = tl.load(indices_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(tl.int64)
            w = tl.load(values_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(ACC_DTYPE)
            in_range = mask_ok & (idx >= 0) & (idx < fan_in)  # never write outside grad_x
            taps = _taps(idx, channel_base, hp, wp, KH, KW, DH, DW)
            tl.atomic_add(
                grad_x_ptr + corner[:, None, None] + taps[None, :, :],
                g[:, :, None] * w[None, :, :],  # (BLOCK_P, BLOCK_O, BLOCK_K)
                mask=mask_p[:, None, None] & in_range[None, :, :],
                sem="relaxed",
            )


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(n_pixels: int, n_active: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_O, BLOCK_K): powers of two, ~8k gathered elements per program."""
    block_k = min(16, triton.next_power_of_2(max(1, k)))
    block_o = min(32, triton.next_power_of_2(max(1, n_active)))
    block_p = min(64, triton.next_power_of_2(max(1, n_pixels)), max(1, 8192 // (block_o * block_k)))
    return block_p, block_o, block_k


def _geometry(x, values, rows, out_channels, kernel_size, stride, dilation, groups):
    """Scalar arguments shared by the three kernels, and (N, Ho, Wo)."""
    n, c, hp, wp = x.shape
    ho = (hp - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    cpg = c // groups
    scalars = (n * ho * wo, ho, wo, c * hp * wp, hp, wp, out_channels, values.shape[0], values.shape[1],
               cpg * kernel_size[0] * kernel_size[1], cpg, out_channels // groups)
    meta = dict(KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
                ACC_DTYPE=_acc_dtype(x.dtype))
    return scalars, meta, (n, ho, wo)


def conv_forward(x, values, indices, rows, out_channels, kernel_size, stride, dilation, groups):
    """As :func:`srigl.kernels.cpu.conv_forward`, for contiguous CUDA tensors: (N, out, Ho, Wo)."""
    scalars, meta, (n, ho, wo) = _geometry(x, values, rows, out_channels, kernel_size, stride, dilation, groups)
    n_active, k = values.shape
    # Channels no row names stay 0; every active one is written.
    make = torch.empty if n_active == out_channels and k > 0 else torch.zeros
    y = make(n, out_channels, ho, wo, device=x.device, dtype=x.dtype)
    if scalars[0] == 0 or n_active == 0 or k == 0:
        return y
    block_p, block_o, block_k = _blocks(scalars[0], n_active, k)
    grid = (triton.cdiv(scalars[0], block_p), triton.cdiv(n_active, block_o))
    _conv_forward_kernel[grid](x, values, indices, rows, y, *scalars, **meta,
                               BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_K=block_k)
    return y


def conv_backward(grad_y, x, values, indices, rows, out_channels, kernel_size, stride, dilation, groups,
                  need_grad_x, need_grad_values):
    """As :func:`srigl.kernels.cpu.conv_backward`: (grad_x, grad_values), None where not needed."""
    scalars, meta, _ = _geometry(x, values, rows, out_channels, kernel_size, stride, dilation, groups)
    n_pixels = scalars[0]
    n_active, k = values.shape
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_p, block_o, block_k = _blocks(n_pixels, n_active, k)
    work = n_pixels > 0 and n_active > 0 and k > 0
    grad_x = grad_values = None
    if need_grad_x:
        grad_x_acc = torch.zeros(x.shape, device=x.device, dtype=acc_torch)  # atomics need zeros
        if work:
            grid = (triton.cdiv(n_pixels, block_p), triton.cdiv(n_active, block_o))
            _conv_grad_x_kernel[grid](grad_y, values, indices, rows, grad_x_acc, *scalars, **meta,
                                      BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_K=block_k)
        grad_x = grad_x_acc.to(x.dtype)
    if need_grad_values:
        grad_values_acc = torch.zeros(n_active, k, device=x.device, dtype=acc_torch)
        if work:
            tiles = triton.cdiv(n_active, block_o) * triton.cdiv(k, block_k)
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
            # Enough programs to fill the device: split P when n_active * k gives few tiles.
            splits = max(1, min(triton.cdiv(n_pixels, block_p), triton.cdiv(4 * sms, tiles)))
            grid = (triton.cdiv(n_active, block_o), triton.cdiv(k, block_k), splits)
            _conv_grad_values_kernel[grid](grad_y, x, indices, rows, grad_values_acc, *scalars, **meta,
                                           ATOMIC=splits > 1, BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_K=block_k)
        grad_values = grad_values_acc.to(values.dtype)
    return grad_x, grad_values
