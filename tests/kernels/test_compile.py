"""torch.compile(fullgraph=True) traces srigl.kernels and condensed models, and matches eager."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import srigl.kernels as kernels
from srigl.condensed import CondensedLinear
from srigl.kernels import BackendUnavailableError, dispatch, fanin_matmul

pytestmark = pytest.mark.filterwarnings(
    # inductor imports torch.utils.mkldnn, whose classes torch itself marks deprecated
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)

# Inductor (torch.compile's default backend) generates and compiles C++ on the CPU.
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("c++", "g++", "clang++")), reason="no C++ compiler for inductor"
)


def _cpp_or_skip() -> None:
    if not kernels.cpu_extension_available():
        pytest.skip(f"C++ kernel unavailable: {kernels.cpu.load_error()}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graphs, guards or recompile counts carried between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _condensed(in_features, out_features, fan_in, *, bias, index_dtype, ablated=(), seed=0):
    """A CondensedLinear condensed from a random constant fan-in mask; rows in ``ablated`` are all False."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    scores = torch.rand(out_features, in_features, generator=generator)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask.scatter_(1, scores.topk(fan_in, dim=1).indices, True)  # fan_in per row
    mask[list(ablated)] = False
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * mask)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    layer = CondensedLinear.from_dense(linear, mask)
    layer.indices = layer.indices.to(index_dtype)  # from_dense picks int16 for these widths
    return layer


def _model() -> nn.Sequential:
    """Every route at once: int16 and int32 indices, with and without bias, full and ablated rows."""
    model = nn.Sequential(
        _condensed(24, 16, 5, bias=True, index_dtype=torch.int16, seed=1),  # fanin_matmul
        nn.ReLU(),
        _condensed(16, 12, 4, bias=False, index_dtype=torch.int32, ablated=(3, 7), seed=2),  # rows, no bias
        nn.ReLU(),
        _condensed(12, 10, 3, bias=True, index_dtype=torch.int32, ablated=(0,), seed=3),  # rows with bias
        nn.Tanh(),
        _condensed(10, 6, 4, bias=False, index_dtype=torch.int16, seed=4),  # fanin_matmul, no bias
    )
    assert [layer.n_active for layer in model[::2]] == [16, 10, 9, 6]
    return model


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_model_covers_both_index_dtypes_and_bias_choices():
    layers = list(_model()[::2])
    assert {layer.indices.dtype for layer in layers} == {torch.int16, torch.int32}
    assert {layer.bias is None for layer in layers} == {True, False}


@needs_compiler
@pytest.mark.parametrize("batch", [1, 37, 256], ids=["gather-route", "tiled-route", "dense-route"])
def test_compiled_inference_matches_eager(batch):
    model = _model().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(batch, 24)
    with torch.no_grad():
        expected = model(x)
        _close(compiled(x), expected)
        _close(compiled(x), expected)  # the second call reuses the graph


@needs_compiler
@pytest.mark.parametrize("batch", [1, 37], ids=["gather-route", "tiled-route"])
def test_compiled_training_steps_match_eager(batch):
    eager = _model()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, model)]
    for step in range(2):  # the second step runs the same graphs on updated parameters
        x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(step))
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        for optimizer in optimizers:
            optimizer.zero_grad()
        eager(x_eager).square().sum().backward()
        compiled(x_compiled).square().sum().backward()
        _close(x_compiled.grad, x_eager.grad)
        for (name, ours), theirs in zip(model.named_parameters(), eager.parameters()):
            assert ours.grad is not None, name
            _close(ours.grad, theirs.grad)
        for optimizer in optimizers:
            optimizer.step()
    for ours, theirs in zip(model.parameters(), eager.parameters()):
        _close(ours, theirs)


def test_compiled_large_batches_put_the_dense_route_in_the_graph():
    """The last layer (density 0.4) runs 256 rows on the dense route: densify + a GEMM, traced."""
    _cpp_or_skip()
    with torch.no_grad():
        explanation = torch._dynamo.explain(_model().eval())(torch.randn(256, 24))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "srigl_fanin.densify" in explanation.graphs[0].print_readable(print_output=False)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)], ids=["2d", "3d"])
def test_dynamo_reports_no_graph_breaks(grad, shape):
    model = _model()
    x = torch.randn(shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    if kernels.backend_name("cpu") == "cpp":  # the C++ operators sit in the graph, opaque
        # print_readable includes the autograd.Function's forward and backward subgraphs.
        assert "srigl_fanin" in explanation.graphs[0].print_readable(print_output=False)


@pytest.fixture
def fallback_backend(monkeypatch):
    """SRIGL_DISABLE_EXTENSION=1 for the test, and the backend cache emptied before and after."""
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.reset_backend_cache()
    yield
    monkeypatch.delenv(kernels.DISABLE_ENV)
    kernels.reset_backend_cache()


@needs_compiler
@pytest.mark.usefixtures("fallback_backend")
def test_fallback_backend_compiles_and_matches_eager():
    assert kernels.backend_name("cpu") == "torch"
    model = _model()
    explanation = torch._dynamo.explain(model)(torch.randn(5, 24))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "srigl_fanin" not in explanation.graphs[0].code  # pure aten ops, for inductor to fuse
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(7, 24)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(x_eager)
    actual = compiled(x_compiled)
    _close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    _close(x_compiled.grad, x_eager.grad)
    for ours, theirs in zip(compiled.parameters(), model.parameters()):
        _close(ours.grad, theirs.grad)


def test_reset_backend_cache_retraces_compiled_graphs(monkeypatch):
    """The backend a graph was traced with is guarded: a changed choice compiles a new graph."""
    _cpp_or_skip()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    x = torch.randn(4, 24)
    with torch.no_grad():
        expected = compiled(x)
        compiled(x)
        assert len(graphs) == 1  # no recompilation on the second call
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        kernels.reset_backend_cache()
        try:
            _close(compiled(x), expected)
        finally:
            monkeypatch.delenv(kernels.DISABLE_ENV)
            kernels.reset_backend_cache()
    assert len(graphs) == 2
    assert "srigl_fanin" not in graphs[1]


@pytest.mark.parametrize("backend", [None, "cpp", "torch"])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int64])
def test_fanin_matmul_compiles_for_each_backend(backend, index_dtype):
    if backend == "cpp":
        _cpp_or_skip()
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 3, generator=generator, requires_grad=True)
    indices = torch.randint(0, 11, (6, 3), generator=generator).to(index_dtype)
    bias = torch.randn(6, generator=generator, requires_grad=True)
    x = torch.randn(2, 4, 11, generator=generator, requires_grad=True)  # leading dims are flattened
    compiled = torch.compile(
        lambda x, values, bias: fanin_matmul(x, values, indices, bias, backend=backend),
        fullgraph=True, backend="aot_eager",
    )
    results = []
    for function in (compiled, lambda x, values, bias: fanin_matmul(x, values, indices, bias, backend=backend)):
        y = function(x, values, bias)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, values.grad, bias.grad))
        x.grad = values.grad = bias.grad = None
    for ours, theirs in zip(*results):
        _close(ours, theirs)


def test_unavailable_backend_fails_when_traced():
    x, values = torch.randn(2, 5), torch.randn(3, 2)
    indices = torch.zeros(3, 2, dtype=torch.int16)
    compiled = torch.compile(lambda x: fanin_matmul(x, values, indices, backend="triton"), fullgraph=True,
                             backend="eager")
    # Dynamo wraps errors raised while tracing; the message keeps the original one.
    with pytest.raises((BackendUnavailableError, torch._dynamo.exc.TorchDynamoException),
                       match="BackendUnavailableError: backend 'triton' runs CUDA"):
        compiled(x)


def test_trace_time_marker_is_the_one_torch_sets():
    """srigl marks _prepare_backend by hand (the public decorator imports torch._dynamo)."""

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked)  # the decorator marks by attribute...
    for name, value in vars(marked).items():  # ...and srigl's function carries the same ones
        assert getattr(dispatch._prepare_backend, name, None) == value, name


def test_compiles_in_a_fresh_process_before_any_eager_call(tmp_path):
    """The C++ build then happens while dynamo traces, outside the graph, and forces no recompile."""
    _cpp_or_skip()
    script = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        from srigl.condensed import CondensedLinear
        from srigl.kernels import cpu

        linear = nn.Linear(8, 6)
        mask = torch.zeros(6, 8, dtype=torch.bool)
        mask[:, :3] = True
        mask[2] = False  # an ablated row: fanin_matmul_rows
        with torch.no_grad():
            linear.weight.mul_(mask)
        layer = CondensedLinear.from_dense(linear, mask)
        assert not cpu._state, "built before compiling"
        graphs = []

        def recording_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
        x = torch.randn(3, 8)
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(compiled(x), layer(x))
        assert len(graphs) == 1, f"{len(graphs)} graphs"
        assert "srigl_fanin" in graphs[0].code
        """
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    environment.pop(kernels.DISABLE_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fake_operators_give_the_kernels_output_shapes():
    """The fake implementations agree with the real operators, and reject what the kernels reject."""
    _cpp_or_skip()
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.srigl_fanin
    x, values, grad_y = torch.randn(3, 7), torch.randn(5, 2), torch.randn(3, 5)
    indices, bias, rows = torch.zeros(5, 2, dtype=torch.int16), torch.randn(9), torch.tensor([0, 2, 4, 6, 8])
    calls = {
        "forward": lambda *t: ops.forward(t[0], t[1], t[2], None, 2, 0, 0),
        "forward_rows": lambda *t: ops.forward_rows(t[0], t[1], t[2], t[3], t[4], 9, 2, 0, 0),
        "backward": lambda *t: ops.backward(t[5], t[0], t[1], t[2], True, False, True, 2, 0, 0),
        "densify": lambda *t: ops.densify(t[1], t[2], 7),
    }
    for name, call in calls.items():
        real = call(x, values, indices, bias, rows, grad_y)
        with FakeTensorMode() as mode:
            fake = call(*(mode.from_tensor(t) for t in (x, values, indices, bias, rows, grad_y)))
        for ours, theirs in zip(fake if isinstance(fake, tuple) else [fake],
                                real if isinstance(real, tuple) else [real]):
            assert (ours is None) == (theirs is None), name
            if theirs is not None:
                assert (ours.shape, ours.stride(), ours.dtype) == (theirs.shape, theirs.stride(), theirs.dtype), name
    row = x[0]  # (in,): the kernel wants (batch, in)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="must be 2-D"):
        ops.forward(mode.from_tensor(row), mode.from_tensor(values), mode.from_tensor(indices), None, 2, 0, 0)
