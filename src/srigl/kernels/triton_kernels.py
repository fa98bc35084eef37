"""Triton kernels for the constant fan-in product on CUDA tensors.

This module imports triton at its top, so nothing in srigl imports *it* until a CUDA tensor
reaches :func:`srigl.kernels.fanin_matmul` (or ``backend_name("cuda")`` is asked). Without
triton the module still imports; :func:`available` is then False.

Kernels (all accumulate in float32, or float64 for float64 inputs):

* forward, grid (batch blocks, output blocks): each program owns a (BLOCK_B, BLOCK_O) tile of y
  and walks k in chunks of BLOCK_K, loading a (BLOCK_O, BLOCK_K) tile of indices and values
  (contiguous along k) and gathering the matching (BLOCK_B, BLOCK_O, BLOCK_K) entries of x.
  The x rows of a batch block are re-read by every output block, so they mostly hit L2.
* grad_values, grid (output blocks, k blocks, batch splits): the same gather, reduced over
  the batch instead of k; with several batch splits the partial sums are combined with
  atomic adds into a zeroed accumulator (more programs for small out * k).
* grad_x, grid (batch blocks, output blocks): the scatter
  ``grad_x[b, indices[o, j]] += values[o, j] * grad_y[b, o]`` with atomic adds, since many
  output rows share an input feature (and duplicates within a row are allowed). A
  transposed (CSC) index structure would avoid the atomics at the cost of building it per
  mask update; atomics keep this backend stateless.

Atomic accumulation makes the backward's float rounding order nondeterministic run to run.
"""

from __future__ import annotations

import functools

import torch

try:  # triton is optional (CUDA installs only); see available()
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["available", "forward", "backward"]


@functools.cache
def available() -> bool:
    """True when triton imports and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _forward_kernel(
        x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,
        batch, out_features, k, in_features,
        stride_x, stride_y,
        HAS_BIAS: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        mask_b = offs_b < batch
        mask_o = offs_o < out_features
        # int64 offsets: batch * in_features can exceed 2**31 elements.
        x_rows = x_ptr + offs_b.to(tl.int64)[:, None, None] * stride_x  # (BLOCK_B, 1, 1)
        row_starts = offs_o.to(tl.int64)[:, None] * k  # (BLOCK_O, 1)
        acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=ACC_DTYPE)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_ok = mask_o[:, None] & (offs_k[None, :] < k)  # (BLOCK_O, BLOCK_K)
            idx = tl.load(indices_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(tl.int64)
            w = tl.load(values_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(ACC_DTYPE)
            # Never read outside x, whatever was written into indices behind the validation cache
            # (through .data or a numpy view): an out-of-range entry contributes 0 instead.
            in_range = mask_ok & (idx >= 0) & (idx < in_features)  # (BLOCK_O, BLOCK_K)
            mask = mask_b[:, None, None] & in_range[None, :, :]  # (BLOCK_B, BLOCK_O, BLOCK_K)
            gathered = tl.load(x_rows + idx[None, :, :], mask=mask, other=0).to(ACC_DTYPE)
            acc += tl.sum(gathered * w[None, :, :], axis=2)  # (BLOCK_B, BLOCK_O)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0).to(ACC_DTYPE)[None, :]
        y_ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * stride_y + offs_o[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_o[None, :])

    @triton.jit
    def _grad_values_kernel(
        grad_y_ptr, x_ptr, indices_ptr, grad_values_ptr,
        batch, out_features, k, in_features,
        stride_g, stride_x,
        ACC_DTYPE: tl.constexpr,
        ATOMIC: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        split = tl.program_id(2)
        splits = tl.num_programs(2)
        mask_o = offs_o < out_features
        mask_ok = mask_o[:, None] & (offs_k[None, :] < k)  # (BLOCK_O, BLOCK_K)
        entry = offs_o.to(tl.int64)[:, None] * k + offs_k[None, :]  # (BLOCK_O, BLOCK_K)
        idx = tl.load(indices_ptr + entry, mask=mask_ok, other=0).to(tl.int64)
        in_range = mask_ok & (idx >= 0) & (idx < in_features)  # (BLOCK_O, BLOCK_K): see _forward_kernel
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
        for b0 in range(split * BLOCK_B, batch, splits * BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
            mask_b = offs_b < batch
            g = tl.load(
                grad_y_ptr + offs_b.to(tl.int64)[:, None] * stride_g + offs_o[None, :],
                mask=mask_b[:, None] & mask_o[None, :],
                other=0,
            ).to(ACC_DTYPE)  # (BLOCK_B, BLOCK_O)
            gathered = tl.load(
                x_ptr + offs_b.to(tl.int64)[:, None, None] * stride_x + idx[None, :, :],
                mask=mask_b[:, None, None] & in_range[None, :, :],
                other=0,
            ).to(ACC_DTYPE)  # (BLOCK_B, BLOCK_O, BLOCK_K)
            acc += tl.sum(gathered * g[:, :, None], axis=0)  # (BLOCK_O, BLOCK_K)
        if ATOMIC:
            tl.atomic_add(grad_values_ptr + entry, acc, mask=mask_ok, sem="relaxed")
        else:
            tl.store(grad_values_ptr + entry, acc, mask=mask_ok)

    @triton.jit
    def _grad_x_kernel(
        grad_y_ptr, values_ptr, indices_ptr, grad_x_ptr,
        batch, out_features, k, in_features,
        stride_g, stride_gx,
        ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        mask_b = offs_b < batch
        mask_o = offs_o < out_features
        g = tl.load(
            grad_y_ptr + offs_b.to(tl.int64)[:, None] * stride_g + offs_o[None, :],
            mask=mask_b[:, None] & mask_o[None, :],
            other=0,
        ).to(ACC_DTYPE)  # (BLOCK_B, BLOCK_O), loaded once for all of k
        gx_rows = grad_x_ptr + offs_b.to(tl.int64)[:, None, None] * stride_gx  # (BLOCK_B, 1, 1)
        row_starts = offs_o.to(tl.int64)[:, None] * k  # (BLOCK_O, 1)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_ok = mask_o[:, None] & (offs_k[None, :] < k)  # (BLOCK_O, BLOCK_K)
            idx = tl.load(indices_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(tl.int64)
            w = tl.load(values_ptr + row_starts + offs_k[None, :], mask=mask_ok, other=0).to(ACC_DTYPE)
            contribution = g[:, :, None] * w[None, :, :]  # (BLOCK_B, BLOCK_O, BLOCK_K)
            in_range = mask_ok & (idx >= 0) & (idx < in_features)  # never write outside grad_x
            tl.atomic_add(
                gx_rows + idx[None, :, :],
                contribution,
                mask=mask_b[:, None, None] & in_range[None, :, :],
                sem="relaxed",
            )


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(batch: int, out_features: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_O, BLOCK_K): powers of two, ~8k gathered elements per program (~64 per thread at 4 warps)."""
    block_b = min(16, triton.next_power_of_2(max(1, batch)))
    block_k = min(32, triton.next_power_of_2(max(1, k)))
    block_o = min(256, triton.next_power_of_2(max(1, out_features)), max(1, 8192 // (block_b * block_k)))
    return block_b, block_o, block_k


def forward(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for contiguous (batch, in) x; returns (batch, out)."""
    batch, in_features = x.shape
    out_features, k = values.shape
    y = x.new_empty(batch, out_features)
    if batch == 0 or out_features == 0:
        return y
    block_b, block_o, block_k = _blocks(batch, out_features, k)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(out_features, block_o))
    _forward_kernel[grid](
        x, values, indices, bias if bias is not None else values, y,
        batch, out_features, k, in_features,
        x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        ACC_DTYPE=_acc_dtype(x.dtype),
        BLOCK_B=block_b,
        BLOCK_O=block_o,
        BLOCK_K=block_k,
    )
    return y


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    need_grad_x: bool,
    need_grad_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. x (batch, in) and values (out, k); None where not needed."""
    batch, in_features = x.shape
    out_features, k = values.shape
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = grad_values = None
    block_b, block_o, block_k = _blocks(batch, out_features, k)
    if need_grad_x:
        # Atomic adds need a zeroed buffer; accumulate half types in float32.
        grad_x_acc = torch.zeros(batch, in_features, device=x.device, dtype=acc_torch)
        if batch and out_features and k:
            grid = (triton.cdiv(batch, block_b), triton.cdiv(out_features, block_o))
            _grad_x_kernel[grid](
                grad_y, values, indices, grad_x_acc,
                batch, out_features, k, in_features,
                grad_y.stride(0), grad_x_acc.stride(0),
                ACC_DTYPE=_acc_dtype(x.dtype),
                BLOCK_B=block_b,
                BLOCK_O=block_o,
                BLOCK_K=block_k,
            )
        grad_x = grad_x_acc.to(x.dtype)
    if need_grad_values:
        grad_values_acc = torch.zeros(out_features, k, device=x.device, dtype=acc_torch)
        if batch and out_features and k:
            tiles = triton.cdiv(out_features, block_o) * triton.cdiv(k, block_k)
            # Enough programs to fill the device: split the batch when out * k gives few tiles.
            if x.is_cuda:
                sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            else:
                sms = 1  # triton's CPU interpreter (tests)
            splits = max(1, min(triton.cdiv(batch, block_b), triton.cdiv(4 * sms, tiles)))
            grid = (triton.cdiv(out_features, block_o), triton.cdiv(k, block_k), splits)
            _grad_values_kernel[grid](
                grad_y, x, indices, grad_values_acc,
                batch, out_features, k, in_features,
                grad_y.stride(0), x.stride(0),
                ACC_DTYPE=_acc_dtype(x.dtype),
                ATOMIC=splits > 1,
                BLOCK_B=block_b,
                BLOCK_O=block_o,
                BLOCK_K=block_k,
            )
        grad_values = grad_values_acc.to(values.dtype)
    return grad_x, grad_values
