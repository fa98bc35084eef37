"""Compact sparse training: the same run as the masked-dense engine, in (n_active, k) form.

The central check trains two copies of a model side by side, one with ``srigl.SRigL`` (masked dense)
and one with ``srigl.SRigL(..., compact=True)``, on the same data with the same seed, and asserts
after every step that the masks are identical and the weights and momentum equal (fp32 tolerance),
including runs where neurons are ablated and ``k'`` changes.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import srigl
from srigl.condensed import CondensedMultiheadAttention as CompactMultiheadAttention
from srigl.condensed.twins import from_masked_dense, to_masked_dense
from srigl.storage.compact import CompactParam
from srigl.condensed import CondensedConv2d, CondensedLinear
from srigl.app.models import create_model
from srigl.structures import ConstantFanIn, topk_mask


# ----------------------------------------------------------------------------------------- helpers
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit-tiny", in_channels=1, image_size=8, num_classes=5, patch_size=4, dim=16, depth=1,
                        heads=2, mlp_dim=32)


def batches(model_name: str, steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = {"mlp": (32, 24), "conv": (16, 3, 8, 8), "vit": (16, 1, 8, 8)}[model_name]
    return [(torch.randn(shape, generator=generator), torch.randint(0, 5, (shape[0],), generator=generator))
            for _ in range(steps)]


MODELS = {"mlp": mlp, "conv": convnet, "vit": tiny_vit}


def train_step(model, optimizer, sp, x, y, accumulate: int = 1):
    for part_x, part_y in zip(x.chunk(accumulate), y.chunk(accumulate)):
        nn.functional.cross_entropy(model(part_x), part_y).backward()
    optimizer.step()
    stats = sp.step()
    optimizer.zero_grad()
    return stats


def dense_weights(sp) -> dict[str, torch.Tensor]:
    return {layer.name: layer.dense_view()[0].reshape(layer.shape).clone() for layer in sp.layers}


def momentum(sp, layer) -> torch.Tensor:
    """The momentum buffer of ``layer`` as a dense tensor shaped like the weight."""
    if isinstance(layer, CompactParam):
        buffer = sp.optimizer.state[layer.module.values]["momentum_buffer"]
        layout = layer.layout()
        return type(layout)(layout.active_rows, layout.indices, buffer, layout.fan_in, layout.out_features,
                            layout.in_features_flat).to_dense().view(layer.shape)
    return sp.optimizer.state[layer.param]["momentum_buffer"]


def twin_runs(model_name, steps, *, sparsity, gamma_sal, optimizer="sgd", accumulate=1, compact_kwargs=None, **kwargs):
    """Run masked-dense and compact SRigL side by side; yield per-step (dense sp, compact sp, stats)."""
    runs = []
    for compact in (False, True):
        extra = {**kwargs, **(compact_kwargs or {})} if compact else kwargs
        model = MODELS[model_name]()
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp = srigl.SRigL(model, opt, sparsity=sparsity, total_steps=steps, delta=3, alpha=0.4,
                         gamma_sal=gamma_sal, compact=compact, **extra)
        runs.append((model, opt, sp))
    for x, y in batches(model_name, steps):
        stats = [train_step(*run, x, y, accumulate) for run in runs]
        yield runs[0][2], runs[1][2], stats


def assert_same_state(dense_sp, compact_sp, momentum_too=True):
    masks_dense, masks_compact = dense_sp.masks(), compact_sp.masks()
    assert masks_dense.keys() == masks_compact.keys()
    for name in masks_dense:
        assert torch.equal(masks_dense[name], masks_compact[name]), name
    weights_compact = dense_weights(compact_sp)
    for name, weight in dense_weights(dense_sp).items():
        torch.testing.assert_close(weights_compact[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    if momentum_too:
        by_name = {layer.name: layer for layer in compact_sp.layers}
        for layer in dense_sp.layers:
            torch.testing.assert_close(momentum(compact_sp, by_name[layer.name]), momentum(dense_sp, layer),
                                       rtol=1e-4, atol=1e-5, msg=layer.name)


# ----------------------------------------------------------------------------------------- same run as masked dense
@pytest.mark.parametrize(
    "model_name, sparsity, gamma_sal, accumulate",
    [
        ("mlp", 0.8, 0.0, 1),  # plain constant fan-in RigL
        ("mlp", 0.9, 0.95, 2),  # ablation at high sparsity, with gradient accumulation
        ("mlp", 0.9, 0.95, 8),  # micro-batches of 4 rows: (x, g) kept to the update, not folded
        ("conv", 0.8, 0.9, 1),  # compact Conv2d (padding, stride) and Linear after a flatten
        ("vit", 0.8, 0.9, 1),  # compact attention, MLP, patch embedding and head
        ("vit-linear-only", 0.8, 0.9, 1),  # attention masked-dense beside compact layers
    ],
)
def test_compact_run_equals_masked_dense_run(model_name, sparsity, gamma_sal, accumulate):
    steps, updates, ablated, reshaped = 16, 0, False, False
    compact_kwargs = {"compact_types": (nn.Linear,)} if model_name == "vit-linear-only" else None
    for dense_sp, compact_sp, (stats_dense, stats_compact) in twin_runs(
        model_name.partition("-")[0], steps, sparsity=sparsity, gamma_sal=gamma_sal, accumulate=accumulate,
        distribution="uniform", compact_kwargs=compact_kwargs,
    ):
        assert_same_state(dense_sp, compact_sp)
        assert (stats_dense is None) == (stats_compact is None)
        if stats_compact is not None:
            updates += 1
            assert stats_compact["layers"] == stats_dense["layers"]
            for layer in compact_sp.layers:
                if isinstance(layer, CompactParam):
                    reshaped |= layer.module.values.shape[1] != round((1 - sparsity) * layer.fan_in)
                    ablated |= layer.module.n_active < layer.n_rows
    assert updates >= 3
    assert compact_sp.layers and any(isinstance(layer, CompactParam) for layer in compact_sp.layers)
    if gamma_sal > 0.5:
        assert ablated and reshaped, "the test must exercise ablation and a changed k'"


def test_adam_state_is_remapped_like_masked_dense_reset():
    steps = 10
    for dense_sp, compact_sp, _ in twin_runs("mlp", steps, sparsity=0.9, gamma_sal=0.95, optimizer="adam",
                                             distribution="uniform"):
        assert_same_state(dense_sp, compact_sp, momentum_too=False)
    by_name = {layer.name: layer for layer in compact_sp.layers}
    for layer in dense_sp.layers:
        compact_layer = by_name[layer.name]
        state = compact_sp.optimizer.state[compact_layer.module.values]
        layout = compact_layer.layout()
        for key in ("exp_avg", "exp_avg_sq"):
            expected = dense_sp.optimizer.state[layer.param][key].reshape(layer.n_rows, -1)
            expected = expected[layout.active_rows[:, None], layout.indices.long()]  # (n_active, k)
            torch.testing.assert_close(state[key], expected, rtol=1e-4, atol=1e-6)


def test_compact_true_returns_compact_engine_and_rewrites_the_optimizer():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dense_weight = model[0].weight
    sp = srigl.SRigL(model, optimizer, sparsity=0.8, total_steps=100, compact=True)
    assert type(sp) is srigl.SRigL and sp.storage == "compact"
    assert isinstance(model[0], CondensedLinear)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(any(p is q for p in params) for q in model.parameters())
    assert not any(p is dense_weight for p in params)
    assert len(params) == len(list(model.parameters()))
    # The bias is the very Parameter the optimizer was built with.
    assert model[0].bias is params[1]
    assert sp.config()["compact"] is True
    assert all(entry["storage"] == "compact" for entry in sp.summary().values() if entry["sparse"])


def test_attention_becomes_compact_and_what_cannot_stays_masked_dense_with_a_reason():
    model = tiny_vit()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=100,
                     compact=True, distribution="uniform")
    summary = sp.summary()
    assert isinstance(model.blocks[0].attn, CompactMultiheadAttention)
    assert isinstance(model.blocks[0].attn.in_proj, CondensedLinear)
    assert isinstance(model.patch_embed, CondensedConv2d)
    for name in ("blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight", "blocks.0.mlp.0.weight"):
        assert summary[name]["storage"] == "compact", name

    model = tiny_vit()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=100,
                     compact=True, distribution="uniform", compact_types=(nn.Linear,))
    summary = sp.summary()
    assert summary["blocks.0.attn.in_proj_weight"]["storage"] == "masked"
    assert summary["blocks.0.attn.in_proj_weight"]["storage_reason"] == "MultiheadAttention not in compact_types"
    assert summary["patch_embed.weight"]["storage_reason"] == "Conv2d not in compact_types"
    assert summary["blocks.0.mlp.0.weight"]["storage"] == "compact"

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.Conv1d(4, 4, 3))
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=100,
                     compact=True, distribution="uniform")
    summary = sp.summary()
    assert "fast path" in summary["0.self_attn.in_proj_weight"]["storage_reason"]
    assert "fast path" in summary["0.self_attn.out_proj.weight"]["storage_reason"]
    assert summary["1.weight"]["storage_reason"] == "Conv1d has no compact twin"
    assert summary["0.linear1.weight"]["storage"] == "compact"


ATTENTION_CASES = {
    "self, batch-first, no weights": dict(batch_first=True, need_weights=False),
    "self, sequence-first, averaged weights": dict(batch_first=False, need_weights=True),
    "self, per-head weights, bool masks": dict(batch_first=True, need_weights=True, average=False, attn_mask="bool",
                                               key_padding_mask=True),
    "self, float (B*H, L, S) mask, no weights": dict(batch_first=True, need_weights=False, attn_mask="float3d"),
    "causal hint with its mask": dict(batch_first=True, need_weights=False, attn_mask="causal", is_causal=True),
    "cross attention, key is value": dict(batch_first=True, need_weights=False, cross="kv"),
    "cross attention, three inputs, padding": dict(batch_first=False, need_weights=True, cross="qkv",
                                                   key_padding_mask=True),
    "unbatched": dict(batch_first=True, need_weights=True, unbatched=True),
    "no bias": dict(batch_first=True, need_weights=False, bias=False),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_compact_attention_equals_masked_multihead_attention(case):
    options = ATTENTION_CASES[case]
    embed, heads, batch, length = 16, 4, 3, 5
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, bias=options.get("bias", True), batch_first=options["batch_first"])
    generator = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for local, weight in (("in_proj_weight", mha.in_proj_weight), ("out_proj.weight", mha.out_proj.weight)):
            masks[local] = topk_mask(torch.rand(weight.shape, generator=generator), 6, ConstantFanIn())
            masks[local][1] = False  # one ablated neuron in each projection
            weight.mul_(masks[local])
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.normal_()
    compact = CompactMultiheadAttention.from_masked(mha, masks)
    shape = (length, embed) if options.get("unbatched") else (
        (batch, length, embed) if options["batch_first"] else (length, batch, embed))
    query = torch.randn(shape, generator=generator)
    cross = options.get("cross")
    key = torch.randn(shape, generator=generator) if cross else query
    value = key if cross != "qkv" else torch.randn(shape, generator=generator)
    kwargs = dict(need_weights=options["need_weights"], average_attn_weights=options.get("average", True),
                  is_causal=options.get("is_causal", False))
    if options.get("key_padding_mask"):
        padding = torch.zeros(batch, length, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding
    kind = options.get("attn_mask")
    if kind == "bool":
        kwargs["attn_mask"] = torch.rand(length, length, generator=generator) > 0.8
        kwargs["attn_mask"].fill_diagonal_(False)
    elif kind == "float3d":
        kwargs["attn_mask"] = torch.randn(batch * heads, length, length, generator=generator)
    elif kind == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    reference_inputs = [t.clone().requires_grad_() for t in (query, key, value)]

    def call(module, tensors):
        q, k, v = tensors[0], tensors[0] if not cross else tensors[1], tensors[0] if not cross else (
            tensors[1] if cross == "kv" else tensors[2])
        return module(q, k, v, **kwargs)

    out, weights = call(compact, inputs)
    reference_out, reference_weights = call(mha, reference_inputs)
    torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-5)
    if options["need_weights"]:
        torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-6)
    else:
        assert weights is None and reference_weights is None
    upstream = torch.randn_like(out)
    (reference_out * upstream).sum().backward()
    reference_bias_grads = [None if b is None else b.grad.clone() for b in (mha.in_proj_bias, mha.out_proj.bias)]
    for b in (mha.in_proj_bias, mha.out_proj.bias):
        if b is not None:
            b.grad = None
    (out * upstream).sum().backward()
    for mine, theirs in zip(inputs, reference_inputs):
        if theirs.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    for projection, weight in ((compact.in_proj, mha.in_proj_weight), (compact.out_proj, mha.out_proj.weight)):
        expected = weight.grad[projection.active_rows[:, None], projection.indices.long()]
        torch.testing.assert_close(projection.values.grad, expected, rtol=1e-4, atol=1e-5)
    for bias, expected in zip((compact.in_proj.bias, compact.out_proj.bias), reference_bias_grads):
        if bias is not None:
            torch.testing.assert_close(bias.grad, expected, rtol=1e-4, atol=1e-5)
    # Back to the dense type: same outputs, masks as buffers.
    dense, dense_masks = compact.to_dense()
    assert type(dense) is nn.MultiheadAttention and sorted(dense_masks) == ["in_proj_weight", "out_proj.weight"]
    assert torch.equal(dense.in_proj_weight_mask, masks["in_proj_weight"])
    assert torch.equal(dense.out_proj.weight_mask, masks["out_proj.weight"])
    torch.testing.assert_close(call(dense, [t.detach() for t in inputs])[0], out.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- golden remap
def test_golden_update_moves_kept_values_and_momentum_and_zeros_regrown():
    # Hand-computed case of tests/test_algorithms.py: W, mask M, dense gradient G, alpha = 0.6, lr = 0.
    # K = 2: keep |0.9| and |-0.7|, grow the largest |G| outside them: 0.8 at (0, 1) and 0.6 at (1, 0).
    weight = torch.tensor([[0.9, 0.0, -0.1, 0.0], [0.0, 0.5, 0.0, -0.7]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    grad = torch.tensor([[0.2, 0.8, 0.1, 0.3], [0.6, 0.05, 0.4, 0.7]])
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.5}, total_steps=10_000, delta=1, alpha=0.6,
                     compact=True)
    # Install the hand-set layout: rows (0, 1), columns [[0, 2], [1, 3]].
    layer = model[0]
    with torch.no_grad():
        layer.indices.copy_(torch.tensor([[0, 2], [1, 3]]))
        layer.values.copy_(torch.tensor([[0.9, -0.1], [0.5, -0.7]]))
    assert torch.equal(sp.masks()["0.weight"], mask)
    # The loss sum_b (W x_b)_b with x = G has dL/dW = G (see tests/test_algorithms.py).
    (model(grad) * torch.eye(2)).sum().backward()
    # The compact gradient is the dense gradient at the active positions.
    assert torch.equal(layer.values.grad, torch.tensor([[0.2, 0.1], [0.05, 0.7]]))
    optimizer.step()  # lr = 0: weights unchanged, momentum buffer = gradient
    stats = sp.step()
    assert stats["layers"]["0.weight"]["grown"] == 2
    assert torch.equal(sp.masks()["0.weight"], torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool))
    assert torch.equal(layer.indices.long(), torch.tensor([[0, 1], [0, 3]]))
    assert torch.equal(layer.values.detach(), torch.tensor([[0.9, 0.0], [0.0, -0.7]]))  # regrown start at 0
    buffer = optimizer.state[layer.values]["momentum_buffer"]
    assert torch.equal(buffer, torch.tensor([[0.2, 0.0], [0.0, 0.7]]))  # kept move with their weight
    assert layer.values.grad is None


def test_ablation_changes_layout_shape_and_swaps_the_parameter_everywhere():
    # Hand-computed, lr = 0, gamma_sal = 1, update after step 1 with drop fraction ~0.3 (K = 1 of 6):
    # salient = top-5 magnitudes (0.9, 0.8, 0.7, 0.6 and one 1e-4) | top-1 |G| (0.5 at (0, 2)).
    # Row 1 has 1 salient weight < gamma_sal * k = 2: ablated; budget 6 over 2 rows gives k' = 3.
    # Drop the smallest surviving magnitude (0.6); grow by |G|: row 0 col 2, row 2 cols 1 and 3.
    weight = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.0, 0.0, 1e-4, 1e-4], [0.7, 0.0, 0.6, 0.0]])
    grad = torch.tensor([[0.1, 0.0, 0.5, 0.4], [0.0, 0.0, 0.0, 0.0], [0.05, 0.3, 0.0, 0.2]])
    # The output layer is never ablated, so the ablated layer is the first of two.
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 3, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.5, "1.weight": 1 / 3}, total_steps=10_000,
                     delta=1, alpha=0.3, gamma_sal=1.0, compact=True)
    layer = model[0]
    with torch.no_grad():
        layer.indices.copy_(torch.tensor([[0, 1], [2, 3], [0, 2]]))
        layer.values.copy_(weight[weight != 0].view(3, 2))
    old_values = layer.values
    (layer(grad) * torch.eye(3)).sum().backward()  # dL/dW0 = G (see the golden case above)
    (model(grad) * 0.0).sum().backward()  # called again: the update sums both calls (+ 0 here)
    optimizer.step()  # lr = 0: weights unchanged, momentum buffer = gradient
    stats = sp.step()
    assert stats["layers"]["0.weight"]["active_neurons"] == 2
    expected = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(sp.masks()["0.weight"], expected)
    assert torch.equal(layer.active_rows, torch.tensor([0, 2]))
    assert torch.equal(layer.indices.long(), torch.tensor([[0, 1, 2], [0, 1, 3]]))
    assert torch.equal(layer.values.detach(), torch.tensor([[0.9, 0.8, 0.0], [0.7, 0.0, 0.0]]))
    # values changed shape: a new Parameter, in the module and the optimizer, with its state.
    assert layer.values is not old_values
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert any(p is layer.values for p in params) and not any(p is old_values for p in params)
    assert old_values not in optimizer.state
    # Kept weights' momentum moved with them; regrown entries start at 0.
    buffer = optimizer.state[layer.values]["momentum_buffer"]
    expected_buffer = torch.tensor([[0.1, 0.0, 0.0], [0.05, 0.0, 0.0]])
    torch.testing.assert_close(buffer, expected_buffer)
    # The ablated neuron outputs exactly its (absent) bias: 0.
    assert torch.equal(layer(torch.randn(5, 4))[:, 1], torch.zeros(5))


# ----------------------------------------------------------------------------------------- the layers
def _masked_pair(kind: str, out: int, fan_in_shape, k: int, n_ablated: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        dense = nn.Linear(fan_in_shape[0], out)
    else:
        dense = nn.Conv2d(fan_in_shape[0], out, fan_in_shape[1], stride=2, padding=1)
    fan_in = dense.weight[0].numel()
    mask = topk_mask(torch.rand(out, fan_in, generator=generator), min(k, fan_in), ConstantFanIn())
    mask[torch.randperm(out, generator=generator)[:n_ablated]] = False
    mask = mask.view_as(dense.weight)
    with torch.no_grad():
        dense.weight.mul_(mask)
    dense.register_buffer("weight_mask", mask, persistent=False)
    return dense, mask


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv"]),
    out=st.integers(1, 9),
    fan_in=st.integers(1, 7),
    k=st.integers(1, 12),
    ablated=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_compact_layer_forward_and_backward_equal_masked_dense(kind, out, fan_in, k, ablated, seed):
    shape = (fan_in * 3,) if kind == "linear" else (fan_in, 3)
    dense, mask = _masked_pair(kind, out, shape, k, min(int(ablated * out), out - 1), seed)
    model = nn.Sequential(dense)
    compact = from_masked_dense(model)["0"]
    x_shape = (2, 5, shape[0]) if kind == "linear" else (3, fan_in, 7, 6)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(seed + 1))
    x_dense, x_compact = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference = nn.Sequential(dense)  # the same Parameters: dense still holds them
    y_dense, y_compact = reference(x_dense), compact(x_compact)
    torch.testing.assert_close(y_compact, y_dense, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y_dense)
    (y_dense * upstream).sum().backward()
    bias_grad_dense = dense.bias.grad.clone()
    (y_compact * upstream).sum().backward()
    torch.testing.assert_close(x_compact.grad, x_dense.grad, rtol=1e-5, atol=1e-5)
    dense_grad = dense.weight.grad.reshape(out, -1)  # (out, fan_in)
    expected = dense_grad[compact.active_rows[:, None], compact.indices.long()]  # (n_active, k)
    torch.testing.assert_close(compact.values.grad, expected, rtol=1e-5, atol=1e-5)
    assert compact.bias is dense.bias  # the shared Parameter: both passes accumulated into it
    torch.testing.assert_close(compact.bias.grad, 2 * bias_grad_dense, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- conversions, checkpoints
def test_conversion_round_trip_preserves_weights_masks_and_outputs():
    model = convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, optimizer, sparsity=0.7, total_steps=100, compact=True, distribution="uniform")
    x = torch.randn(4, 3, 8, 8)
    expected_out, expected_masks, expected_weights = model(x), sp.masks(), dense_weights(sp)
    masks = to_masked_dense(model)
    assert type(model[0]) is nn.Conv2d and type(model[5]) is nn.Linear
    assert masks.keys() == expected_masks.keys()
    for name, mask in masks.items():
        assert torch.equal(mask, expected_masks[name])
        module = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(module.weight_mask, mask)
        assert torch.equal(module.weight.detach(), expected_weights[name])
        assert not bool(module.weight.detach().masked_select(~mask).any())
    torch.testing.assert_close(model(x), expected_out)
    swapped = from_masked_dense(model)
    assert sorted(swapped) == ["0", "2", "5"]
    torch.testing.assert_close(model(x), expected_out)
    assert to_masked_dense(model).keys() == expected_masks.keys()
    explicit = from_masked_dense(model, {"0.weight": masks["0.weight"]})
    assert list(explicit) == ["0"] and type(model[2]) is nn.Conv2d


def test_from_masked_dense_rejects_masks_without_a_compact_twin():
    model = tiny_vit()
    with pytest.raises(srigl.InvalidConfigError, match="without a compact twin"):
        from_masked_dense(model, {"blocks.0.norm1.weight": torch.ones(16, dtype=torch.bool)})
    layer = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32))
    with pytest.raises(srigl.InvalidConfigError, match="fast path"):
        from_masked_dense(layer, {"0.self_attn.in_proj_weight": torch.ones(48, 16, dtype=torch.bool)})


def test_vit_round_trip_through_masked_dense():
    model = tiny_vit()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=100,
                     compact=True, distribution="uniform")
    x = torch.randn(2, 1, 8, 8)
    expected_out, expected_masks = model(x), sp.masks()
    masks = to_masked_dense(model)
    assert masks.keys() == expected_masks.keys()
    assert all(torch.equal(masks[n], expected_masks[n]) for n in masks)
    assert type(model.blocks[0].attn) is nn.MultiheadAttention
    torch.testing.assert_close(model(x), expected_out, rtol=1e-5, atol=1e-5)
    assert sorted(from_masked_dense(model)) == ["blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2", "head",
                                                "patch_embed"]
    torch.testing.assert_close(model(x), expected_out, rtol=1e-5, atol=1e-5)


def _saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_compact_checkpoint_size_is_proportional_to_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(), nn.Linear(512, 512, bias=False))
    dense_bytes = _saved_bytes(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = srigl.SRigL(model, optimizer, sparsity=0.9, total_steps=100, compact=True, distribution="uniform")
    compact_bytes = _saved_bytes(model.state_dict()) + _saved_bytes(sp.state_dict())
    density = 1 - sp.global_sparsity()
    # fp32 values + int16 indices: 6 bytes per active weight against 4 dense, plus a small overhead.
    assert model[0].indices.dtype == torch.int16
    ratio = compact_bytes / dense_bytes
    assert density * 1.5 <= ratio <= density * 1.5 + 0.02, (ratio, density)


def test_resume_from_compact_checkpoint_is_bit_identical():
    steps, split = 14, 7
    data = batches("mlp", steps)

    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = srigl.SRigL(model, opt, sparsity=0.9, total_steps=steps, delta=3, gamma_sal=0.95, compact=True,
                         distribution="uniform")
        return model, opt, sp

    model, opt, sp = build()
    for x, y in data[:split]:
        train_step(model, opt, sp, x, y)
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, checkpoint)
    assert any(layer.module.values.shape != build()[0].get_submodule(layer.name[:-7]).values.shape
               for layer in sp.layers), "the checkpoint must hold a layout the fresh model does not have"
    for x, y in data[split:]:
        train_step(model, opt, sp, x, y)

    for sparsifier_first in (True, False):
        checkpoint.seek(0)
        saved = torch.load(checkpoint, weights_only=False)
        resumed, resumed_opt, resumed_sp = build()
        if sparsifier_first:
            resumed_sp.load_state_dict(saved["sp"])
        resumed.load_state_dict(saved["model"])
        resumed_opt.load_state_dict(saved["opt"])
        if not sparsifier_first:
            resumed_sp.load_state_dict(saved["sp"])
        for x, y in data[split:]:
            train_step(resumed, resumed_opt, resumed_sp, x, y)
        for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
        assert resumed_sp.step_count == sp.step_count


def test_load_state_dict_refuses_a_masked_dense_state():
    dense_model, compact_model = mlp(), mlp()
    dense_sp = srigl.SRigL(dense_model, torch.optim.SGD(dense_model.parameters(), lr=0.1), total_steps=10)
    compact_sp = srigl.SRigL(compact_model, torch.optim.SGD(compact_model.parameters(), lr=0.1), total_steps=10,
                             compact=True)
    with pytest.raises(srigl.StateDictMismatchError, match="from_masked_dense"):
        compact_sp.load_state_dict(dense_sp.state_dict())


# ----------------------------------------------------------------------------------------- memory and errors
@pytest.mark.parametrize("rows", [4, 64])
def test_dense_gradient_inputs_are_held_only_on_update_steps_and_never_above_the_dense_gradient(rows):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = srigl.SRigL(model, opt, sparsity=0.8, total_steps=40, delta=4, compact=True)
    x, y = torch.randn(rows, 24), torch.randint(0, 5, (rows,))
    for step in range(1, 9):
        nn.functional.cross_entropy(model(x), y).backward()
        for layer in sp.layers:
            pairs = [entry for entry in layer._captured if entry[0] is not None]
            folded = layer._folded
            if step % 4:
                assert not pairs and folded is None
                continue
            # Whichever is smaller is held: the layer's input and output gradient, or g^T x itself.
            dense_size = layer.n_rows * layer.fan_in
            if rows * (layer.n_rows + layer.fan_in) <= dense_size:
                assert len(pairs) == 1 and folded is None
            else:
                assert not pairs and folded.shape == (layer.n_rows, layer.fan_in)
        opt.step()
        sp.step()
        opt.zero_grad()
        assert not sp.held_tensors()


def test_nonfinite_gradient_skips_the_update_like_masked_dense():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = srigl.SRigL(model, opt, sparsity=0.8, total_steps=40, delta=1, compact=True)
    before = sp.masks()
    x = torch.randn(4, 24)
    x[0, 0] = math.inf
    model(x).sum().backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = sp.step()
    assert stats["skipped"]
    assert all(torch.equal(before[n], m) for n, m in sp.masks().items())


def test_invalid_configurations_raise_named_errors():
    model = mlp()
    with pytest.raises(srigl.InvalidConfigError, match="build the optimizer"):
        srigl.SRigL(model, None, total_steps=10, compact=True)
    with pytest.raises(srigl.InvalidConfigError, match="no compact twin"):
        srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, compact=True,
                    compact_types=(nn.Conv1d,))

    with pytest.raises(srigl.InvalidConfigError, match="needs the ConstantFanIn structure.*RigL has Unstructured"):
        srigl.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, compact=True)
    with pytest.raises(srigl.InvalidConfigError, match="compact_types applies to compact training only"):
        srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, compact_types=(nn.Linear,))

    class MySRigL(srigl.SRigL):  # one engine: a subclass trains compact like SRigL itself
        pass

    other = mlp()
    mine = MySRigL(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=10, compact=True)
    assert type(mine) is MySRigL and isinstance(other[0], CondensedLinear)
    dense = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, compact=False)
    assert type(dense) is srigl.SRigL


# ----------------------------------------------------------------------------------------- block by block
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 22])  # one row, a few rows, the whole layer per block
@pytest.mark.parametrize("gamma_sal", [0.0, 0.95])  # 0.95: the saliency passes (threshold, counts) run too
def test_update_in_row_blocks_gives_the_masks_of_the_dense_update(monkeypatch, block_elements, gamma_sal):
    from srigl import blockwise

    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", block_elements)
    passes = []
    real_update = blockwise.update
    monkeypatch.setattr(blockwise, "update", lambda **kw: passes.append(kw["block_rows"]) or real_update(**kw))
    updates = 0
    for dense_sp, compact_sp, (stats_dense, stats_compact) in twin_runs(
        "mlp", 10, sparsity=0.9, gamma_sal=gamma_sal, distribution="uniform"
    ):
        assert_same_state(dense_sp, compact_sp)
        if stats_compact is not None:
            updates += 1
            assert stats_compact["layers"] == stats_dense["layers"]
    assert updates >= 2
    assert passes and set(passes) <= {max(1, block_elements // fan_in) for fan_in in (24, 20, 16)}


def test_set_with_constant_fan_in_regrows_the_same_random_weights_in_blocks(monkeypatch):
    from srigl import blockwise

    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 40)  # 1-2 rows per block
    runs = []
    for compact in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = srigl.SET(model, opt, sparsity=0.8, total_steps=10, delta=2, structure=ConstantFanIn(),
                       distribution="uniform", compact=compact)
        runs.append((model, opt, sp))
    for x, y in batches("mlp", 10):
        stats = [train_step(*run, x, y) for run in runs]
        assert (stats[0] is None) == (stats[1] is None)
        if stats[0] is not None:
            assert stats[0]["layers"] == stats[1]["layers"]
            assert sum(v["grown"] for v in stats[0]["layers"].values()) > 0
        assert_same_state(runs[0][2], runs[1][2])


def test_kth_largest_over_blocks_counts_the_ties_it_leaves():
    from srigl.blockwise import _kth_largest

    blocks = [torch.tensor([[5.0, 1.0], [3.0, 3.0]]), torch.tensor([[3.0, 0.0]])]
    threshold, ties = _kth_largest(lambda: iter(blocks), 3)  # 5, then two of the three 3s
    assert float(threshold) == 3.0 and ties == 2
    threshold, ties = _kth_largest(lambda: iter(blocks), 1)
    assert float(threshold) == 5.0 and ties == 1
