"""The direct condensed convolution (implicit im2col): C++ and Triton kernels against F.conv2d with the
scattered dense weight, the per-call route choice, and a multi-step SRigL twin run through them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srigl
from srigl.condensed import conv_function
from srigl.condensed.conv_function import DIRECT_MAX_DENSITY, condensed_conv2d, conv_route
from srigl.kernels import cpu, cpu_extension_available
from srigl.kernels.dispatch import BackendUnavailableError
from srigl.storage.compact import CompactParam

# (N, C, out, H, W, kernel, stride, padding, dilation, groups)
CASES = [
    (2, 4, 6, 7, 5, 3, 1, 1, 1, 1),  # odd sizes, padding
    (3, 5, 7, 9, 8, 3, 2, 1, 1, 1),  # stride 2, odd channels
    (70, 6, 5, 9, 11, (3, 2), (2, 1), (0, 1), 1, 1),  # two batch tiles (64 + 6), rectangular kernel and stride
    (5, 4, 6, 11, 11, 3, 1, 2, 2, 2),  # dilation 2, groups 2
    (5, 6, 6, 11, 9, 3, 2, 1, 1, 6),  # depthwise, stride 2
    (17, 8, 9, 10, 10, 1, 1, 0, 1, 1),  # 1x1 (a ResNet downsample's shape)
    (1, 3, 4, 6, 6, 5, 2, 2, 1, 1),  # batch 1, kernel 5
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _operands(case, *, dtype=torch.float32, index_dtype=torch.int16, density=0.3, seed=0):
    """(x, values, indices, rows, dense weight, conf, pad): one ablated filter, random constant fan-in;
    ``pad`` (left, right, top, bottom) is the case's padding, with one extra column on the right."""
    n, c, out, h, w, kernel, stride, padding, dilation, groups = case
    kernel, stride, padding, dilation = map(_pair, (kernel, stride, padding, dilation))
    generator = torch.Generator().manual_seed(seed)
    fan_in = c // groups * kernel[0] * kernel[1]
    k = max(1, round(density * fan_in))
    rows = torch.tensor([o for o in range(out) if o != 1])  # filter 1 ablated
    indices = torch.stack([torch.randperm(fan_in, generator=generator)[:k] for _ in rows]).to(index_dtype)
    values = torch.randn(len(rows), k, generator=generator, dtype=dtype)
    dense = torch.zeros(out, fan_in, dtype=dtype)
    dense[rows] = dense[rows].scatter(1, indices.long(), values)
    weight = dense.view(out, c // groups, *kernel)  # (out, C / groups, kh, kw)
    x = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    pad = (padding[1], padding[1] + 1, padding[0], padding[0])  # asymmetric, as padding='same' can be
    return x, values, indices, rows, weight, (out, kernel, stride, dilation, groups), pad


def _expected(x, weight, grad_y, conf, pad=(0, 0, 0, 0)):
    """y, grad_x (of the unpadded x) and the dense weight gradient (out, fan_in), from F.conv2d."""
    out, _, stride, dilation, groups = conf
    xp = F.pad(x, pad)
    y = F.conv2d(xp, weight, None, stride, 0, dilation, groups)
    grad_xp = torch.nn.grad.conv2d_input(xp.shape, weight, grad_y, stride, 0, dilation, groups)
    grad_x = grad_xp[..., pad[2]:pad[2] + x.shape[2], pad[0]:pad[0] + x.shape[3]]
    grad_w = torch.nn.grad.conv2d_weight(xp, weight.shape, grad_y, stride, 0, dilation, groups)
    return y, grad_x, grad_w.reshape(out, -1)  # (out, fan_in)


def _route_or_skip(route):
    if route == "cpp" and not cpu_extension_available():
        pytest.skip(f"C++ kernel unavailable: {cpu.load_error()}")


@pytest.mark.parametrize("route", ["cpp", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_dense_conv(route, case):
    _route_or_skip(route)
    x, values, indices, rows, weight, conf, pad = _operands(case)
    x.requires_grad_(True)
    values.requires_grad_(True)
    y = condensed_conv2d(x, values, indices, rows, conf[0], *conf[1:], padding=pad, route=route)
    grad_y = torch.randn_like(y)
    grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_y)
    y_ref, grad_x_ref, grad_w_ref = _expected(x.detach(), weight, grad_y, conf, pad)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))  # the ablated filter outputs exactly 0
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_values, grad_w_ref[rows].gather(1, indices.long()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_cpp_kernel_float64_and_every_index_dtype(index_dtype):
    _route_or_skip("cpp")
    x, values, indices, rows, weight, conf, pad = _operands(CASES[1], dtype=torch.float64, index_dtype=index_dtype)
    y = cpu.conv_forward(x, values, indices, rows, *conf, padding=pad)
    grad_y = torch.randn_like(y)
    grad_x, grad_values = cpu.conv_backward(grad_y, x, values, indices, rows, *conf, True, True, padding=pad)
    y_ref, grad_x_ref, grad_w_ref = _expected(x, weight, grad_y, conf, pad)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_values, grad_w_ref[rows].gather(1, indices.long()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_tile", [1, 16, 32, 64])
def test_cpp_tile_width_does_not_change_the_result(max_tile):
    _route_or_skip("cpp")
    x, values, indices, rows, weight, conf, pad = _operands(CASES[2], dtype=torch.float64)
    y = cpu.conv_forward(x, values, indices, rows, *conf, padding=pad, max_tile=max_tile)
    grad_y = torch.randn_like(y)
    grad_x, grad_values = cpu.conv_backward(grad_y, x, values, indices, rows, *conf, True, True, padding=pad,
                                            max_tile=max_tile)
    y_ref, grad_x_ref, grad_w_ref = _expected(x, weight, grad_y, conf, pad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_values, grad_w_ref[rows].gather(1, indices.long()))


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_cpp_route_passes_gradcheck(case):
    _route_or_skip("cpp")
    x, values, indices, rows, _, conf, pad = _operands((2, *case[1:]), dtype=torch.float64)
    x.requires_grad_(True)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, v: condensed_conv2d(x, v, indices, rows, conf[0], *conf[1:], padding=pad, route="cpp"), (x, values)
    )


def test_cpp_kernel_refuses_out_of_range_indices():
    _route_or_skip("cpp")
    x, values, indices, rows, _, conf, _ = _operands(CASES[0])
    indices[0, 0] = 4 * 9  # one past the fan-in
    with pytest.raises(RuntimeError, match="indices out of range"):
        cpu.conv_forward(x, values, indices, rows, *conf)


def test_route_follows_density_device_and_the_disable_switch(monkeypatch):
    x = torch.randn(1, 8, 5, 5)
    fan_in = 8 * 9
    sparse_values = torch.randn(4, int(DIRECT_MAX_DENSITY * fan_in))
    dense_values = torch.randn(4, int(DIRECT_MAX_DENSITY * fan_in) + 1)
    expected = "cpp" if cpu_extension_available() else "dense"
    assert conv_route(x, sparse_values, fan_in) == expected
    assert conv_route(x, dense_values, fan_in) == "dense"
    assert conv_route(x.half(), sparse_values.half(), fan_in) == "dense"  # the C++ kernel is float32/64 only
    monkeypatch.setenv("SRIGL_DISABLE_EXTENSION", "1")
    assert conv_route(x, sparse_values, fan_in) == "dense"
    with pytest.raises(BackendUnavailableError, match="'triton' runs CUDA"):
        condensed_conv2d(x, sparse_values, torch.zeros(4, 21, dtype=torch.int16), torch.arange(4), 4, (3, 3),
                         route="triton")


def test_triton_conv_kernels_under_interpreter(tmp_path):
    """The Triton kernels on CPU with TRITON_INTERPRET=1 (needs triton, not a GPU), at tiny sizes."""
    pytest.importorskip("triton", reason="triton not installed")
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_conv_direct import CASES, _operands, _expected\n"
        "from srigl.kernels import triton_conv as tc\n"
        "for case, dtype in [(CASES[0], torch.float32), (CASES[1], torch.float32), (CASES[3], torch.float64),\n"
        "                    (CASES[4], torch.float32), ((3, *CASES[2][1:]), torch.float32)]:\n"
        "    x, values, indices, rows, weight, conf, pad = _operands(case, dtype=dtype)\n"
        "    x = torch.nn.functional.pad(x, pad)  # the Triton route gets x padded\n"
        "    y = tc.conv_forward(x, values, indices, rows, *conf)\n"
        "    grad_y = torch.randn_like(y)\n"
        "    grad_x, grad_values = tc.conv_backward(grad_y, x, values, indices, rows, *conf, True, True)\n"
        "    y_ref, grad_x_ref, grad_w_ref = _expected(x, weight, grad_y, conf)\n"
        "    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)\n"
        "    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-4, atol=1e-4)\n"
        "    torch.testing.assert_close(grad_values, grad_w_ref[rows].gather(1, indices.long()), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(script)], env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ----------------------------------------------------------------------------------------- multi-step twin run
def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(),
        nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(12, 9, (3, 1), stride=(1, 2), padding=(0, 1), bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(9 * 4 * 4, 5),  # 11x10 -> 11x10 -> 6x5 -> 4x4
    )


@pytest.mark.slow
def test_srigl_steps_through_the_direct_kernel_equal_masked_dense(monkeypatch):
    """Compact SRigL whose convolutions run the direct kernel ends a few updates with the masks and
    (fp32-close) weights of the masked-dense run."""
    _route_or_skip("cpp")
    routes = []
    original = conv_function.conv_route

    def recording_route(*args):
        routes.append(original(*args))
        return routes[-1]

    monkeypatch.setattr(conv_function, "conv_route", recording_route)
    # Ablation raises k' of the surviving filters past the automatic threshold: force the kernel.
    monkeypatch.setattr(conv_function, "DIRECT_MAX_DENSITY", 1.0)
    steps = 12
    runs = []
    for compact in (False, True):
        model = _convnet(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = srigl.SRigL(model, optimizer, sparsity=0.85, total_steps=steps, delta=3, alpha=0.4, gamma_sal=0.9,
                         compact=compact, distribution="uniform")
        runs.append((model, optimizer, sp))
    generator = torch.Generator().manual_seed(1)
    updates = 0
    for _ in range(steps):
        x = torch.randn(9, 3, 11, 10, generator=generator)
        y = torch.randint(0, 5, (9,), generator=generator)
        stats = []
        for model, optimizer, sp in runs:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            stats.append(sp.step())
            optimizer.zero_grad()
        updates += stats[1] is not None
    dense_sp, compact_sp = runs[0][2], runs[1][2]
    assert updates >= 2 and set(routes) == {"cpp"}
    assert sum(isinstance(layer, CompactParam) for layer in compact_sp.layers) == 4
    masks_dense, masks_compact = dense_sp.masks(), compact_sp.masks()
    assert masks_dense.keys() == masks_compact.keys()
    for name in masks_dense:
        assert torch.equal(masks_dense[name], masks_compact[name]), name
    weights = {layer.name: layer.dense_view()[0].reshape(layer.shape) for layer in compact_sp.layers}
    for layer in dense_sp.layers:
        torch.testing.assert_close(weights[layer.name], layer.dense_view()[0].reshape(layer.shape),
                                   rtol=1e-4, atol=1e-5, msg=layer.name)


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # the reference nn.Conv2d's
@pytest.mark.parametrize("padding, padding_mode", [(2, "zeros"), ("same", "zeros"), (1, "reflect"), (1, "circular")])
def test_condensed_conv2d_training_forward_equals_its_dense_twin(padding, padding_mode):
    """The layer's grad-enabled forward (kernel-side zero padding, or F.pad for the other modes)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 4), padding=padding, padding_mode=padding_mode)
    mask = torch.zeros(8, 6 * 12, dtype=torch.bool)
    mask.scatter_(1, torch.rand(8, 6 * 12).argsort(1)[:, :9], True)
    with torch.no_grad():
        conv.weight.mul_(mask.view_as(conv.weight))
    layer = srigl.condensed.CondensedConv2d.from_dense(conv, mask.view_as(conv.weight))
    dense = layer.to_dense()
    x = torch.randn(3, 6, 9, 7, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    y_ref = dense(x)
    (grad_x_ref,) = torch.autograd.grad(y_ref, x, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-4, atol=1e-5)
