"""bfloat16 on the C++ CPU kernel: every route the dispatcher can take, against the float32 reference.

The kernel accumulates bf16 products in float and rounds once per output, so its result should be
the float32 reference (computed on the same bf16 operands) rounded to bf16, up to the summation
order: within one bf16 ulp everywhere, and bit-equal almost everywhere.
"""

from __future__ import annotations

import pytest
import torch

import srigl.kernels as kernels
from srigl.condensed import CondensedLinear
from srigl.kernels import cpu, fanin_matmul, fanin_matmul_rows, inference, reference

ROUTES = ("avx512_bf16", "portable")


@pytest.fixture(autouse=True)
def _cpp_kernel():
    if not kernels.cpu_extension_available():
        pytest.skip(f"C++ kernel unavailable: {cpu.load_error()}")
    torch.manual_seed(0)  # the inputs drawn with torch.randn are the same on every run
    yield
    cpu.bf16_route(portable=False)  # let the CPU decide again for later tests


@pytest.fixture(params=ROUTES)
def route(request) -> str:
    """Runs the test on the vdpbf16ps route (where this CPU has AVX-512-BF16) and the portable one."""
    if cpu.bf16_route(portable=request.param == "portable") != request.param:
        pytest.skip("this CPU (or build) has no AVX-512-BF16")
    return request.param


def _layer(out_features, in_features, k, *, index_dtype=torch.int16, seed=0, bias=True):
    """bf16 (values, indices, bias) with k distinct, unsorted inputs per row."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(out_features, in_features, generator=generator).topk(k, dim=1).indices  # (out, k)
    values = torch.randn(out_features, k, generator=generator).bfloat16()
    b = torch.randn(out_features, generator=generator).bfloat16() if bias else None
    return values, indices.to(index_dtype), b


def _reference(x, values, indices, bias):
    """The float32 product of the same bf16 operands (not rounded), through the dense weight."""
    weight = reference.fanin_to_dense(values.float(), indices, x.shape[-1])  # (out, in)
    return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())


def _assert_bf16_close(y, expected):
    """y is expected (float32) rounded to bf16, to within one ulp, and bit-equal on >= 90 % of outputs
    (a float sum in another order lands on the other side of a rounding boundary now and then;
    truncating instead of rounding would miss about half)."""
    assert y.dtype is torch.bfloat16 and y.shape == expected.shape
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs().clamp_min(1e-3)  # one ulp at |expected|
    assert bool(((y.float() - expected).abs() <= ulp).all()), (y.float() - expected).abs().max()
    assert (y == expected.bfloat16()).float().mean().item() >= 0.9


# ---------------------------------------------------------------------------------------------
# Golden: the rounding of the results
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 3, 20])  # gather route, then transposed tiles (scalar and SIMD tails)
def test_rounding_is_nearest_even_with_inf_and_nan(route, batch):
    # y = x[:, 0] + x[:, 1], exact in float32; the kernel must round as torch does (nearest, ties to
    # even), overflow to inf and keep NaN.
    pairs = torch.tensor([
        [1.0, 2.0**-8],       # 1 + half an ulp: a tie, to the even 1.0
        [1.0, 3 * 2.0**-8],   # 1 + 1.5 ulp: a tie, to the even 1 + 2 ulp
        [1.0, 2.0**-9],       # below half an ulp: 1.0
        [-1.0, -3 * 2.0**-8],
        [3.0e38, 3.0e38],     # overflows: inf
        [float("nan"), 1.0],
        [float("inf"), 1.0],
        [0.0, -0.0],
    ])
    # 16 outputs (the pairs twice), so the tiled route's results leave through full SIMD stores too.
    x = pairs.repeat(2, 1).reshape(1, 32).repeat(batch, 1).bfloat16()  # (batch, 32)
    values = torch.ones(16, 2, dtype=torch.bfloat16)
    indices = torch.arange(32, dtype=torch.int16).reshape(16, 2)  # output o adds inputs 2o and 2o + 1
    y = fanin_matmul(x, values, indices, backend="cpp")
    expected = (x.float()[:, 0::2] + x.float()[:, 1::2]).bfloat16()  # torch's float -> bf16 rounding
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)  # the NaN's bits differ between torch's conversions; both are NaN
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_golden_small_layer(route):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]], dtype=torch.bfloat16)
    values = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.bfloat16)
    indices = torch.tensor([[0, 3], [1, 2]], dtype=torch.int16)
    bias = torch.tensor([0.5, -1.0], dtype=torch.bfloat16)
    expected = torch.tensor([[-2.5, 4.5], [1.5, 1.0]], dtype=torch.bfloat16)
    for gather_max_batch in (0, 2):  # transposed, then gather
        y = cpu.forward(x, values, indices, bias, gather_max_batch=gather_max_batch)
        assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------
# Against the float32 reference, every route
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 8, 64, 300])
@pytest.mark.parametrize("k", [1, 15, 17, 37, 131])  # odd fan-ins: every SIMD tail of both gather routes
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_forward_matches_fp32_reference(route, batch, k, index_dtype):
    values, indices, bias = _layer(45, 301, k, index_dtype=index_dtype, seed=k)
    x = torch.randn(batch, 301).bfloat16()
    expected = _reference(x, values, indices, bias)
    _assert_bf16_close(fanin_matmul(x, values, indices, bias), expected)
    _assert_bf16_close(fanin_matmul(x, values, indices, None), _reference(x, values, indices, None))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "gather_max_batch, max_width, chunk_rows",
    [(1_000, 0, 0), (0, 0, 0), (0, 16, 1), (0, 16, 7), (0, 32, 64), (0, 128, 0), (0, 48, 5)],
)
@pytest.mark.parametrize("batch", [1, 4, 17, 100])
def test_every_cpp_layout_and_tile(route, threads, gather_max_batch, max_width, chunk_rows, batch):
    # The knobs force each layout (gather at any batch, transposed at batch 1), each tile width
    # (narrow 4/8-float tiles, 1..8 full vectors) and input chunking.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, indices, bias = _layer(37, 150, 41, seed=batch)
        x = torch.randn(batch, 150).bfloat16()
        knobs = dict(gather_max_batch=gather_max_batch, max_width=max_width, chunk_rows=chunk_rows)
        _assert_bf16_close(cpu.forward(x, values, indices, bias, **knobs), _reference(x, values, indices, bias))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [1, 2, 3, 40])
def test_rows_matches_fp32_reference(route, batch):
    # forward_rows: gather route for batch <= 2 (scattered in place), tiled plus scatter above.
    values, indices, _ = _layer(20, 64, 9)
    bias = torch.randn(32).bfloat16()
    rows = torch.randperm(32)[:20]  # 12 ablated neurons
    x = torch.randn(batch, 64).bfloat16()
    y = fanin_matmul_rows(x, values, indices, rows, 32, bias)
    expected = bias.float().expand(batch, 32).clone()
    expected[:, rows] = _reference(x, values, indices, bias[rows])
    _assert_bf16_close(y, expected)


def test_both_routes_agree_to_one_ulp():
    if cpu.bf16_route(portable=False) != "avx512_bf16":
        pytest.skip("this CPU (or build) has no AVX-512-BF16")
    values, indices, bias = _layer(768, 3072, 307)  # the benchmark's 90 % layer
    x = torch.randn(2, 3072).bfloat16()
    fast = fanin_matmul(x, values, indices, bias)
    cpu.bf16_route(portable=True)
    portable = fanin_matmul(x, values, indices, bias)
    ulp = torch.finfo(torch.bfloat16).eps * portable.float().abs().clamp_min(1e-3)
    assert bool(((fast.float() - portable.float()).abs() <= ulp).all())
    assert (fast == portable).float().mean().item() >= 0.99


# ---------------------------------------------------------------------------------------------
# Dispatch: bf16 goes to the C++ kernel, forward and backward
# ---------------------------------------------------------------------------------------------


def _refuse_torch_backend(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pure-torch backend ran")

    monkeypatch.setattr(reference, "forward", refuse)
    monkeypatch.setattr(reference, "backward", refuse)


def test_bf16_goes_to_cpp(monkeypatch):
    assert kernels.backend_name("cpu", torch.bfloat16) == "cpp"
    assert inference.cpu_inference_ops(torch.bfloat16) is not None
    _refuse_torch_backend(monkeypatch)
    values, indices, bias = _layer(12, 40, 5)
    for batch in (1, 2, 30):
        x = torch.randn(batch, 40).bfloat16()
        _assert_bf16_close(fanin_matmul(x, values, indices, bias), _reference(x, values, indices, bias))
    # No window layout for bf16: it is a float32 packing (the module falls back to the operators).
    assert inference.window_layout(values, indices, 40) is None


@pytest.mark.parametrize("batch", [1, 2, 33])  # gather and tiled backward (on float32 copies)
def test_backward_runs_on_cpp_in_float32_and_returns_bf16(monkeypatch, batch):
    _refuse_torch_backend(monkeypatch)
    values, indices, bias = _layer(24, 90, 13)
    x = torch.randn(batch, 90).bfloat16()
    leaves = [t.clone().requires_grad_(True) for t in (x, values, bias)]
    y = fanin_matmul(leaves[0], leaves[1], indices, leaves[2])
    grad_y = torch.randn(batch, 24).bfloat16()
    y.backward(grad_y)
    # The float32 gradients of the same bf16 operands, rounded once.
    x32, v32, b32 = (t.float().requires_grad_(True) for t in (x, values, bias))
    (x32 @ reference.fanin_to_dense(v32, indices, 90).T + b32).backward(grad_y.float())
    for leaf, expected in zip(leaves, (x32.grad, v32.grad, b32.grad)):
        _assert_bf16_close(leaf.grad, expected)


def test_operator_backward_refuses_bf16():
    values, indices, _ = _layer(4, 8, 2)
    x = torch.randn(3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="float32 copies"):
        cpu._ops().backward(torch.ones(3, 4).bfloat16(), x, values, indices, True, True, False, 1, 0, 0)


def test_condensed_linear_bf16_inference_matches_fp32():
    dense = torch.nn.Linear(256, 48)
    mask = torch.rand(48, 256).argsort(dim=1) < 26  # 26 inputs per neuron
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = CondensedLinear.from_dense(dense, mask)
    layer_bf16 = CondensedLinear.from_dense(dense, mask).to(torch.bfloat16)
    for batch in (1, 64):
        x = torch.randn(batch, 256).bfloat16()
        with torch.no_grad():
            y = layer_bf16(x)
            # The float32 layer on the same bf16-rounded weights and inputs.
            expected = torch.nn.functional.linear(
                x.float(), layer_bf16.dense_weight().float(), layer_bf16.bias.float()
            )
        _assert_bf16_close(y, expected)
        assert layer(x.float()).dtype is torch.float32
