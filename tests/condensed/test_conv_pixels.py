"""The inference convolution with output pixels as vector lanes (``srigl_fanin::conv_pixels``): the
kernel against F.conv2d with the scattered dense weight, and CondensedConv2d's no-grad route
through it against its masked dense twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srigl.condensed import CondensedConv2d
from srigl.kernels import cpu, cpu_extension_available

pytestmark = pytest.mark.skipif(not cpu_extension_available(), reason="C++ kernel unavailable")

# (N, C, out, H, W, kernel, stride, padding (left, right, top, bottom), dilation, groups)
CASES = [
    (1, 8, 6, 9, 9, 1, 1, (0, 0, 0, 0), 1, 1),  # 1x1 read in place, 81 pixels: a partial last vector
    (1, 16, 9, 7, 7, 1, 1, (0, 0, 0, 0), 1, 1),  # ResNet's last stage: 49 pixels
    (3, 5, 7, 10, 7, 1, 2, (0, 0, 0, 0), 1, 1),  # 1x1 stride 2 (a downsample): one phase copied
    (2, 8, 6, 9, 11, 3, 1, (1, 1, 1, 1), 1, 1),  # 3x3 padded, garbage columns
    (1, 8, 6, 9, 11, 3, 2, (1, 1, 1, 1), 1, 1),  # 3x3 stride 2, batch 1
    (1, 6, 6, 13, 13, 3, 1, (0, 0, 0, 0), 1, 3),  # groups 3, no padding
    (2, 6, 6, 13, 12, 3, 1, (2, 2, 2, 2), 2, 3),  # dilation 2, groups
    (1, 5, 5, 11, 9, 3, 2, (1, 1, 1, 1), 1, 5),  # depthwise, stride 2
    (1, 3, 8, 30, 31, 7, 2, (3, 3, 3, 3), 1, 1),  # a ResNet stem: 7x7 stride 2
    (1, 16, 9, 9, 8, (2, 3), (3, 2), (1, 0, 2, 0), (1, 2), 1),  # rectangular everything, asymmetric padding
    (2, 16, 9, 5, 5, (3, 1), 1, (0, 0, 0, 0), 1, 1),  # a kernel one column wide, read in place
    (1, 64, 40, 20, 20, 3, 1, (1, 1, 1, 1), 1, 1),  # many channels: narrower pixel blocks, 4 channels at a time
    (1, 512, 20, 7, 7, 1, 1, (0, 0, 0, 0), 1, 1),  # many channels, a 49-pixel plane
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _operands(case, *, dtype=torch.float32, index_dtype=torch.int16, density=0.3, ablated=(1,), seed=0):
    """(x, values, indices, rows, bias, dense weight (out, C / groups, kh, kw), conf)."""
    n, c, out, h, w, kernel, stride, padding, dilation, groups = case
    kernel, stride, dilation = map(_pair, (kernel, stride, dilation))
    generator = torch.Generator().manual_seed(seed)
    fan_in = c // groups * kernel[0] * kernel[1]
    k = max(1, round(density * fan_in))
    rows = torch.tensor([o for o in range(out) if o not in ablated])
    indices = torch.stack([torch.randperm(fan_in, generator=generator)[:k] for _ in rows]).to(index_dtype)
    # The last row reads the last input position, so the last channel's plane is read to its end.
    indices[-1, -1] = fan_in - 1 if not bool((indices[-1, :-1] == fan_in - 1).any()) else indices[-1, -1]
    values = torch.randn(len(rows), k, generator=generator, dtype=dtype)
    bias = torch.randn(out, generator=generator, dtype=dtype)
    dense = torch.zeros(out, fan_in, dtype=dtype)
    dense[rows] = dense[rows].scatter(1, indices.long(), values)
    weight = dense.view(out, c // groups, *kernel)
    x = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    return x, values, indices, rows, bias, weight, (out, kernel, stride, dilation, groups, padding)


def _run(x, values, indices, rows, bias, conf):
    out, kernel, stride, dilation, groups, padding = conf
    return cpu.conv_pixels(x, values, indices, rows, bias, out, kernel, stride, dilation, groups, padding=padding)


def _reference(x, weight, bias, conf):
    _, _, stride, dilation, groups, padding = conf
    return F.conv2d(F.pad(x, padding), weight, bias, stride, 0, dilation, groups)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_dense_conv(case, with_bias):
    x, values, indices, rows, bias, weight, conf = _operands(case)
    bias = bias if with_bias else None
    y = _run(x, values, indices, rows, bias, conf)
    torch.testing.assert_close(y, _reference(x, weight, bias, conf), rtol=1e-4, atol=1e-4)
    # The ablated filter outputs exactly its bias.
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], float(bias[1]) if with_bias else 0.0))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_kernel_float64_and_every_index_dtype(index_dtype, case):
    x, values, indices, rows, bias, weight, conf = _operands(case, dtype=torch.float64, index_dtype=index_dtype)
    torch.testing.assert_close(_run(x, values, indices, rows, bias, conf), _reference(x, weight, bias, conf),
                               rtol=1e-12, atol=1e-12)


def test_kernel_with_every_filter_ablated_outputs_the_bias():
    x, values, indices, rows, bias, weight, conf = _operands(CASES[3])
    empty = values[:0], indices[:0], rows[:0]
    y = _run(x, *empty, bias, conf)
    assert torch.equal(y, bias.view(1, -1, 1, 1).expand_as(y))
    assert torch.equal(_run(x, *empty, None, conf), torch.zeros_like(y))


def test_kernel_refuses_out_of_range_indices_and_a_wrong_bias():
    x, values, indices, rows, bias, _, conf = _operands(CASES[3])
    bad = indices.clone()
    bad[0, 0] = 8 * 9  # one past the fan-in
    with pytest.raises(RuntimeError, match="indices out of range"):
        _run(x, values, bad, rows, bias, conf)
    with pytest.raises(RuntimeError, match="bias must be"):
        _run(x, values, indices, rows, bias[:-1], conf)


def _sparse_conv(conv: nn.Conv2d, density: float = 0.25, seed: int = 0) -> nn.Conv2d:
    """``conv`` with a random constant fan-in mask applied to its weight, one filter ablated."""
    generator = torch.Generator().manual_seed(seed)
    flat = conv.weight.detach().view(conv.out_channels, -1)
    k = max(1, round(density * flat.shape[1]))
    order = torch.rand(flat.shape, generator=generator).argsort(1)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :k], True)
    mask[0] = False
    with torch.no_grad():
        flat.mul_(mask)
    conv.register_buffer("weight_mask", mask.view_as(conv.weight))
    return conv


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # the reference nn.Conv2d's
@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(16, 12, 1),
    lambda: nn.Conv2d(16, 12, 1, stride=2, bias=False),
    lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    lambda: nn.Conv2d(6, 9, 3, padding="same", groups=3, dilation=2),
    lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
], ids=["1x1", "1x1-stride2", "3x3-stride2", "grouped-same-dilated", "reflect", "circular"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "batch1", "unbatched"])
def test_condensed_conv2d_inference_route_equals_masked_twin(monkeypatch, make, layout):
    torch.manual_seed(0)
    dense = _sparse_conv(make()).eval()
    layer = CondensedConv2d.from_dense(dense)
    x = torch.randn(3, dense.in_channels, 13, 15)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:, ::2]  # non-contiguous rows and columns
    elif layout == "batch1":
        x = x[:1]
    elif layout == "unbatched":
        x = x[0]
    calls = []
    real = cpu.conv_pixels
    monkeypatch.setattr(cpu, "conv_pixels", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        y, expected = layer(x), dense(x)
    assert calls == [1]
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_grad_enabled_autocast_and_bf16_keep_their_routes(monkeypatch):
    """Training (grad enabled), autocast and dtypes the kernel does not take stay off the inference route."""
    dense = _sparse_conv(nn.Conv2d(8, 6, 3, padding=1)).eval()
    layer = CondensedConv2d.from_dense(dense)
    monkeypatch.setattr(cpu, "conv_pixels", lambda *a, **kw: pytest.fail("inference route taken"))
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)  # grad enabled
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with torch.no_grad():
        y = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    torch.testing.assert_close(y.float(), dense(x), rtol=5e-2, atol=5e-2)


def test_compiled_condensed_conv2d_is_one_graph_equal_to_eager():
    torch._dynamo.reset()
    dense = _sparse_conv(nn.Conv2d(8, 6, 3, stride=2, padding=1)).eval()
    layer = CondensedConv2d.from_dense(dense)
    x = torch.randn(1, 8, 9, 9)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-5, atol=1e-5)
