"""CondensedConv2dFunction: equal to the unfold-based CondensedConv2d, gradcheck, saves no unfolded x."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl.condensed.conv_function import condensed_conv2d
from srigl.condensed.layers import CondensedConv2d

CASES = [  # (C, out, k, stride, padding, dilation, groups, N, H, W)
    (4, 6, 3, 1, 1, 1, 1, 2, 7, 5),
    (4, 6, 3, 2, 1, 1, 1, 1, 9, 8),
    (4, 6, 3, 1, 2, 2, 2, 2, 7, 7),
    (6, 6, 3, 2, 0, 1, 6, 3, 11, 9),
]


def _layer(c, out, k, stride, padding, dilation, groups, dtype=torch.float32):
    torch.manual_seed(0)
    conv = nn.Conv2d(c, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, dtype=dtype)
    fan = conv.weight[0].numel()
    keep = torch.rand(out, fan).argsort(1)[:, : max(1, fan // 3)]  # constant fan-in
    mask = torch.zeros(out, fan, dtype=torch.bool).scatter(1, keep, True)
    mask[1] = False  # one ablated filter
    with torch.no_grad():
        conv.weight.mul_(mask.view_as(conv.weight))
    return CondensedConv2d.from_dense(conv, mask.view_as(conv.weight))


def _apply(layer, x):
    xp = F.pad(x, layer._pad)
    y = condensed_conv2d(xp, layer.values, layer.indices, layer.active_rows, layer.out_channels,
                         layer.kernel_size, layer.stride, layer.dilation, layer.groups)
    return y + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("case", CASES)
def test_matches_unfold_layer_forward_and_backward(case):
    *conf, n, h, w = case
    layer = _layer(*conf)
    x = torch.randn(n, conf[0], h, w, requires_grad=True)
    with torch.no_grad():
        y_ref = layer(x)  # the unfold route (no grad)
    conv = layer.to_dense()
    y_dense = conv(x)
    g = torch.randn_like(y_ref)
    gx_ref, gw = torch.autograd.grad(y_dense, (x, conv.weight), g)
    gw = gw.reshape(layer.out_channels, -1)[layer.active_rows]  # (n_active, fan_in_flat)
    gv_ref = gw.gather(1, layer.indices.long())
    y = layer(x)  # grad enabled: the function route
    torch.testing.assert_close(_apply(layer, x), y)
    gx, gv = torch.autograd.grad(y, (x, layer.values), g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, gv_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_gradcheck_float64(case):
    *conf, n, h, w = case
    layer = _layer(*conf, dtype=torch.float64)
    x = torch.randn(n, conf[0], h, w, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_(True)

    def f(x, values):
        xp = F.pad(x, layer._pad)
        return condensed_conv2d(xp, values, layer.indices, layer.active_rows, layer.out_channels,
                                layer.kernel_size, layer.stride, layer.dilation, layer.groups)

    assert torch.autograd.gradcheck(f, (x, values))


def _saved_numels(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


def test_saves_no_unfolded_input():
    layer = _layer(8, 8, 3, 1, 1, 1, 1)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    unfolded = 2 * 8 * 9 * 10 * 10
    old = _saved_numels(lambda: layer._matmul(F.unfold(x, 3, padding=1).transpose(1, 2)))
    new = _saved_numels(lambda: layer(x))
    assert max(old) >= unfolded  # the unfold route keeps the im2col matrix
    assert max(new) < unfolded and max(new) <= 2 * 8 * 12 * 12  # at most the padded input
