"""Condensed layers and condense(): golden tensors, every registered condenser, whole models."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import srigl
from srigl.condensed import (
    CondensedMultiheadAttention,
    CONDENSERS,
    CondensedConv2d,
    CondensedLinear,
    MaskError,
    condense,
    condense_tensor,
)
from srigl.errors import NotConstantFanInError

from sparse_models import SmallCNN, _AttentionBlock, _mask_attention, assert_same_outputs, constant_fan_in_mask, sparsify

# --------------------------------------------------------------------------- condense_tensor, golden


def test_condense_tensor_golden_3x4():
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    # Row 2 keeps an active weight that is exactly 0 (a regrown weight): the mask, not the value, counts.
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, True, False]])
    condensed = condense_tensor(weight, mask)
    assert condensed.fan_in == 2
    assert condensed.active_rows.tolist() == [0, 2]
    assert condensed.indices.tolist() == [[1, 3], [0, 2]]
    assert condensed.values.tolist() == [[1.5, -2.0], [3.0, 0.0]]
    assert condensed.indices.dtype == torch.int16
    assert (condensed.out_features, condensed.in_features_flat) == (3, 4)
    torch.testing.assert_close(condensed.to_dense(), weight)


def test_condense_tensor_conv_flattens_fan_in():
    weight = torch.zeros(2, 2, 2, 2)  # (out, in, kh, kw): fan-in 8
    weight[0, 1, 0, 1] = 5.0  # flat position 1*4 + 0*2 + 1 = 5
    weight[1, 0, 1, 0] = 7.0  # flat position 2
    condensed = condense_tensor(weight, weight != 0)
    assert condensed.indices.tolist() == [[5], [2]]
    assert condensed.values.tolist() == [[5.0], [7.0]]
    assert condensed.in_features_flat == 8


def test_condense_tensor_all_ablated():
    condensed = condense_tensor(torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bool))
    assert condensed.fan_in == 0 and condensed.active_rows.numel() == 0
    assert condensed.values.shape == (0, 0)


def test_not_constant_fan_in_names_layer_and_counts():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    with pytest.raises(NotConstantFanInError) as caught:
        condense_tensor(mask.float(), mask, name="fc1.weight")
    message = str(caught.value)
    assert "fc1.weight" in message
    assert "2 row(s) with 1" in message and "2 row(s) with 2" in message and "1 ablated" in message
    assert caught.value.counts == {1: 2, 2: 2}


@pytest.mark.parametrize(
    "weight, mask, match",
    [
        (torch.ones(2, 3), torch.ones(2, 3), "bool"),
        (torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool), "shape"),
        (torch.ones(2, 3), torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool), "2 weights are nonzero"),
    ],
)
def test_mask_errors(weight, mask, match):
    with pytest.raises(MaskError, match=match):
        condense_tensor(weight, mask)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 12),
    fan_in=st.integers(1, 40),
    density=st.floats(0.01, 1.0),
    ablated=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_condense_tensor_properties(out, fan_in, density, ablated, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = constant_fan_in_mask((out, fan_in), density, ablated, generator)
    weight = torch.randn(out, fan_in, generator=generator) * mask
    condensed = condense_tensor(weight, mask)
    torch.testing.assert_close(condensed.to_dense(), weight)
    assert condensed.active_rows.tolist() == mask.any(dim=1).nonzero().squeeze(1).tolist()
    assert bool((condensed.indices[:, 1:] > condensed.indices[:, :-1]).all())  # sorted, no duplicates
    assert condensed.values.shape == (condensed.active_rows.numel(), condensed.fan_in)


# --------------------------------------------------------------------------- every registered condenser

# Per dense type: (name, module factory, input shape). Each case is sparsified with ablated rows.
CASES = {
    nn.Linear: [
        ("bias-ablated", lambda: nn.Linear(9, 7), (5, 9)),
        ("no-bias", lambda: nn.Linear(13, 6, bias=False), (3, 13)),
        ("one-output", lambda: nn.Linear(5, 1), (4, 5)),
        ("3d-input", lambda: nn.Linear(11, 8), (2, 3, 11)),
        ("1d-input", lambda: nn.Linear(6, 4), (6,)),
    ],
    nn.Conv2d: [
        ("3x3-stride2-pad1", lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 11, 10)),
        ("no-bias-1x1", lambda: nn.Conv2d(5, 4, 1, bias=False), (2, 5, 6, 7)),
        ("rect-kernel-dilation", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (1, 4, 9, 8)),
        ("grouped", lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), (2, 6, 7, 7)),
        ("depthwise-same", lambda: nn.Conv2d(5, 5, 3, padding="same", groups=5), (2, 5, 8, 6)),
        ("even-kernel-same", lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=2), (1, 3, 9, 9)),
        ("reflect", lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="reflect"), (2, 3, 8, 8)),
        ("circular-valid", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 5, 5)),
        ("unbatched", lambda: nn.Conv2d(3, 4, 3), (3, 6, 6)),
    ],
}


def test_every_condenser_has_cases():
    assert set(CASES) == set(CONDENSERS)


@pytest.mark.parametrize(
    "dense_type, factory, input_shape",
    [pytest.param(t, f, s, id=f"{t.__name__}-{name}") for t, cases in CASES.items() for name, f, s in cases],
)
@pytest.mark.parametrize("density", [0.15, 0.5])
def test_condenser_matches_masked_dense_layer(dense_type, factory, input_shape, density):
    torch.manual_seed(0)
    dense = sparsify(factory(), density=density, ablated=0.3)
    n_ablated = int((~dense.weight_mask.flatten(1).any(1)).sum())
    assert n_ablated == round(0.3 * dense.weight.shape[0])  # ablated rows present (but for a 1-row layer)
    condensed = CONDENSERS[dense_type].from_dense(dense)
    x = torch.randn(input_shape)
    assert_same_outputs(dense, condensed, x)
    round_trip = condensed.to_dense()
    assert type(round_trip) is dense_type
    torch.testing.assert_close(round_trip.weight, dense.weight)
    assert_same_outputs(dense, round_trip, x)
    # Gradients flow to exactly the active weights, as in the masked dense layer.
    condensed(x).square().sum().backward()
    dense(x).square().sum().backward()
    values_grad = condensed.values.grad
    dense_grad = condense_tensor(dense.weight.grad * dense.weight_mask, dense.weight_mask).values
    torch.testing.assert_close(values_grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_ablated_neurons_output_their_bias():
    linear = nn.Linear(4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        linear.weight.mul_(mask)
        linear.bias.copy_(torch.tensor([0.5, -2.0, 1.0]))
    condensed = CondensedLinear.from_dense(linear, mask)
    y = condensed(torch.randn(6, 4))
    assert y.shape == (6, 3)
    assert bool((y[:, 1] == -2.0).all())


@pytest.mark.parametrize("bias", [True, False])
def test_layer_with_every_neuron_ablated(bias):
    linear = nn.Linear(5, 3, bias=bias)
    with torch.no_grad():
        linear.weight.zero_()
    condensed = CondensedLinear.from_dense(linear, torch.zeros(3, 5, dtype=torch.bool))
    assert condensed.n_active == 0
    assert_same_outputs(linear, condensed, torch.randn(4, 5))


def test_from_dense_mask_defaults_to_buffer_then_nonzero():
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]]))
    with pytest.raises(NotConstantFanInError):
        CondensedLinear.from_dense(linear)  # weight != 0: fan-ins 2 and 1
    linear.register_buffer("weight_mask", torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool))
    assert CondensedLinear.from_dense(linear).indices.tolist() == [[0, 3], [1, 2]]


def test_large_fan_in_uses_int32_indices():
    linear = nn.Linear(40_000, 2, bias=False)
    mask = torch.zeros(2, 40_000, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        linear.weight.mul_(mask)
    condensed = CondensedLinear.from_dense(linear, mask)
    assert condensed.indices.dtype == torch.int32 and condensed.indices.tolist() == [[39_999], [39_999]]


# --------------------------------------------------------------------------- whole models


def test_condense_returns_the_model_and_the_report_only_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=10)
    model.eval()
    x = torch.randn(8, 20)
    with torch.no_grad():
        expected, actual = model(x), srigl.condense(model)(x)  # the model itself, not a tuple
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(srigl.condense(model), nn.Module)

    pair = srigl.condense(model, return_report=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    condensed, report = pair
    assert isinstance(condensed, nn.Module) and isinstance(report, dict)
    assert set(report["layers"]) == {"0", "2"}
    assert [type(m) for m in condensed] == [CondensedLinear, nn.ReLU, CondensedLinear]
    assert_same_outputs(model, condensed, x)


def test_condense_sequential_mlp_removes_ablated_neurons():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 5)))
    x = torch.randn(8, 20)
    condensed, report = condense(model, return_report=True)
    assert_same_outputs(model, condensed.eval(), x)
    assert [type(m) for m in condensed] == [CondensedLinear, nn.ReLU, nn.Dropout, CondensedLinear, nn.GELU, CondensedLinear]
    first, second, last = report["layers"]["0"], report["layers"]["3"], report["layers"]["5"]
    assert first["removed_neurons"] == 32 - first["shape_after"][0] > 0
    assert second["shape_after"][1] == first["shape_after"][0]  # the next layer lost the matching inputs
    assert any(r["folded_into_bias"] for r in report["removals"])  # GELU(b) and ReLU(b) are not all 0
    assert last["ablated_neurons"] > 0 and last["ablated_kept_because"] == "it is a model output"
    assert report["params_after"] < report["params_before"] / 2
    assert report["params_after"] == sum(p.numel() for p in condensed.parameters())
    assert report["mask_source"] == "buffers"



def test_condense_cnn_removes_across_conv_bn_flatten():
    torch.manual_seed(0)
    model = sparsify(SmallCNN(), ablated=0.3)
    x = torch.randn(2, 3, 17, 17)
    # BatchNorms kept (not folded), to see them sliced with the channels removed.
    condensed, report = condense(model, fold_batchnorm=False, return_report=True)
    assert_same_outputs(model, condensed, x)
    folded, folded_report = condense(model, return_report=True)  # the default folds them instead
    assert_same_outputs(model, folded, x)
    assert {e["batchnorm"] for e in folded_report["folded_batchnorms"]} and isinstance(folded.features[1], torch.nn.Identity)
    assert folded_report["removals"] == report["removals"]
    removals = {(r["producer"], r["consumer"]) for r in report["removals"]}
    assert ("features.0", "features.3") in removals and ("features.3", "features.6") in removals
    # adaptive_avg_pool2d as a function is not a known channel-wise step: features.6 keeps its ablated filters.
    assert report["layers"]["features.6"]["removed_neurons"] == 0
    assert condensed.features[1].num_features == condensed.features[0].out_channels < 8
    assert report["params_after"] < report["params_before"] / 2


def test_zero_padded_consumer_keeps_ablated_channels_with_nonzero_constant():
    conv1, conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv1, nn.ReLU(), conv2)
    mask1 = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    mask1[1] = False  # filter 1 ablated: outputs relu(bias[1]) everywhere, but conv2 pads with 0
    mask1[2] = False  # filter 2 ablated with relu(bias) == 0: safe to remove
    with torch.no_grad():
        conv1.weight.mul_(mask1)
        conv1.bias.copy_(torch.tensor([0.1, 2.0, -1.0]))
    conv1.register_buffer("weight_mask", mask1, persistent=False)
    x = torch.randn(1, 2, 5, 5)
    condensed, report = condense(model, return_report=True)
    assert_same_outputs(model, condensed, x)
    assert report["layers"]["0"]["removed_neurons"] == 1
    assert report["layers"]["0"]["ablated_neurons"] == 1
    assert "zero-padded" in report["layers"]["0"]["ablated_kept_because"]


def test_custom_module_with_functional_relu():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc = nn.Linear(12, 30), nn.Linear(30, 20), nn.Linear(20, 3)

        def forward(self, x):
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.fc(torch.relu(self.fc2(x)))

    model = sparsify(MLP(), skip=("fc",))
    x = torch.randn(5, 3, 4)
    condensed, report = condense(model, return_report=True)
    assert_same_outputs(model, condensed, x)
    assert report["layers"]["fc1"]["removed_neurons"] > 0 and report["layers"]["fc2"]["removed_neurons"] > 0
    assert report["layers"]["fc"]["kind"] == "dense" and "no mask" in report["layers"]["fc"]["reason"]
    assert condensed.fc.in_features == condensed.fc2.out_features < 20


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_condense_converts_attention_projections(batch_first, batch):
    torch.manual_seed(0)
    model = _AttentionBlock(dim=16, heads=4, batch_first=batch_first).eval()
    generator = torch.Generator().manual_seed(2)
    masks = _mask_attention(model, generator)
    x = torch.randn(batch, 5, 16) if batch_first else torch.randn(5, batch, 16)
    condensed, report = condense(model, masks, return_report=True)
    assert_same_outputs(model, condensed, x)
    assert type(condensed.attn) is CondensedMultiheadAttention
    assert type(condensed.attn.in_proj) is CondensedLinear and type(condensed.attn.out_proj) is CondensedLinear
    entry = report["layers"]["attn.in_proj"]
    ablated = round(0.25 * 48)
    assert entry["kind"] == "CondensedLinear" and entry["fan_in"] == 8 and entry["ablated_neurons"] == ablated
    assert entry["active_neurons"] == 48 - ablated and "keep their width" in entry["ablated_kept_because"]
    assert report["layers"]["attn"]["kind"] == "CondensedMultiheadAttention"
    # Weights: 48 x 16 + 16 x 16 dense; condensed keeps (36 x 8) + (12 x 8) values (+ indices, rows).
    assert report["layers"]["attn"]["params_after"] < report["layers"]["attn"]["params_before"]
    assert condensed.attn.in_proj.values.shape == (48 - ablated, 8)


def test_condense_attention_with_one_masked_projection_keeps_the_other_dense():
    torch.manual_seed(0)
    model = _AttentionBlock().eval()
    generator = torch.Generator().manual_seed(3)
    masks = _mask_attention(model, generator)
    masks["attn.out_proj.weight"] = torch.rand(8, 8, generator=generator) < 0.4  # not constant fan-in
    with torch.no_grad():
        model.attn.out_proj.weight.mul_(masks["attn.out_proj.weight"])
    condensed, report = condense(model, masks, return_report=True)
    assert_same_outputs(model, condensed, torch.randn(3, 4, 8))
    assert type(condensed.attn.in_proj) is CondensedLinear
    assert type(condensed.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert "not constant fan-in" in report["layers"]["attn.out_proj"]["reason"]


def test_condense_leaves_attention_inside_transformer_layers_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)).eval()
    generator = torch.Generator().manual_seed(4)
    masks = _mask_attention(model, generator)
    condensed, report = condense(model, masks, return_report=True)
    assert_same_outputs(model, condensed, torch.randn(2, 5, 8))
    assert type(condensed[0].self_attn) is nn.MultiheadAttention
    assert "TransformerEncoderLayer" in report["layers"]["0.self_attn"]["reason"]


def test_condense_leaves_dense_what_cannot_be_condensed():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return x + self.mlp(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Block().eval()
    generator = torch.Generator().manual_seed(1)
    masks = {
        "attn.in_proj_weight": torch.rand(24, 8, generator=generator) < 0.5,  # unstructured
        "mlp.0.weight": constant_fan_in_mask((16, 8), 0.5, 0.2, generator),
        "mlp.2.weight": torch.rand(8, 16, generator=generator) < 0.3,  # unstructured: not constant fan-in
    }
    with torch.no_grad():
        model.attn.in_proj_weight.mul_(masks["attn.in_proj_weight"])
        model.mlp[0].weight.mul_(masks["mlp.0.weight"])
        model.mlp[2].weight.mul_(masks["mlp.2.weight"])
    x = torch.randn(2, 5, 8)
    condensed, report = condense(model, masks, return_report=True)
    assert_same_outputs(model, condensed, x)
    assert report["mask_source"] == "masks"
    assert "in_proj_weight" in report["layers"]["attn"]["reason"] and "not constant fan-in" in report["layers"]["attn"]["reason"]
    assert type(condensed.attn) is nn.MultiheadAttention
    assert report["layers"]["mlp.2"]["kind"] == "dense" and "not constant fan-in" in report["layers"]["mlp.2"]["reason"]
    assert type(condensed.mlp[0]) is CondensedLinear and type(condensed.mlp[2]) is nn.Linear
    assert report["layers"]["mlp.0"]["removed_neurons"] > 0  # removal works into a dense consumer too


def test_condense_without_masks_reads_nonzero_weights_and_notes_it():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)))
    for module in model:
        module._buffers.pop("weight_mask", None)
    condensed, report = condense(model, return_report=True)
    assert report["mask_source"] == "weight != 0" and "weight != 0" in report["notes"][0]
    assert_same_outputs(model, condensed, torch.randn(3, 10))


def test_condense_copies_unless_inplace_and_can_keep_ablated():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)))
    before = [p.clone() for p in model.parameters()]
    condensed, report = condense(model, remove_ablated=False, return_report=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert report["removals"] == [] and report["layers"]["0"]["shape_after"] == [8, 10]
    assert_same_outputs(model, condensed, torch.randn(3, 10))
    reference = copy.deepcopy(model)
    same = condense(model, inplace=True)
    assert same is model
    assert_same_outputs(reference, same, torch.randn(3, 10))


def test_unknown_mask_name_is_an_error():
    with pytest.raises(MaskError, match="fc9.weight"):
        condense(nn.Sequential(nn.Linear(3, 2)), {"fc9.weight": torch.ones(2, 3, dtype=torch.bool)})


def test_condensed_conv_state_dict_round_trip():
    torch.manual_seed(0)
    conv = sparsify(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    condensed = CondensedConv2d.from_dense(conv)
    fresh = CondensedConv2d(4, 6, 3, condensed.fan_in, condensed.n_active, padding=1, groups=2)
    fresh.load_state_dict(condensed.state_dict())
    assert_same_outputs(conv, fresh, torch.randn(2, 4, 5, 5))


# ---------------------------------------------------------------------------------------------
# CondensedLinear's inference path (no autograd): the compiled operators called directly
# ---------------------------------------------------------------------------------------------


def _inference_layer(ablated: float, bias: bool, seed: int = 0) -> tuple[nn.Linear, CondensedLinear]:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(40, 24, bias=bias)
    mask = constant_fan_in_mask((24, 40), 0.2, ablated, generator)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear, CondensedLinear.from_dense(linear, mask)


@pytest.mark.parametrize("batch", [1, 2, 3, 40])
@pytest.mark.parametrize("ablated", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("windows", [False, True])
def test_inference_path_equals_general_path(monkeypatch, batch, ablated, bias, windows):
    from srigl.kernels import cpu, inference

    if inference.cpu_inference_ops(torch.float32) is None:
        pytest.skip("the C++ kernel is not available: there is no direct path")
    linear, layer = _inference_layer(ablated, bias, seed=batch)
    layer.window_inference = windows
    x = torch.randn(batch, 40)
    general = layer._matmul(x).detach()  # autograd on: the general path
    calls = []
    monkeypatch.setattr(layer, "_matmul", lambda *a: calls.append(a) or general)
    with torch.no_grad():
        y = layer(x)
    assert calls == []  # the direct path answered
    cache = layer.__dict__.get("_window_cache")  # the layer's WindowCache (only with window_inference)
    layout = None if cache is None else cache.layout  # the cached (packed, max_batch, op) or None
    assert (layout is not None) == (windows and cpu.window_ops() is not None)
    uses_windows = layout is not None and batch <= layout[1]
    if uses_windows:  # another summation order
        torch.testing.assert_close(y, general, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(y, general)  # same kernel, same summation order
    torch.testing.assert_close(y, linear(x).detach(), rtol=1e-5, atol=1e-5)


def test_inference_path_leaves_bad_or_unusual_inputs_to_the_general_path():
    from srigl.kernels import FanInOperandError

    linear, layer = _inference_layer(0.25, True)
    with torch.no_grad():
        with pytest.raises(FanInOperandError, match="float64"):
            layer(torch.randn(2, 40, dtype=torch.float64))  # named error, not the kernel's RuntimeError
        with pytest.raises(FanInOperandError):
            layer(torch.randn(2, 39))  # an input narrower than the layer is never read out of bounds
        x3 = torch.randn(2, 3, 40)  # leading dims: flattened (a view) for the direct path
        torch.testing.assert_close(layer(x3), linear(x3), rtol=1e-5, atol=1e-5)
        xt = torch.randn(40, 5).T  # non-contiguous: the general path
        torch.testing.assert_close(layer(xt), linear(xt), rtol=1e-5, atol=1e-5)
        layer.indices[0, 0] = 40  # an in-place change is re-validated before the kernel reads it
        with pytest.raises(FanInOperandError, match="40"):
            layer(torch.randn(1, 40))


def _window_layer_or_skip(seed: int = 0) -> tuple[nn.Linear, CondensedLinear]:
    from srigl import kernels

    if kernels.cpu.window_ops() is None:
        pytest.skip("no window layout here (C++ kernel unavailable or not built for AVX-512)")
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(256, 48)
    mask = constant_fan_in_mask((48, 256), 0.1, 0.25, generator)  # 10 % dense, a quarter ablated
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear, CondensedLinear.from_dense(linear, mask)


def test_window_cache_follows_the_weights():
    linear, layer = _window_layer_or_skip()
    x = torch.randn(1, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        packed = layer._window_cache.layout[0]
        layer(x)
        assert layer._window_cache.layout[0] is packed  # unchanged weights: the cached copy is reused
        layer.values.mul_(2)  # an in-place change (an optimizer step, say) repacks
        linear.weight.mul_(2)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        assert layer._window_cache.layout[0] is not packed
        # A new tensor in place of the old one repacks too.
        layer.values = nn.Parameter(layer.values * 0.5)
        linear.weight.mul_(0.5)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({**layer.state_dict(), "values": torch.zeros_like(layer.values)})
        torch.testing.assert_close(layer(x), linear.bias.expand(1, -1), rtol=0, atol=0)
        # A new tensor at the address of the packed one, with the same version (here it shares the
        # storage and version counter; in general the allocator reuses a freed tensor's address for
        # a new tensor of the same size, whose version starts at 0 again) still repacks: the cache
        # also knows its tensors by identity.
        packed = layer._window_cache.layout[0]
        same_address = nn.Parameter(layer.values.detach())
        assert same_address.data_ptr() == layer.values.data_ptr()
        assert same_address._version == layer.values._version
        layer.values = same_address  # the packed Parameter is freed
        layer(x)
        assert layer._window_cache.layout[0] is not packed


def test_window_cache_is_left_out_of_pickles(tmp_path):
    linear, layer = _window_layer_or_skip(2)
    x = torch.randn(2, 256)
    with torch.no_grad():
        expected = layer(x)
    assert layer._window_cache.layout is not None  # holds weak references, which cannot be pickled
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert "_window_cache" not in loaded.__dict__ and "_window_cache" in layer.__dict__
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    clone = copy.deepcopy(layer)  # a deep copy repacks for its own tensors
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    assert clone._window_cache.key[0]() is clone.values


def test_window_inference_can_be_switched_off_and_is_dropped_on_conversion():
    linear, layer = _window_layer_or_skip(1)
    x = torch.randn(3, 256)
    with torch.no_grad():
        with_windows = layer(x)
        assert layer._window_cache.layout is not None
        layer.window_inference = False
        torch.testing.assert_close(layer(x), with_windows, rtol=1e-6, atol=1e-6)
        layer.window_inference = True
        layer(x)
    assert layer._window_cache.layout is not None
    layer(x)  # a forward with autograd (training) drops it: the weights are about to change
    assert "_window_cache" not in layer.__dict__
    with torch.no_grad():
        layer(x)
        layer.double()  # a conversion makes new tensors: the packed copy is not kept alive
        assert "_window_cache" not in layer.__dict__
        torch.testing.assert_close(layer(x.double()), linear.double()(x.double()), rtol=1e-9, atol=1e-9)
