"""ONNX export of condensed models runs in onnxruntime with the outputs of the masked dense model,
in both layouts (srigl.condensed.exported)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from srigl.condensed import CondensedConv2d, CondensedLinear, CondensedMultiheadAttention, condense
from srigl.condensed.exported import EXPORT_LAYOUTS
from srigl.io.export import export_onnx
from sparse_models import _AttentionBlock, _mask_attention, sparsify

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


def _run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _assert_onnx_matches(model, condensed, input_shape, path, layout="matmul"):
    export_onnx(condensed, torch.randn(input_shape), path, layout=layout)
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, *input_shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(_run_onnx(path, x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_condensed_mlp_exports_with_ablated_output_rows(tmp_path, layout):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 5)))
    condensed = condense(model)
    assert condensed[4].n_active < 5  # the output layer keeps ablated rows: exercises the scatter
    condensed.train()
    _assert_onnx_matches(model, condensed, (2, 20), tmp_path / "mlp.onnx", layout)
    assert condensed.training  # exported in eval mode, then put back


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_condensed_cnn_exports_grouped_depthwise_and_padding_modes(tmp_path, layout):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(
        nn.Conv2d(4, 6, 3, padding="same", groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 3),
    ))
    condensed = condense(model)
    assert [type(m) for m in condensed if type(m) in (CondensedConv2d, CondensedLinear)] == [CondensedConv2d] * 3 + [CondensedLinear]
    _assert_onnx_matches(model, condensed, (2, 4, 8, 8), tmp_path / "cnn.onnx", layout)


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_condensed_attention_block_exports(tmp_path, layout):
    torch.manual_seed(0)
    model = _AttentionBlock(dim=16, heads=4).eval()
    masks = _mask_attention(model, torch.Generator().manual_seed(6))
    condensed = condense(model, masks)
    assert type(condensed.attn) is CondensedMultiheadAttention and condensed.attn.in_proj.n_active < 48
    _assert_onnx_matches(model, condensed, (2, 5, 16), tmp_path / "attn.onnx", layout)


@pytest.mark.parametrize("bad", [-5, 20], ids=["negative", "too-large"])
def test_out_of_range_indices_are_refused_before_export(tmp_path, bad):
    """Red-team L4: eager refuses a negative index, but onnxruntime's Gather wraps -5 to in_features - 5."""
    from srigl.kernels import IndexOutOfRangeError

    torch.manual_seed(0)
    condensed = condense(sparsify(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))))
    with torch.no_grad():
        condensed[0].indices[1, 0] = bad
    with pytest.raises(IndexOutOfRangeError, match=rf"^0: indices must lie in \[0, 20\).*indices\[1, 0\] = {bad}"):
        export_onnx(condensed, torch.randn(2, 20), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_a_batch_one_example_exports_a_condensed_resnet_with_a_dynamic_batch(tmp_path, layout):
    # A batch-1 example used to fail in torch.export ("Invalid ranges [2:1]") for this network.
    from srigl.app.models import create_model

    torch.manual_seed(0)
    model = sparsify(create_model("resnet18", in_channels=3, image_size=16, num_classes=4, width=0.125)).eval()
    condensed = condense(model)
    _assert_onnx_matches(model, condensed, (1, 3, 16, 16), tmp_path / "resnet1.onnx", layout)  # runs batches 1 and 5


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 16), nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x, y):
        return self.head(torch.relu(self.a(x) + self.b(y)))


def test_a_model_with_two_inputs_exports_and_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = sparsify(_TwoInputs()).eval()
    condensed = condense(model)
    assert isinstance(condensed.a, CondensedLinear) and isinstance(condensed.b, CondensedLinear)
    path = export_onnx(condensed, (torch.randn(1, 12), torch.randn(1, 6)), tmp_path / "two.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    for batch in (1, 4):
        x, y = torch.randn(batch, 12), torch.randn(batch, 6)
        got = torch.from_numpy(session.run(None, {"input_0": x.numpy(), "input_1": y.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x, y), rtol=1e-5, atol=1e-5)


def _ops(graph) -> set[str]:
    return {node.op_type for node in graph.node}


def test_the_matmul_layout_stores_condensed_weights_that_onnxruntime_folds_into_matmuls(tmp_path):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))).eval()
    condensed = condense(model)
    first, last = condensed[0], condensed[2]
    assert last.n_active < 10  # ablated rows: the product runs over the active ones only
    path = export_onnx(condensed, torch.randn(2, 64), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert "ScatterElements" in _ops(graph) and "ReduceSum" not in _ops(graph)
    # The file holds the condensed weights, no dense-sized tensor: the largest initializer is the
    # first layer's values or indices (n_active x k), not a dense (n_active x 64) weight.
    largest = max(math.prod(t.dims) for t in graph.initializer)
    assert largest == first.values.numel() < first.n_active * 64 * 0.5

    # onnxruntime folds the scatter into ordinary initializers when it loads the model, so what runs
    # is MatMul / Gemm over dense (n_active, in) weights (the ScatterND left places the active columns).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "folded.onnx")).graph
    assert "ScatterElements" not in _ops(folded) and {"MatMul", "Gemm"} & _ops(folded)
    shapes = {tuple(sorted(t.dims)) for t in folded.initializer}  # either orientation (Gemm may transpose)
    assert {tuple(sorted((64, first.n_active))), tuple(sorted((last.in_features, last.n_active)))} <= shapes
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model(x),
                                   rtol=1e-5, atol=1e-5)


def test_the_gather_layout_never_expands_the_weights(tmp_path):
    torch.manual_seed(0)
    condensed = condense(sparsify(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))))
    graph = onnx.load(str(export_onnx(condensed, torch.randn(2, 64), tmp_path / "g.onnx", layout="gather"))).graph
    assert {"Gather", "ReduceSum"} <= _ops(graph) and "ScatterElements" not in _ops(graph)


@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_duplicate_indices_in_a_row_add_up_in_both_layouts(tmp_path, layout):
    """A row may repeat an index (srigl.kernels: the products add up); the scatter must add, not overwrite."""
    layer = CondensedLinear(6, 3, fan_in=3, n_active=2, bias=True).eval()
    with torch.no_grad():
        layer.values.copy_(torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]]))
        layer.indices.copy_(torch.tensor([[0, 0, 5], [2, 3, 2]]))
        layer.active_rows.copy_(torch.tensor([0, 2]))
        layer.bias.copy_(torch.tensor([0.25, -7.0, 1.0]))
    x = torch.arange(12.0).reshape(2, 6)
    # Row 0: (1 + 2) * x0 + 4 * x5; row 1 (ablated): its bias; row 2: (0.5 + 3) * x2 - x3.
    expected = torch.tensor([[0 * 3 + 4 * 5 + 0.25, -7.0, 3.5 * 2 - 3 + 1.0],
                             [6 * 3 + 4 * 11 + 0.25, -7.0, 3.5 * 8 - 9 + 1.0]])
    path = export_onnx(layer, x, tmp_path / "dup.onnx", layout=layout)
    torch.testing.assert_close(_run_onnx(path, x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


def test_an_unknown_layout_is_refused_before_anything_is_written(tmp_path):
    condensed = condense(sparsify(nn.Sequential(nn.Linear(8, 4))))
    with pytest.raises(ValueError, match="layout must be one of 'matmul', 'gather', got 'dense'"):
        export_onnx(condensed, torch.randn(2, 8), tmp_path / "x.onnx", layout="dense")
    assert not (tmp_path / "x.onnx").exists()
