"""A condensed convolution whose backward saves only the input, not its im2col unfolding.

``CondensedConv2d`` today unfolds ``x`` and runs the fan-in matmul, so autograd keeps the
``(N, C*kh*kw, L)`` unfolded input, ``kh*kw`` times the input's size. This function instead scatters
``values`` into a dense ``(out, C/groups, kh, kw)`` weight for each pass and calls the dense conv
and its two gradient ops, gathering ``grad_values`` back at the active positions: it saves ``x``
(already padded by the caller) plus the small index tensors. The direct sparse kernel (implicit
im2col on CPU and in Triton) asked for by issue #17 is not implemented yet.
"""

import torch
import torch.nn.functional as F


def _dense(values, indices, active_rows, out_channels, weight_shape):
    """``values (n_active, k)`` scattered into the dense ``(out, C/groups, kh, kw)`` weight."""
    fan_flat = weight_shape[1] * weight_shape[2] * weight_shape[3]
    dense = values.new_zeros(out_channels, fan_flat)  # (out, fan_in_flat)
    dense[active_rows] = dense[active_rows].scatter(1, indices.long(), values)
    return dense.view(weight_shape)  # (out, C/groups, kh, kw)


class CondensedConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x_padded, scatter(values))`` with grads for ``x_padded`` and ``values`` only.

    ``x`` must already be padded (every padding mode is applied by the caller with ``F.pad``).
    """

    @staticmethod
    def forward(ctx, x, values, indices, active_rows, out_channels, kernel_size, stride, dilation, groups):
        weight_shape = (out_channels, x.shape[1] // groups, kernel_size[0], kernel_size[1])
        weight = _dense(values, indices, active_rows, out_channels, weight_shape)
        ctx.save_for_backward(x, values, indices, active_rows)
        ctx.conf = (out_channels, weight_shape, stride, dilation, groups)
        return F.conv2d(x, weight, None, stride, 0, dilation, groups)  # (N, out, H_out, W_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, values, indices, active_rows = ctx.saved_tensors
        out_channels, weight_shape, stride, dilation, groups = ctx.conf
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            weight = _dense(values, indices, active_rows, out_channels, weight_shape)
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y, stride, 0, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x, weight_shape, grad_y, stride, 0, dilation, groups)
            grad_w = grad_w.reshape(out_channels, -1)[active_rows]  # (n_active, fan_in_flat)
            grad_values = grad_w.gather(1, indices.long())  # (n_active, k)
        return grad_x, grad_values, None, None, None, None, None, None, None


def condensed_conv2d(x, values, indices, active_rows, out_channels, kernel_size, stride=(1, 1), dilation=(1, 1), groups=1):
    """Differentiable condensed conv on a padded ``x (N, C, H, W)``; see ``CondensedConv2dFunction``."""
    return CondensedConv2dFunction.apply(
        x, values, indices, active_rows, out_channels, tuple(kernel_size), tuple(stride), tuple(dilation), groups
    )
