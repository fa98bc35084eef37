"""The dense inference route: a layer whose active rows are dense, run as a GEMM over its rows
densified for the call (srigl.kernels.dense_route), and the operator that densifies them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import srigl.kernels as kernels
from srigl.condensed import CondensedLinear
from srigl.kernels import cpu, fanin_to_dense, inference
from srigl.kernels import dense_route as routes


@pytest.fixture(autouse=True)
def _cpp_kernel():
    if not kernels.cpu_extension_available():
        pytest.skip(f"C++ kernel unavailable: {cpu.load_error()}")


def _layer(n_active, in_features, k, *, dtype=torch.float32, index_dtype=torch.int16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_active, in_features, generator=generator).topk(k, dim=1).indices  # (n, k), distinct
    values = torch.randn(n_active, k, generator=generator, dtype=torch.float64).to(dtype)
    return values, indices.to(index_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_densify_golden(dtype, index_dtype):
    values = torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]], dtype=dtype)
    indices = torch.tensor([[3, 0, 3], [1, 2, 0]], dtype=index_dtype)  # row 0 hits column 3 twice
    expected = torch.tensor([[2.0, 0.0, 0.0, 5.0, 0.0], [3.0, 0.5, -1.0, 0.0, 0.0]], dtype=dtype)
    dense = cpu.densify_op()(values, indices, 5)
    assert dense.dtype is dtype and dense.shape == (2, 5)
    assert torch.equal(dense, expected)


def test_densify_writes_every_element_of_recycled_memory():
    # The output comes from at::empty: rows must be zeroed, not left with what the allocator had.
    for _ in range(5):
        junk = torch.full((64, 300), float("nan"))
        del junk
        values, indices = _layer(64, 300, 7, seed=1)
        dense = cpu.densify_op()(values, indices, 300)
        assert torch.equal(dense, fanin_to_dense(values, indices, 300))


def test_densify_refuses_out_of_range_and_bad_shapes():
    values, indices = _layer(4, 10, 3)
    with pytest.raises(RuntimeError, match=r"outside \[0, 9\)"):
        cpu.densify_op()(values, indices, 9)  # the layer addresses column 9 somewhere (seed 0)
    with pytest.raises(RuntimeError, match="must both be"):
        cpu.densify_op()(values, indices[:, :2].contiguous(), 10)
    empty = cpu.densify_op()(values[:0], indices[:0], 10)
    assert empty.shape == (0, 10)


@pytest.mark.parametrize(
    ("batch", "fan_in", "in_features", "dtype", "expected"),
    [
        (128, 40, 100, torch.float32, True),  # at both bounds
        (127, 40, 100, torch.float32, False),  # one row short
        (128, 39, 100, torch.float32, False),  # density 0.39 < 0.4
        (4096, 100, 100, torch.float64, True),
        (32, 40, 100, torch.bfloat16, True),  # bf16 pays from 32 rows at density 0.4,
        (32, 39, 100, torch.bfloat16, False),
        (31, 100, 100, torch.bfloat16, False),
        (64, 20, 100, torch.bfloat16, True),  # from 64 rows at density 0.2
        (64, 19, 100, torch.bfloat16, False),
        (128, 10, 100, torch.bfloat16, True),  # and from 128 rows at density 0.1
        (127, 10, 100, torch.bfloat16, False),
        (1000, 100, 100, torch.float16, False),  # no GEMM measured for this dtype here
        (1000, 0, 0, torch.float32, False),
    ],
)
def test_dense_route_pays_golden(batch, fan_in, in_features, dtype, expected):
    assert routes.dense_route_pays(batch, fan_in, in_features, dtype) is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ablated", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_route_twins_the_kernel_route(monkeypatch, dtype, ablated, with_bias):
    in_features, out_features = 96, 40
    n_active = 25 if ablated else out_features
    values, indices = _layer(n_active, in_features, 60, dtype=dtype, seed=2)  # density 0.62
    generator = torch.Generator().manual_seed(3)
    rows = torch.randperm(out_features, generator=generator)[:n_active].sort().values if ablated else None
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(300, in_features, generator=generator).to(dtype)
    taken = []
    real = routes.dense_route
    monkeypatch.setattr(inference, "dense_route", lambda *a: taken.append(1) or real(*a))
    y_dense = inference.condensed_linear_inference(x, values, indices, bias, rows, in_features, out_features, None)
    assert taken, "300 rows at density 0.62 must take the dense route"
    monkeypatch.setattr(routes, "DENSE_ROUTE", {})
    y_kernel = inference.condensed_linear_inference(x, values, indices, bias, rows, in_features, out_features, None)
    assert len(taken) == 1 and y_dense.shape == y_kernel.shape == (300, out_features)
    full_values = torch.zeros(out_features, 60, dtype=dtype)
    full_indices = torch.zeros(out_features, 60, dtype=indices.dtype)
    at = rows if rows is not None else torch.arange(out_features)
    full_values[at], full_indices[at] = values, indices
    reference = x.double() @ fanin_to_dense(full_values.double(), full_indices, in_features).T
    if bias is not None:
        reference = reference + bias.double()
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.15}[dtype]
    assert (y_dense.double() - reference).abs().max() < tolerance
    assert (y_kernel.double() - reference).abs().max() < tolerance
    if ablated:  # an ablated column holds exactly its bias, or 0
        off = torch.ones(out_features, dtype=torch.bool)
        off[rows] = False
        expected = bias[off].expand(300, -1) if with_bias else torch.zeros(300, int(off.sum()), dtype=dtype)
        assert torch.equal(y_dense[:, off], expected)


def test_dense_route_with_every_neuron_ablated():
    values, indices = _layer(0, 50, 30)
    bias = torch.randn(20)
    x = torch.randn(200, 50)
    y = routes.dense_route(x, values, indices, bias, torch.zeros(0, dtype=torch.long), 50, 20)
    assert torch.equal(y, bias.expand(200, 20))


def test_condensed_linear_takes_the_dense_route_only_where_it_pays(monkeypatch):
    linear = torch.nn.Linear(64, 48)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[::2, :40] = True  # 24 active neurons at fan-in 40 of 64 (density 0.62), 24 ablated
    with torch.no_grad():
        linear.weight.mul_(mask)
    layer = CondensedLinear.from_dense(linear, mask)
    taken = []
    real = routes.dense_route
    monkeypatch.setattr(inference, "dense_route", lambda *a: taken.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        for batch in (1, 16, 127, 128, 500):
            x = torch.randn(batch, 64)
            torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        x3d = torch.randn(4, 50, 64)  # leading dims: 200 rows in all
        torch.testing.assert_close(layer(x3d), linear(x3d), rtol=1e-5, atol=1e-5)
    assert taken == [128, 500, 200]


def test_dense_route_is_not_taken_under_autograd(monkeypatch):
    linear = torch.nn.Linear(64, 32)
    layer = CondensedLinear.from_dense(linear, torch.ones(32, 64, dtype=torch.bool))
    monkeypatch.setattr(inference, "dense_route", lambda *a: pytest.fail("dense route under autograd"))
    x = torch.randn(256, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.values.grad is not None


@settings(max_examples=25, deadline=None)
@given(
    n_active=st.integers(0, 20),
    in_features=st.integers(1, 70),
    density=st.floats(0.0, 1.0),
    batch=st.integers(1, 300),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dense_route_matches_dense_reference(n_active, in_features, density, batch, with_bias, seed):
    k = max(1, round(density * in_features))
    values, indices = _layer(n_active, in_features, k, seed=seed)
    out_features = n_active + 5
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(out_features, generator=generator)[:n_active].sort().values
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(batch, in_features, generator=generator)
    y = routes.dense_route(x, values, indices, bias, rows, in_features, out_features)
    weight = torch.zeros(out_features, in_features, dtype=torch.float64)
    weight[rows] = fanin_to_dense(values.double(), indices, in_features)
    reference = x.double() @ weight.T + (0 if bias is None else bias.double())
    assert y.shape == (batch, out_features)
    assert (y.double() - reference).abs().max() < 1e-4


def _masked_conv(in_channels, out_channels, kernel, *, groups=1, ablated=(), fan_in=5, seed=0, **kwargs):
    """A Conv2d with a constant fan-in mask (filters in ``ablated`` empty), and that mask."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, groups=groups, **kwargs)
    flat = conv.weight[0].numel()
    mask = torch.zeros(out_channels, flat, dtype=torch.bool)
    for o in range(out_channels):
        if o not in ablated:
            mask[o, torch.randperm(flat)[:fan_in]] = True
    mask = mask.view_as(conv.weight)
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask


@pytest.mark.parametrize(
    ("groups", "ablated", "kwargs"),
    [
        (1, (), dict(padding=1)),
        (1, (0, 3, 4), dict(padding=1, stride=2)),  # ablated filters: their channels hold the bias
        (2, (1, 6), dict(padding=2, dilation=2)),  # grouped with ablation: zero filters in their group
        (2, (), dict(padding="same")),
        (1, (2,), dict(padding="same", padding_mode="reflect")),
        (1, (), dict(padding=(1, 0), bias=False)),
    ],
)
def test_bf16_conv_inference_takes_the_dense_route_and_matches_the_masked_conv(monkeypatch, groups, ablated, kwargs):
    from srigl.condensed import CondensedConv2d

    kernel = (2, 3) if kwargs.get("padding") == "same" else 3  # 'same' with an even kernel pads unevenly
    conv, mask = _masked_conv(4, 8, kernel, groups=groups, ablated=ablated, **kwargs)
    layer = CondensedConv2d.from_dense(conv, mask).to(torch.bfloat16)
    assert layer.n_active == 8 - len(ablated)
    calls = []
    real = routes.dense_conv2d
    monkeypatch.setattr("srigl.condensed.layers.dense_conv2d", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 4, 11, 9)
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16))
        reference = conv(x.to(torch.bfloat16).float())  # fp32 conv on the bf16-rounded weights below
    assert calls == [1] and y.dtype is torch.bfloat16 and y.shape == reference.shape
    with torch.no_grad():
        conv.weight.copy_(conv.weight.to(torch.bfloat16).float())
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.to(torch.bfloat16).float())
        reference = conv(x.to(torch.bfloat16).float())
    assert (y.float() - reference).abs().max() < 0.05
    for o in ablated:  # exactly the bias (or 0) in an ablated channel
        expected = conv.bias[o].to(torch.bfloat16) if conv.bias is not None else torch.tensor(0, dtype=torch.bfloat16)
        assert torch.equal(y[:, o], expected.expand_as(y[:, o]))


def test_float_conv_inference_keeps_the_pixel_kernel(monkeypatch):
    from srigl.condensed import CondensedConv2d

    conv, mask = _masked_conv(4, 8, 3, padding=1)
    layer = CondensedConv2d.from_dense(conv, mask)
    monkeypatch.setattr("srigl.condensed.layers.dense_conv2d", lambda *a: pytest.fail("fp32 took the dense route"))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_fanin_matmul_without_autograd_takes_the_dense_route_where_it_pays(monkeypatch):
    from srigl.kernels import dispatch, fanin_matmul, fanin_matmul_rows

    values, indices = _layer(12, 40, 30, seed=4)  # density 0.75
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 10, 11, 13, 15, 17, 19])
    bias = torch.randn(20)
    taken = []
    real = routes.dense_route
    monkeypatch.setattr(dispatch, "dense_route", lambda *a: taken.append(a[0].shape[0]) or real(*a))
    weight = torch.zeros(20, 40, dtype=torch.float64)
    weight[rows] = fanin_to_dense(values.double(), indices, 40)
    for batch in (8, 200):
        x = torch.randn(2, batch // 2, 40)  # leading dims flattened to `batch` rows
        y = fanin_matmul(x, values, indices)
        assert (y.double() - x.double() @ weight[rows].T).abs().max() < 1e-4
        y_rows = fanin_matmul_rows(x, values, indices, rows, 20, bias)
        assert y_rows.shape == (2, batch // 2, 20)
        assert (y_rows.double() - (x.double() @ weight.T + bias.double())).abs().max() < 1e-4
    assert taken == [200, 200]  # 8 rows stay on the kernels
    x = torch.randn(200, 40, requires_grad=True)  # autograd: the kernels' Function, never the dense route
    fanin_matmul(x, values, indices).sum().backward()
    assert taken == [200, 200] and x.grad is not None


def test_dense_route_of_fanin_matmul_rows_names_bad_rows_and_indices():
    from srigl.kernels import FanInOperandError, IndexOutOfRangeError, fanin_matmul_rows

    values, indices = _layer(3, 10, 8, seed=5)
    x = torch.randn(300, 10)
    with pytest.raises(FanInOperandError, match=r"rows must lie in \[0, 6\), got \[0, 7\]"):
        fanin_matmul_rows(x, values, indices, torch.tensor([0, 4, 7]), 6)
    with pytest.raises(IndexOutOfRangeError):
        fanin_matmul_rows(x[:, :9].contiguous(), values, indices, torch.tensor([0, 4, 5]), 6)


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blockwise_densify_twins_the_whole_block(monkeypatch, with_rows, with_bias):
    """A layer wider than MAX_BLOCK_BYTES is densified and multiplied in row blocks: same result."""
    values, indices = _layer(37, 50, 30, seed=6)
    generator = torch.Generator().manual_seed(7)
    out_features = 45 if with_rows else 37
    rows = torch.randperm(45, generator=generator)[:37].sort().values if with_rows else None
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(130, 50, generator=generator)
    whole = routes.dense_route(x, values, indices, bias, rows, 50, out_features)
    blocks = []
    real = cpu.densify_op()
    monkeypatch.setattr(cpu, "densify_op", lambda: lambda v, i, n: blocks.append(v.shape[0]) or real(v, i, n))
    monkeypatch.setattr(routes, "MAX_BLOCK_BYTES", 8 * 50 * 4)  # 8 rows of 50 float32 per block
    chunked = routes.dense_route(x, values, indices, bias, rows, 50, out_features)
    assert blocks == [8, 8, 8, 8, 5]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_place_columns_golden_and_bad_rows(dtype):
    active = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    bias = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=dtype)
    rows = torch.tensor([3, 1])
    placed = cpu.place_columns_op()(active, rows, bias, 4)
    assert torch.equal(placed, torch.tensor([[10.0, 2.0, 30.0, 1.0], [10.0, 4.0, 30.0, 3.0]], dtype=dtype))
    zeros = cpu.place_columns_op()(active, rows, None, 4)
    assert torch.equal(zeros, torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 4.0, 0.0, 3.0]], dtype=dtype))
    with pytest.raises(RuntimeError, match=r"rows\[0\] = 4 is outside \[0, 4\)"):
        cpu.place_columns_op()(active, torch.tensor([4, 1]), bias, 4)


def _ablated_linear(fan_in: int, dtype=torch.float32):
    linear = torch.nn.Linear(64, 48)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[::2, :fan_in] = True  # 24 active neurons, 24 ablated
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear.to(dtype), CondensedLinear.from_dense(linear, mask).to(dtype)


def test_dense_rows_are_cached_with_the_weights_and_follow_every_change():
    linear, layer = _ablated_linear(40)  # density 0.62: cached
    x = torch.randn(200, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        cache = layer._window_cache
        dense = cache.dense
        assert dense is not None and dense.shape == (24, 64)
        assert torch.equal(dense, fanin_to_dense(layer.values, layer.indices, 64))
        layer(x)
        assert cache.dense is dense  # unchanged weights: reused, not densified again
        layer.values.mul_(2.0)  # an in-place change bumps the version counter
        linear.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        assert cache.dense is not dense
    layer(x).sum().backward()  # a training forward drops the copies
    assert "_window_cache" not in layer.__dict__


def test_sparse_rows_on_the_dense_route_are_not_cached():
    linear, layer = _ablated_linear(10, torch.bfloat16)  # density 0.16: bf16 dense route, not cached
    x = torch.randn(200, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        assert layer._window_cache.dense is None
        assert (y.float() - linear(x).float()).abs().max() < 0.1


def test_no_copies_without_window_inference(monkeypatch):
    linear, layer = _ablated_linear(40)
    layer.window_inference = False
    x = torch.randn(200, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "_window_cache" not in layer.__dict__
