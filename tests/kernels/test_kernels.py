"""Tests for srigl.kernels: the constant fan-in product on every backend this machine has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srigl.kernels as kernels
from srigl.kernels import cpu, dispatch, inference, reference
from srigl.kernels import (
    BackendUnavailableError,
    FanInOperandError,
    IndexOutOfRangeError,
    check_indices,
    fanin_matmul,
    fanin_to_dense,
    index_dtype_for,
)

INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _cpp_or_skip() -> None:
    if not kernels.cpu_extension_available():
        pytest.skip(f"C++ kernel unavailable: {cpu.load_error()}")


@pytest.fixture(params=["cpp", "torch"])
def backend(request) -> str:
    if request.param == "cpp":
        _cpp_or_skip()
    return request.param


def _random_layer(out_features, in_features, k, *, dtype=torch.float32, index_dtype=torch.int16, seed=0,
                  unique=True):
    """(values, indices) with k entries per row; unique=False draws with replacement (duplicates)."""
    generator = torch.Generator().manual_seed(seed)
    if unique:
        scores = torch.rand(out_features, in_features, generator=generator)
        indices = scores.topk(k, dim=1).indices  # (out, k), distinct per row, unsorted
    else:
        indices = torch.randint(0, in_features, (out_features, k), generator=generator)
    values = torch.randn(out_features, k, generator=generator, dtype=torch.float64).to(dtype)
    return values, indices.to(index_dtype)


def _dense_reference(x, values, indices, bias):
    """x @ W.T + b in float64 with W built by scatter_add (duplicates summed)."""
    weight = fanin_to_dense(values.double(), indices, x.shape[-1])  # (out, in)
    y = x.double() @ weight.T
    return y if bias is None else y + bias.double()


# ---------------------------------------------------------------------------------------------
# Golden cases
# ---------------------------------------------------------------------------------------------


def test_golden_forward_and_backward(backend):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]], requires_grad=True)
    values = torch.tensor([[1.0, -1.0], [2.0, 0.5]], requires_grad=True)
    indices = torch.tensor([[0, 3], [1, 2]], dtype=torch.int16)
    bias = torch.tensor([0.5, -1.0], requires_grad=True)

    y = fanin_matmul(x, values, indices, bias, backend=backend)
    # y[0,0] = 1*1 - 1*4 + .5; y[0,1] = 2*2 + .5*3 - 1; y[1,0] = -1*-1 + .5; y[1,1] = 2*1 - 1
    assert torch.equal(y, torch.tensor([[-2.5, 4.5], [1.5, 1.0]]))

    y.sum().backward()
    # grad_values[o, j] = sum_b x[b, indices[o, j]]: columns 0, 3, 1, 2 summed over both rows.
    assert torch.equal(values.grad, torch.tensor([[1.0, 3.0], [3.0, 3.0]]))
    # grad_x[b, i] = sum of the values reading input i: 1, 2, 0.5, -1 in every row.
    assert torch.equal(x.grad, torch.tensor([[1.0, 2.0, 0.5, -1.0], [1.0, 2.0, 0.5, -1.0]]))
    assert torch.equal(bias.grad, torch.tensor([2.0, 2.0]))


def test_duplicate_indices_are_summed(backend):
    # Decision: duplicates are allowed; the row reads input 1 twice, so y = 2*5 + 3*5.
    x = torch.tensor([[0.0, 5.0]], requires_grad=True)
    values = torch.tensor([[2.0, 3.0]], requires_grad=True)
    indices = torch.tensor([[1, 1]], dtype=torch.int32)
    check_indices(indices, 2)  # validation accepts them

    y = fanin_matmul(x, values, indices, backend=backend)
    assert torch.equal(y, torch.tensor([[25.0]]))
    y.sum().backward()
    assert torch.equal(values.grad, torch.tensor([[5.0, 5.0]]))  # each entry gets x[1]
    assert torch.equal(x.grad, torch.tensor([[0.0, 5.0]]))  # both entries scatter into x[1]


def test_duplicates_match_scatter_add_dense_at_scale(backend):
    values, indices = _random_layer(40, 30, 25, unique=False, seed=3)
    x = torch.randn(70, 30)
    torch.testing.assert_close(
        fanin_matmul(x, values, indices, backend=backend).double(),
        _dense_reference(x, values, indices, None),
        rtol=1e-4,
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------------
# Property tests against the dense reference
# ---------------------------------------------------------------------------------------------


@st.composite
def layer_cases(draw):
    in_features = draw(st.integers(1, 300))
    k = draw(st.integers(1, in_features))
    out_features = draw(st.integers(1, 64))
    batch = draw(st.sampled_from([0, 1, 2, 3, 5, 17, 64, 129, 300]))
    leading = draw(st.sampled_from(["flat", "seq"]))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return in_features, k, out_features, batch, leading, index_dtype, has_bias, seed


def _check_case(case, backend):
    in_features, k, out_features, batch, leading, index_dtype, has_bias, seed = case
    values, indices = _random_layer(out_features, in_features, k, index_dtype=index_dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batch, in_features) if leading == "flat" else (3, batch, in_features)  # (B, T, in)
    x = torch.randn(shape, generator=generator)
    bias = torch.randn(out_features, generator=generator) if has_bias else None
    y = fanin_matmul(x, values, indices, bias, backend=backend)
    assert y.shape == (*shape[:-1], out_features)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _dense_reference(x, values, indices, bias), rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_cases())
def test_forward_matches_dense_cpp(case):
    _cpp_or_skip()
    _check_case(case, "cpp")


@settings(max_examples=40, deadline=None)
@given(case=layer_cases())
def test_forward_matches_dense_torch_fallback(case):
    _check_case(case, "torch")


@settings(max_examples=40, deadline=None)
@given(case=layer_cases())
def test_backward_matches_dense_grads_cpp(case):
    _cpp_or_skip()
    in_features, k, out_features, batch, leading, index_dtype, has_bias, seed = case
    values, indices = _random_layer(out_features, in_features, k, index_dtype=index_dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, in_features, generator=generator, requires_grad=True)
    bias = torch.randn(out_features, generator=generator, requires_grad=True) if has_bias else None
    values.requires_grad_(True)
    grad_y = torch.randn(batch, out_features, generator=generator)

    fanin_matmul(x, values, indices, bias, backend="cpp").backward(grad_y)

    weight = fanin_to_dense(values.detach().double(), indices, in_features)  # (out, in)
    torch.testing.assert_close(x.grad.double(), grad_y.double() @ weight, rtol=1e-4, atol=1e-4)
    dense_grad = grad_y.double().T @ x.detach().double()  # (out, in)
    torch.testing.assert_close(values.grad.double(), dense_grad.gather(1, indices.long()), rtol=1e-4, atol=1e-4)
    if has_bias:
        torch.testing.assert_close(bias.grad, grad_y.sum(0))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 40, 300])
def test_tiled_backward_overwrites_recycled_memory(batch, threads):
    # The tiled backward returns gradients in uninitialised memory that it must overwrite
    # entirely. Freed NaN-filled blocks of the same sizes make recycled garbage likely (glibc
    # reuses them once its mmap threshold has grown), so a missed element shows up as NaN.
    _cpp_or_skip()
    values, indices = _random_layer(37, 70, 9, seed=batch)
    values.requires_grad_(True)
    x = torch.randn(batch, 70, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    grad_y = torch.randn(batch, 37)
    weight = fanin_to_dense(values.detach().double(), indices, 70)  # (out, in)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1: tile-parallel into grad_x itself; 2: per-chunk scratch too
    try:
        for _ in range(4):
            poison = [torch.full((batch, 70), float("nan")), torch.full((37, 9), float("nan")), torch.full((37,), float("nan"))]
            del poison
            x.grad = values.grad = bias.grad = None
            fanin_matmul(x, values, indices, bias, backend="cpp").backward(grad_y)
            # The kernel sums the bias gradient itself (per tile and per thread chunk).
            torch.testing.assert_close(bias.grad.double(), grad_y.double().sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.grad.double(), grad_y.double() @ weight, rtol=1e-4, atol=1e-4)
            expected_values = (grad_y.double().T @ x.detach().double()).gather(1, indices.long())
            torch.testing.assert_close(values.grad.double(), expected_values, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_gradcheck_fp64(backend, batch):
    values, indices = _random_layer(5, 9, 4, dtype=torch.float64, index_dtype=torch.int32, seed=batch, unique=False)
    x = torch.randn(batch, 9, dtype=torch.float64, requires_grad=True)
    values.requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: fanin_matmul(x, v, indices, b, backend=backend), (x, values, bias))


def test_only_requested_gradients_are_computed(backend):
    values, indices = _random_layer(6, 12, 5)
    x = torch.randn(20, 12, requires_grad=True)
    fanin_matmul(x, values, indices, backend=backend).sum().backward()
    assert x.grad is not None and values.grad is None
    x2 = torch.randn(20, 12)
    values.requires_grad_(True)
    fanin_matmul(x2, values, indices, backend=backend).sum().backward()
    assert values.grad is not None


def test_fp64_forward_exact_enough(backend):
    values, indices = _random_layer(30, 200, 50, dtype=torch.float64, index_dtype=torch.int64)
    x = torch.randn(33, 200, dtype=torch.float64)
    torch.testing.assert_close(fanin_matmul(x, values, indices, backend=backend),
                               _dense_reference(x, values, indices, None), rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs(backend):
    values, indices = _random_layer(8, 16, 6)
    x = torch.randn(16, 10).T  # (10, 16), transposed view
    values_view = torch.stack([values, -values], dim=-1)[..., 0]  # (out, k) with stride 2 == values
    assert not values_view.is_contiguous()
    y = fanin_matmul(x, values_view, indices, backend=backend)
    torch.testing.assert_close(y.double(), _dense_reference(x, values, indices, None), rtol=1e-4, atol=1e-4)


def test_zero_batch_backward(backend):
    values, indices = _random_layer(4, 8, 3)
    values.requires_grad_(True)
    x = torch.randn(0, 8, requires_grad=True)
    y = fanin_matmul(x, values, indices, backend=backend)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(values.grad, torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------
# The C++ kernel's internal paths, forced through its tuning knobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "gather_max_batch, max_width, chunk_rows",
    [(1_000, 0, 0), (0, 0, 0), (0, 16, 1), (0, 16, 7), (0, 32, 64), (0, 128, 0), (0, 48, 5)],
)
@pytest.mark.parametrize("batch", [1, 4, 17, 100, 260])
def test_cpp_paths(threads, gather_max_batch, max_width, chunk_rows, batch):
    _cpp_or_skip()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.float64):
            values, indices = _random_layer(37, 150, 40, dtype=dtype, index_dtype=torch.int16, seed=batch,
                                            unique=False)
            x = torch.randn(batch, 150, dtype=dtype)
            bias = torch.randn(37, dtype=dtype)
            grad_y = torch.randn(batch, 37, dtype=dtype)
            knobs = dict(gather_max_batch=gather_max_batch, max_width=max_width, chunk_rows=chunk_rows)
            y = cpu.forward(x, values, indices, bias, **knobs)
            grad_x, grad_values = cpu.backward(grad_y, x, values, indices, True, True, **knobs)
            only_values = cpu.backward(grad_y, x, values, indices, False, True, **knobs)
            only_x = cpu.backward(grad_y, x, values, indices, True, False, **knobs)

            weight = fanin_to_dense(values.double(), indices, 150)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(y.double(), x.double() @ weight.T + bias.double(), **tol)
            expected_x = grad_y.double() @ weight
            expected_values = (grad_y.double().T @ x.double()).gather(1, indices.long())
            torch.testing.assert_close(grad_x.double(), expected_x, **tol)
            torch.testing.assert_close(grad_values.double(), expected_values, **tol)
            assert only_values[0] is None and torch.equal(only_values[1], grad_values)
            assert only_x[1] is None and torch.equal(only_x[0], grad_x)
    finally:
        torch.set_num_threads(previous)


def test_cpp_matches_fallback_bitwise_close_on_training_shape():
    _cpp_or_skip()
    values, indices = _random_layer(96, 384, 38, index_dtype=torch.int16)
    values.requires_grad_(True)
    x = torch.randn(64, 384, requires_grad=True)
    results = {}
    for name in ("cpp", "torch"):
        x.grad = values.grad = None
        y = fanin_matmul(x, values, indices, backend=name)
        y.square().sum().backward()
        results[name] = (y.detach(), x.grad.clone(), values.grad.clone())
    for ours, theirs in zip(results["cpp"], results["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_extension_builds_where_a_compiler_exists():
    # With a compiler present a failed build is a bug in csrc/, not an environment limit.
    if os.environ.get(kernels.DISABLE_ENV) == "1":
        pytest.skip("extension disabled by environment")
    assert cpu.available(), cpu.load_error()


def test_reference_routes_agree(monkeypatch):
    values, indices = _random_layer(12, 40, 9, unique=False)
    x = torch.randn(7, 40)
    grad_y = torch.randn(7, 12)
    outputs = {}
    for dense in (False, True):
        monkeypatch.setattr(reference, "prefers_dense", lambda *args, dense=dense: dense)
        outputs[dense] = (reference.forward(x, values, indices, None),
                          *reference.backward(grad_y, x, values, indices, True, True))
    for gathered, dense in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-5)


def test_reference_gather_chunks_the_batch(monkeypatch):
    monkeypatch.setattr(reference, "_GATHER_CHUNK_ELEMENTS", 10)  # 1 row per chunk
    monkeypatch.setattr(reference, "prefers_dense", lambda *args: False)
    values, indices = _random_layer(5, 20, 4)
    x = torch.randn(9, 20)
    grad_y = torch.randn(9, 5)
    torch.testing.assert_close(reference.forward(x, values, indices, None).double(),
                               _dense_reference(x, values, indices, None), rtol=1e-5, atol=1e-5)
    grad_x, grad_values = reference.backward(grad_y, x, values, indices, True, True)
    weight = fanin_to_dense(values, indices, 20)
    torch.testing.assert_close(grad_x, grad_y @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_values, (grad_y.T @ x).gather(1, indices.long()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Validation, dtype helper, backend selection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_features, expected",
    [(1, torch.int16), (32768, torch.int16), (32769, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)],
)
def test_index_dtype_for(in_features, expected):
    assert index_dtype_for(in_features) == expected


def test_index_dtype_for_rejects_negative():
    with pytest.raises(FanInOperandError, match="-1"):
        index_dtype_for(-1)


def test_check_indices_reports_first_offender():
    indices = torch.tensor([[0, 1], [2, 7]])
    with pytest.raises(IndexOutOfRangeError, match=r"\[0, 5\).*max 7.*indices\[1, 1\] = 7"):
        check_indices(indices, 5)
    with pytest.raises(IndexOutOfRangeError, match=r"min -3"):
        check_indices(torch.tensor([[-3, 1]]), 5)
    with pytest.raises(FanInOperandError, match="float32"):
        check_indices(torch.zeros(2, 2), 5)
    with pytest.raises(FanInOperandError, match=r"\(3,\)"):
        check_indices(torch.zeros(3, dtype=torch.int32), 5)
    check_indices(torch.tensor([[4, 4]], dtype=torch.int16), 5)


def test_fanin_matmul_validates_and_revalidates_after_inplace_change(backend):
    values, indices = _random_layer(3, 6, 2, index_dtype=torch.int32)
    x = torch.randn(2, 6)
    fanin_matmul(x, values, indices, backend=backend)  # validated and cached
    indices[1, 0] = 6  # in-place: bumps the version counter
    with pytest.raises(IndexOutOfRangeError, match=r"\[0, 6\)"):
        fanin_matmul(x, values, indices, backend=backend)
    indices[1, 0] = 5
    fanin_matmul(x, values, indices, backend=backend)
    with pytest.raises(IndexOutOfRangeError, match=r"\[0, 5\)"):  # same tensor, narrower input
        fanin_matmul(torch.randn(2, 5), values, indices, backend=backend)


# Red-team r08: after one validated call, indices written where no version counter sees it. Run in a
# child process, so that an out-of-bounds read (a segfault) fails this test instead of ending pytest.
_STALE_INDEX_SCRIPT = """
import sys, torch
from srigl.condensed import CondensedLinear
from srigl.kernels import IndexOutOfRangeError
how, batch, grad = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "grad"
torch.manual_seed(0)
lin = torch.nn.Linear(64, 16)
mask = torch.zeros(16, 64, dtype=torch.bool)
mask[:, :4] = True
mask[3] = False  # one ablated row: the forward_rows route
with torch.no_grad():
    lin.weight.mul_(mask)
layer = CondensedLinear.from_dense(lin, mask)
layer.window_inference = False  # the window copy is validated when packed and never reads the indices
x = torch.randn(batch, 64, requires_grad=grad)
with torch.set_grad_enabled(grad):
    layer(x)  # validates the indices once
    if how == "numpy":
        layer.indices.numpy()[:] = 32767
    else:
        layer.indices.data.fill_(-32768 if how == "negative" else 32767)  # in_features is 64
    try:
        y = layer(x)
        if grad:
            y.sum().backward()
    except IndexOutOfRangeError as error:
        print("refused:", error)
        sys.exit(0)
print("not refused")
sys.exit(3)
"""


@pytest.mark.parametrize(
    "how, batch, grad",
    [(how, batch, "no_grad") for how in ("data", "numpy", "negative") for batch in (1, 200)]
    + [("data", 1, "grad"), ("data", 200, "grad")],
)
def test_indices_written_behind_the_validation_cache_are_refused_not_read(tmp_path, how, batch, grad):
    script = tmp_path / "stale.py"
    script.write_text(_STALE_INDEX_SCRIPT)
    done = subprocess.run([sys.executable, str(script), how, str(batch), grad], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (139 = segfault): {done.stdout}{done.stderr[-2000:]}"
    assert "refused: " in done.stdout and "[0, 64)" in done.stdout


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda x, v, i, b: (x, v, i[:, :1], b), r"must both be \(out_features, k\)"),
        (lambda x, v, i, b: (x.double(), v, i, b), "share one floating dtype"),
        (lambda x, v, i, b: (x, v, i.float(), b), "int16, int32 or int64"),
        (lambda x, v, i, b: (x, v, i, b[:2]), r"bias must be \(3,\)"),
        (lambda x, v, i, b: (x.long(), v.long(), i, b), "floating dtype"),
    ],
)
def test_operand_errors(mutate, pattern):
    values, indices = _random_layer(3, 6, 2)
    args = mutate(torch.randn(2, 6), values, indices, torch.randn(3))
    with pytest.raises(FanInOperandError, match=pattern):
        fanin_matmul(*args)


def test_backend_errors():
    values, indices = _random_layer(3, 6, 2)
    x = torch.randn(2, 6)
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        fanin_matmul(x, values, indices, backend="mkl")
    with pytest.raises(BackendUnavailableError, match="triton"):
        fanin_matmul(x, values, indices, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float16"):
        fanin_matmul(x.half(), values.half(), indices, backend="cpp")


def test_env_var_forces_fallback(monkeypatch):
    values, indices = _random_layer(3, 6, 2)
    x = torch.randn(2, 6)
    fanin_matmul(x, values, indices)  # fills the backend cache with the automatic choice
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.backend_name("cpu") == "torch"
    assert not kernels.cpu_extension_available()
    kernels.reset_backend_cache()  # fanin_matmul reads the variable once per device and dtype
    try:
        assert dispatch._resolve_backend(None, x) == "torch"
        torch.testing.assert_close(fanin_matmul(x, values, indices).double(),
                                   _dense_reference(x, values, indices, None), rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.reset_backend_cache()
    expected = "cpp" if kernels.cpu_extension_available() else "torch"
    assert dispatch._resolve_backend(None, x) == expected


def test_backend_selection_by_dtype():
    assert kernels.backend_name("cpu", torch.float16) == "torch"
    expected = "cpp" if kernels.cpu_extension_available() else "torch"
    assert kernels.backend_name("cpu", torch.float32) == expected
    assert kernels.backend_name("cpu", torch.bfloat16) == expected  # bf16 routes: tests/kernels/test_bf16.py
    # float16 on CPU runs (on the fallback) rather than failing.
    values, indices = _random_layer(3, 6, 2, dtype=torch.float16)
    y = fanin_matmul(torch.randn(2, 6, dtype=torch.float16), values, indices)
    assert y.dtype == torch.float16


def test_importing_srigl_kernels_does_not_import_triton():
    code = "import sys, srigl.kernels; assert 'triton' not in sys.modules, 'triton imported'; " \
           "assert 'srigl.kernels.triton_kernels' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------


def test_triton_kernels_under_interpreter(tmp_path):
    """Runs the Triton kernels on CPU with TRITON_INTERPRET=1 (needs triton, not a GPU)."""
    pytest.importorskip("triton", reason="triton not installed")
    script = tmp_path / "check.py"
    script.write_text(
        "import torch\n"
        "from srigl.kernels import triton_kernels as tk, reference\n"
        "torch.manual_seed(0)\n"
        "for batch, n_in, n_out, k in [(1, 17, 3, 2), (37, 50, 19, 7), (64, 129, 33, 40)]:\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        x = torch.randn(batch, n_in, dtype=dtype)\n"
        "        idx = torch.randint(0, n_in, (n_out, k)).short()\n"
        "        v = torch.randn(n_out, k, dtype=dtype)\n"
        "        b = torch.randn(n_out, dtype=dtype)\n"
        "        w = reference.fanin_to_dense(v, idx, n_in)\n"
        "        gy = torch.randn(batch, n_out, dtype=dtype)\n"
        "        gx, gv = tk.backward(gy, x, v, idx, True, True)\n"
        "        torch.testing.assert_close(tk.forward(x, v, idx, b), x @ w.T + b, rtol=1e-4, atol=1e-4)\n"
        "        torch.testing.assert_close(gx, gy @ w, rtol=1e-4, atol=1e-4)\n"
        "        torch.testing.assert_close(gv, (gy.T @ x).gather(1, idx.long()), rtol=1e-4, atol=1e-4)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300)


def test_triton_kernels_never_touch_memory_outside_x_whatever_the_indices(tmp_path):
    """Indices changed behind the validation cache (``.data``, numpy): out-of-range entries add 0 and
    receive no gradient, instead of reading or writing outside x (the interpreter would fault)."""
    pytest.importorskip("triton", reason="triton not installed")
    script = tmp_path / "oob.py"
    script.write_text(
        "import torch\n"
        "from srigl.kernels import triton_kernels as tk, reference\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(5, 16)\n"
        "v = torch.randn(4, 3)\n"
        "idx = torch.tensor([[0, 1, 2], [3, 30000, 5], [-7, 8, 9], [10, 11, 12]], dtype=torch.int16)\n"
        "ok = (idx >= 0) & (idx < 16)\n"
        "w = reference.fanin_to_dense(v * ok, idx.clamp(0, 15), 16)  # out-of-range entries: weight 0\n"
        "torch.testing.assert_close(tk.forward(x, v, idx, None), x @ w.T)\n"
        "gy = torch.randn(5, 4)\n"
        "gx, gv = tk.backward(gy, x, v, idx, True, True)\n"
        "torch.testing.assert_close(gx, gy @ w)\n"
        "assert torch.equal(gv[~ok], torch.zeros(int((~ok).sum())))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(script)], env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def _cuda_triton_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton", reason="triton not installed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_triton_matches_dense_on_gpu(dtype, batch):
    _cuda_triton_or_skip()
    assert kernels.backend_name("cuda", dtype) == "triton"
    values, indices = _random_layer(96, 300, 30, dtype=dtype, unique=False)
    values = values.cuda().requires_grad_(True)
    indices = indices.cuda()
    x = torch.randn(batch, 300, dtype=dtype, device="cuda", requires_grad=True)
    bias = torch.randn(96, dtype=dtype, device="cuda", requires_grad=True)
    grad_y = torch.randn(batch, 96, dtype=dtype, device="cuda")
    fanin_matmul(x, values, indices, bias).backward(grad_y)

    weight = fanin_to_dense(values.detach().double(), indices, 300)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    y = fanin_matmul(x, values, indices, bias)
    torch.testing.assert_close(y.double(), x.double() @ weight.T + bias.double(), **tol)
    torch.testing.assert_close(x.grad.double(), grad_y.double() @ weight, **tol)
    expected = (grad_y.double().T @ x.detach().double()).gather(1, indices.long())
    torch.testing.assert_close(values.grad.double(), expected, **tol)


@pytest.mark.gpu
def test_triton_gradcheck_fp64_on_gpu():
    _cuda_triton_or_skip()
    values, indices = _random_layer(5, 9, 4, dtype=torch.float64, unique=False)
    values = values.cuda().requires_grad_(True)
    x = torch.randn(6, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: fanin_matmul(x, v, indices.cuda(), b, backend="triton"), (x, values, bias)
    )


# ---------------------------------------------------------------------------------------------
# fanin_matmul_rows: layers whose ablated neurons were dropped from values/indices
# ---------------------------------------------------------------------------------------------


def test_rows_golden(backend):
    # Output width 4; active rows land in columns 3 and 1; columns 0 and 2 are ablated neurons.
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    indices = torch.tensor([[0, 3], [1, 2]], dtype=torch.int16)
    rows = torch.tensor([3, 1])
    bias = torch.tensor([10.0, 20.0, 30.0, 40.0])
    with torch.no_grad():
        y = kernels.fanin_matmul_rows(x, values, indices, rows, 4, bias, backend=backend)
        # column 3: 1*1 - 1*4 + 40; column 1: 2*2 + .5*3 + 20; columns 0, 2: their bias.
        assert torch.equal(y, torch.tensor([[10.0, 25.5, 30.0, 37.0]]))
        y0 = kernels.fanin_matmul_rows(x, values, indices, rows, 4, None, backend=backend)
        assert torch.equal(y0, torch.tensor([[0.0, 5.5, 0.0, -3.0]]))


@pytest.mark.parametrize("batch", [1, 2, 3, 40])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_rows_equals_full_layer(backend, batch, with_bias, index_dtype):
    # Batches 1-2 take the kernel's gather route, 3 and 40 the tiled one; rows are unsorted.
    out_full, n_active, in_features, k = 23, 17, 50, 6
    values, indices = _random_layer(n_active, in_features, k, index_dtype=index_dtype, seed=batch)
    rows = torch.randperm(out_full, generator=torch.Generator().manual_seed(1))[:n_active]
    bias = torch.randn(out_full) if with_bias else None
    x = torch.randn(batch, in_features)
    full_values = torch.zeros(out_full, k).index_copy_(0, rows, values)  # ablated rows: zero weights
    full_indices = torch.zeros(out_full, k, dtype=index_dtype).index_copy_(0, rows, indices)
    expected = _dense_reference(x, full_values, full_indices, bias)
    with torch.no_grad():
        y = kernels.fanin_matmul_rows(x, values, indices, rows, out_full, bias, backend=backend)
    assert y.shape == (batch, out_full)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    ablated = torch.ones(out_full, dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.equal(y[:, ablated], (bias[ablated] if with_bias else torch.zeros(int(ablated.sum()))).expand(batch, -1))
    # The same product with autograd on (the generic route) gives the same numbers.
    y_grad = kernels.fanin_matmul_rows(x.requires_grad_(), values, indices, rows, out_full, bias, backend=backend)
    torch.testing.assert_close(y_grad.detach(), y, rtol=1e-6, atol=1e-6)


def test_rows_leading_dims_and_gradients(backend):
    values, indices = _random_layer(5, 12, 3)
    rows = torch.tensor([6, 0, 2, 3, 5])
    bias = torch.randn(7, requires_grad=True)
    x = torch.randn(2, 3, 12, requires_grad=True)
    values.requires_grad_()
    y = kernels.fanin_matmul_rows(x, values, indices, rows, 7, bias, backend=backend)
    assert y.shape == (2, 3, 7)
    y.square().sum().backward()
    # Gradients of the equivalent full-size layer (ablated rows carry no weights).
    x2 = x.detach().clone().requires_grad_()
    values2 = values.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    full = torch.zeros(7, 3).index_copy(0, rows, values2)
    full_idx = torch.zeros(7, 3, dtype=indices.dtype).index_copy_(0, rows, indices)
    y2 = fanin_matmul(x2, full, full_idx, bias2, backend=backend)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(values.grad, values2.grad)
    torch.testing.assert_close(bias.grad, bias2.grad)


def test_rows_all_ablated(backend):
    values, indices = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int16)
    rows = torch.zeros(0, dtype=torch.int64)
    bias = torch.tensor([1.0, 2.0])
    with torch.no_grad():
        y = kernels.fanin_matmul_rows(torch.randn(3, 8), values, indices, rows, 2, bias, backend=backend)
    assert torch.equal(y, bias.expand(3, 2))


@pytest.mark.parametrize("grad", [False, True])
def test_rows_bad_input(backend, grad):
    values, indices = _random_layer(2, 6, 2)
    x = torch.randn(1, 6, requires_grad=grad)
    cases = [
        (dict(rows=torch.tensor([0, 5]), out_features=4), r"rows.*\[0, 4\)"),
        (dict(rows=torch.tensor([0, -1]), out_features=4), r"rows.*\[0, 4\)"),
        (dict(rows=torch.tensor([0, 1], dtype=torch.int32), out_features=4), r"rows must be int64 of shape \(2,\)"),
        (dict(rows=torch.tensor([0]), out_features=4), r"rows must be int64 of shape \(2,\)"),
        (dict(rows=torch.tensor([0, 1]), out_features=1), r"out_features \(1\) is smaller than the 2 active rows"),
        (dict(rows=torch.tensor([0, 1]), out_features=4, bias=torch.zeros(2)), r"bias must be \(4,\)"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(FanInOperandError, match=pattern):
            kernels.fanin_matmul_rows(x, values, indices, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# The window layout (AVX-512 builds): srigl.inference.window_layout + cpu.window_ops()
# ---------------------------------------------------------------------------------------------


def _window_ops_or_skip():
    _cpp_or_skip()
    ops = cpu.window_ops()
    if ops is None:
        pytest.skip("the C++ kernel was not built for AVX-512 here: no window layout")
    return ops


def _window_header(packed: torch.Tensor) -> dict[str, int]:
    fields = ("magic", "in_features", "rows", "panels", "steps", "panel_start", "offsets", "masks", "lanes", "values")
    return dict(zip(fields, packed[: 8 * len(fields)].view(torch.int64).tolist()))


def test_window_layout_golden_schedule():
    # 40 inputs, 3 rows of 2 nonzeros. Greedy: step 0 takes the window [0, 32) (smallest next
    # index 0): rows 0 and 1 take inputs 0 and 1; step 1, window [0, 32) again (next smallest 2):
    # only row 1 (input 2); step 2, smallest next 33 -> 32, clamped to 40 - 32 = 8 so both loads
    # stay inside x: rows 0 (35) and 2 (33); step 3, window [8, 40): row 2 (39).
    pack, forward = _window_ops_or_skip()
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    indices = torch.tensor([[35, 0], [2, 1], [39, 33]], dtype=torch.int16)  # rows need not be sorted
    packed = pack(values, indices, 40)
    h = _window_header(packed)
    assert (h["in_features"], h["rows"], h["panels"], h["steps"]) == (40, 3, 1, 4)
    assert packed[h["offsets"] : h["offsets"] + 16].view(torch.int32).tolist() == [0, 0, 8, 8]
    assert packed[h["masks"] : h["masks"] + 8].view(torch.int16).tolist() == [0b011, 0b010, 0b101, 0b100]
    # Local indices of the 4 steps, byte t of each lane's 32-bit word: lane 0 takes 0 then 35 - 8.
    lanes = packed[h["lanes"] : h["lanes"] + 64].view(16, 4)  # (lane, step)
    assert lanes[:3].tolist() == [[0, 0, 27, 0], [1, 2, 0, 0], [0, 0, 25, 31]]
    step_values = packed[h["values"] :].view(torch.float32).view(4, 16)[:, :3]  # (step, lane)
    assert step_values.tolist() == [[2.0, 4.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 6.0], [0.0, 0.0, 5.0]]
    x = torch.arange(40.0).unsqueeze(0)  # x[i] = i
    y = forward(x, packed, torch.tensor([0.5, 0.0, -1.0]), None, 3)
    # row 0: 1*35 + 2*0 + .5; row 1: 3*2 + 4*1; row 2: 5*39 + 6*33 - 1
    assert y.tolist() == [[35.5, 10.0, 392.0]]


@st.composite
def window_cases(draw):
    in_features = draw(st.integers(32, 200))
    k = draw(st.integers(0, min(in_features, 60)))
    rows = draw(st.integers(0, 40))
    out_full = rows + draw(st.integers(0, 5))  # > rows: the layer has ablated neurons
    batch = draw(st.sampled_from([1, 2, 3, 5, 8, 9, 17]))
    index_dtype = draw(st.sampled_from([torch.int16, torch.int32]))
    unique = draw(st.booleans())
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return in_features, k, rows, out_full, batch, index_dtype, unique, has_bias, seed


@settings(max_examples=60, deadline=None)
@given(case=window_cases())
def test_window_layout_matches_dense(case):
    pack, forward = _window_ops_or_skip()
    in_features, k, rows, out_full, batch, index_dtype, unique, has_bias, seed = case
    generator = torch.Generator().manual_seed(seed)
    if unique:
        values, indices = _random_layer(rows, in_features, k, index_dtype=index_dtype, seed=seed)
    else:  # duplicates add up, as everywhere
        indices = torch.randint(0, in_features, (rows, k), generator=generator).to(index_dtype)
        values = torch.randn(rows, k, generator=generator)
    columns = torch.randperm(out_full, generator=generator)[:rows]  # where each row lands
    bias = torch.randn(out_full, generator=generator) if has_bias else None
    x = torch.randn(batch, in_features, generator=generator)
    packed = pack(values, indices, in_features)
    full_values = torch.zeros(out_full, k).index_copy_(0, columns, values)  # ablated rows: no weights
    full_indices = torch.zeros(out_full, k, dtype=index_dtype).index_copy_(0, columns, indices)
    expected = _dense_reference(x, full_values, full_indices, bias)
    y = forward(x, packed, bias, columns, out_full)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    if out_full == rows:  # no rows argument: row r is column r
        expected = _dense_reference(x, values, indices, None if bias is None else bias)
        torch.testing.assert_close(forward(x, packed, bias, None, rows).double(), expected, rtol=1e-5, atol=1e-5)


def test_window_layout_padding_never_reads_nonfinite_inputs():
    # Padding lanes multiply a zero value by some x in their window: with an inf or NaN there
    # that would be NaN, so such inputs take the masked route. Inputs no row reads stay harmless;
    # a NaN that a row does read reaches that row only.
    pack, forward = _window_ops_or_skip()
    values, indices = _random_layer(37, 95, 5, seed=3)
    indices += 1  # no row reads input 0, the window start of the first step, where padding lanes point
    packed = pack(values, indices, 96)
    assert _window_header(packed)["steps"] * 16 > values.numel()  # there is padding
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = torch.randn(4, 96)
        x[1, 0] = bad
        expected = fanin_matmul(x, values, indices, None, backend="torch")
        y = forward(x, packed, None, None, 37)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 96)
    x[0, int(indices[5, 0])] = float("nan")
    y = forward(x, packed, None, None, 37)
    readers = (indices.long() == int(indices[5, 0])).any(1)  # rows that read that input
    assert torch.equal(y[0].isnan(), readers) and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_window_layout_is_deterministic_across_threads(threads):
    # Panels are independent (each output is one lane's sum in step order): bitwise equal results.
    pack, forward = _window_ops_or_skip()
    values, indices = _random_layer(100, 300, 30, seed=4)
    packed = pack(values, indices, 300)
    x = torch.randn(11, 300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward(x, packed, None, None, 100)
        torch.set_num_threads(threads)
        assert torch.equal(forward(x, packed, None, None, 100), one)
    finally:
        torch.set_num_threads(previous)


def test_window_layout_bad_input():
    pack, forward = _window_ops_or_skip()
    values, indices = _random_layer(5, 64, 4)
    packed = pack(values, indices, 64)
    x = torch.randn(2, 64)
    cases = [
        (lambda: pack(values, indices, 16), r"needs in_features >= 32, got 16"),
        (lambda: pack(values.double(), indices, 64), r"float32 values"),
        (lambda: pack(values, indices.clone().fill_(64), 64), r"index 64 is outside \[0, 64\)"),
        (lambda: forward(torch.randn(2, 63), packed, None, None, 5), r"x has 63 features, the packed layer 64"),
        (lambda: forward(x, packed[:-4], None, None, 5), r"not a buffer from pack_windows"),
        (lambda: forward(x, packed.clone().fill_(0), None, None, 5), r"not a buffer from pack_windows"),
        (lambda: forward(x, packed, None, None, 6), r"out_full \(6\) must equal the packed rows \(5\)"),
        (lambda: forward(x, packed, None, torch.tensor([0, 1, 2, 3, 9]), 6), r"rows\[4\] = 9 is outside \[0, 6\)"),
        (lambda: forward(x, packed, torch.zeros(4), None, 5), r"bias must be a contiguous \(5,\) tensor of x's dtype"),
        (lambda: forward(x.double(), packed, None, None, 5), r"contiguous float32"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()


def test_window_layout_availability_and_batch_bound():
    _window_ops_or_skip()
    values, indices = _random_layer(50, 512, 50, seed=5)  # ~10 % dense: modest padding
    layout = inference.window_layout(values, indices, 512)
    assert layout is not None
    packed, max_batch = layout
    steps = _window_header(packed)["steps"]
    assert inference.window_steps(packed) == steps
    padding = 16 * steps / values.numel()
    assert 1.0 < padding < 4.0
    # The batch bound is the first row of the table that the padding fits under.
    assert max_batch == next(b for bound, b in inference._WINDOW_BATCH_BY_PADDING if padding <= bound)
    # A layer so sparse that most of each step is padding is not kept (no gain worth its memory).
    sparse_values, sparse_indices = _random_layer(50, 512, 2, seed=6)  # ~15 steps per 16 nonzeros
    assert inference.window_layout(sparse_values, sparse_indices, 512) is None
    assert inference.window_layout(values.double(), indices, 512) is None  # float32 only
    assert inference.window_layout(values, indices.long(), 512) is None  # int16/int32 indices only
    assert inference.window_layout(values[:, :0], indices[:, :0], 512) is None  # nothing to pack
    small_values, small_indices = _random_layer(4, 20, 3)
    assert inference.window_layout(small_values, small_indices, 20) is None  # narrower than a window


def test_window_layout_respects_disabled_extension(monkeypatch):
    _window_ops_or_skip()
    values, indices = _random_layer(32, 64, 32)  # dense enough for the layout to be kept
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.reset_backend_cache()
    try:
        assert inference.window_layout(values, indices, 64) is None
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.reset_backend_cache()
    assert inference.window_layout(values, indices, 64) is not None
