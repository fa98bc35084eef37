"""The condensed convolution used in training: direct sparse kernels, or a dense-scatter fallback.

``CondensedConv2d``'s im2col route unfolds ``x`` and runs the fan-in matmul, so autograd would keep
the ``(N, C*kh*kw, L)`` unfolded input, ``kh*kw`` times the input's size. (Its CPU inference route,
:func:`srigl.kernels.cpu.conv_pixels`, has no backward and is not used here.) In training this function
saves only ``x`` (already padded by the caller) plus the small index tensors, and runs one of
three routes (chosen per call by :func:`conv_route`). Zero padding is passed in as amounts: the
C++ kernel applies it on the fly (no padded copy of ``x`` is made or saved); the other routes pad
with ``F.pad`` first.

* ``"cpp"``: the C++ kernel's direct condensed convolution (``csrc/conv.h``: implicit im2col,
  forward, grad_x and grad_values; CPU float32/float64).
* ``"triton"``: the Triton kernels of :mod:`srigl.kernels.triton_conv` (CUDA).
* ``"dense"``: ``values`` scattered into a dense ``(out, C/groups, kh, kw)`` weight for each pass,
  then the dense conv and its two gradient ops, ``grad_values`` gathered back at the active
  positions. Every device and dtype; also what the direct kernels leave to it.

Why a density threshold: the direct kernels do ``k`` multiply-adds per output where the dense conv
does ``fan_in``, but a tuned dense convolution (oneDNN on CPU, cuDNN) runs each multiply-add
several times faster than gathered ones. Above :data:`DIRECT_MAX_DENSITY` the dense route wins;
the measurements behind the value are in results/compact_conv.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from srigl.kernels import cpu
from srigl.kernels.dispatch import _extensions_disabled, _triton_available

__all__ = ["DIRECT_MAX_DENSITY", "ROUTES", "CondensedConv2dFunction", "condensed_conv2d", "conv_route"]

#: Routes accepted by ``condensed_conv2d(..., route=...)``.
ROUTES = ("cpp", "triton", "dense")

#: Largest ``k / fan_in`` (the density of the active filters) for which the automatic choice takes
#: a direct kernel; denser layers take the dense-scatter route (see the module docstring).
DIRECT_MAX_DENSITY = 0.3


def conv_route(x: torch.Tensor, values: torch.Tensor, fan_in_flat: int) -> str:
    """The route :func:`condensed_conv2d` takes for these operands when none is requested."""
    if _extensions_disabled() or values.shape[1] > DIRECT_MAX_DENSITY * fan_in_flat:
        return "dense"
    if x.is_cpu:
        return "cpp" if x.dtype in (torch.float32, torch.float64) and cpu.available() else "dense"
    if x.is_cuda and _triton_available():
        return "triton"
    return "dense"


def _dense(values, indices, active_rows, out_channels, weight_shape):
    """``values (n_active, k)`` scattered into the dense ``(out, C/groups, kh, kw)`` weight."""
    fan_flat = weight_shape[1] * weight_shape[2] * weight_shape[3]
    dense = values.new_zeros(out_channels, fan_flat)  # (out, fan_in_flat)
    dense[active_rows] = dense[active_rows].scatter(1, indices.long(), values)
    return dense.view(weight_shape)  # (out, C/groups, kh, kw)


def _direct_module(route: str):
    if route == "cpp":
        return cpu
    from srigl.kernels import triton_conv  # lazy: it imports triton

    return triton_conv


class CondensedConv2dFunction(torch.autograd.Function):
    """``y = conv2d(pad(x), scatter(values))`` with grads for ``x`` and ``values`` only.

    ``padding`` (left, right, top, bottom) is nonzero on the ``"cpp"`` route only: the others get
    ``x`` already padded by :func:`condensed_conv2d`.
    """

    @staticmethod
    def forward(ctx, x, values, indices, active_rows, out_channels, kernel_size, stride, dilation, groups, route,
                padding):
        weight_shape = (out_channels, x.shape[1] // groups, kernel_size[0], kernel_size[1])
        ctx.save_for_backward(x, values, indices, active_rows)
        ctx.conf = (out_channels, weight_shape, stride, dilation, groups, route, padding)
        if route == "cpp":
            return cpu.conv_forward(x, values, indices, active_rows, out_channels, kernel_size, stride, dilation,
                                    groups, padding=padding)  # (N, out, H_out, W_out)
        if route != "dense":
            return _direct_module(route).conv_forward(
                x, values, indices, active_rows, out_channels, kernel_size, stride, dilation, groups
            )  # (N, out, H_out, W_out)
        weight = _dense(values, indices, active_rows, out_channels, weight_shape)
        return F.conv2d(x, weight, None, stride, 0, dilation, groups)  # (N, out, H_out, W_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, values, indices, active_rows = ctx.saved_tensors
        out_channels, weight_shape, stride, dilation, groups, route, padding = ctx.conf
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_values = None
        if route == "cpp":
            if need_x or need_values:
                grad_x, grad_values = cpu.conv_backward(
                    grad_y.contiguous(), x, values, indices, active_rows, out_channels, weight_shape[2:], stride,
                    dilation, groups, need_x, need_values, padding=padding,
                )
        elif route != "dense":
            if need_x or need_values:
                grad_x, grad_values = _direct_module(route).conv_backward(
                    grad_y.contiguous(), x, values, indices, active_rows, out_channels, weight_shape[2:], stride,
                    dilation, groups, need_x, need_values,
                )
        else:
            if need_x:
                weight = _dense(values, indices, active_rows, out_channels, weight_shape)
                grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y, stride, 0, dilation, groups)
            if need_values:
                grad_w = torch.nn.grad.conv2d_weight(x, weight_shape, grad_y, stride, 0, dilation, groups)
                grad_w = grad_w.reshape(out_channels, -1)[active_rows]  # (n_active, fan_in_flat)
                grad_values = grad_w.gather(1, indices.long())  # (n_active, k)
        return grad_x, grad_values, None, None, None, None, None, None, None, None, None


def condensed_conv2d(x, values, indices, active_rows, out_channels, kernel_size, stride=(1, 1), dilation=(1, 1),
                     groups=1, *, padding=(0, 0, 0, 0), route: str | None = None):
    """Differentiable condensed conv on ``x (N, C, H, W)``; see ``CondensedConv2dFunction``.

    Args:
        padding: zero padding ``(left, right, top, bottom)`` (``F.pad`` order); other padding modes
            are applied by the caller.
        route: ``"cpp"``, ``"triton"`` or ``"dense"`` to force one (``"cpp"``/``"triton"`` raise
            ``BackendUnavailableError`` where they cannot run); None picks by :func:`conv_route`.
    """
    kernel_size = tuple(kernel_size)
    padding = tuple(padding)
    fan_in_flat = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
    if route is None:
        route = conv_route(x, values, fan_in_flat)
    elif route != "dense":
        _check_route(route, x)
    if route != "cpp" and any(padding):
        x, padding = F.pad(x, padding), (0, 0, 0, 0)
    if route != "dense":
        x, values, indices = x.contiguous(), values.contiguous(), indices.contiguous()
    return CondensedConv2dFunction.apply(
        x, values, indices, active_rows, out_channels, kernel_size, tuple(stride), tuple(dilation), groups, route,
        padding,
    )


def _check_route(route: str, x: torch.Tensor) -> None:
    from srigl.kernels.dispatch import BackendUnavailableError

    if route not in ROUTES:
        raise BackendUnavailableError(f"unknown conv route {route!r}; expected one of {ROUTES}")
    if route == "cpp" and not (x.is_cpu and x.dtype in (torch.float32, torch.float64) and cpu.available()):
        raise BackendUnavailableError(f"conv route 'cpp' runs CPU float32/float64 with the C++ kernel built, "
                                      f"got {x.device} {x.dtype}")
    if route == "triton" and not (x.is_cuda and _triton_available()):
        raise BackendUnavailableError(f"conv route 'triton' runs CUDA tensors with triton, got {x.device}")
