"""The training app: FLOP/parameter counting (hand-computed goldens), the LR schedule, the TOML
writer (hypothesis round trip through tomllib), config resolution rules, the data order, and one
training step of every registered model under every registered algorithm."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import srigl
from srigl.app import flops
from srigl.errors import InvalidConfigError
from srigl.app.models import create_model, list_models
from srigl.app.train import (
    TrainConfig,
    batches,
    build_optimizer,
    build_sparsifier,
    config_from_mapping,
    dumps_json,
    dumps_toml,
    epoch_order,
    lr_factor,
    rescale_to_sparse_fan_in,
    resolve_config,
    run_name,
    shard,
)


def _mask_with(shape: tuple[int, ...], nnz: int, seed: int = 0) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:nnz]] = True
    return flat.view(shape)


# ------------------------------------------------------------------------------------------ FLOPs
def test_linear_784_300_at_90_percent_golden():
    # 784 * 300 = 235,200 weights; 90 % sparse keeps 23,520. One input = one output position.
    layer = nn.Linear(784, 300)
    layer.register_buffer("weight_mask", _mask_with((300, 784), 23_520), persistent=False)
    (cost,) = flops.count_costs(layer, (784,))
    assert (cost.params_dense, cost.params) == (235_200, 23_520)
    assert (cost.macs_dense, cost.macs) == (235_200, 23_520)
    assert cost.name == "weight" and cost.neurons == 300


def test_linear_without_mask_counts_dense_and_tokens_as_positions():
    # A Linear on (B, T=7, 16) -> (B, 7, 4): 64 weights used at 7 positions = 448 MACs.
    model = nn.Sequential(nn.Linear(16, 4))
    (cost,) = flops.count_costs(model, (7, 16))
    assert (cost.params, cost.macs_dense, cost.macs) == (64, 448, 448)


def test_conv_golden_with_output_positions():
    # Conv 1->6, 5x5, padding 2 on 28x28: 150 weights at 28 * 28 = 784 positions = 117,600 MACs.
    # With 12 active weights: 12 * 784 = 9,408. A second conv 6->16 5x5 without padding on 28x28
    # gives 24x24 = 576 positions: 2,400 * 576 = 1,382,400 MACs.
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 16, 5))
    model[0].register_buffer("weight_mask", _mask_with((6, 1, 5, 5), 12), persistent=False)
    first, second = flops.count_costs(model, (1, 28, 28))
    assert (first.name, first.macs_dense, first.macs, first.params) == ("0.weight", 117_600, 9_408, 12)
    assert (second.name, second.macs_dense, second.macs) == ("2.weight", 1_382_400, 1_382_400)


def test_multihead_attention_golden():
    # D = 8, T = 5 tokens, batch_first. in_proj (24, 8) at 5 positions: 960; Q K^T and A V:
    # 2 * 5 * 5 * 8 = 400; out_proj (8, 8) at 5 positions: 320. Masking 10 weights of the query
    # rows off saves 10 * 5 = 50 MACs -> 910. out_proj's own forward is never called, so it must not
    # be counted twice.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    block = Block()
    mask = torch.ones(24, 8, dtype=torch.bool)
    mask[0, :8] = False
    mask[1, :2] = False
    block.attn.register_buffer("in_proj_weight_mask", mask, persistent=False)
    costs = {c.name: c for c in flops.count_costs(block, (5, 8))}
    assert set(costs) == {"attn.in_proj_weight", "attn.attention", "attn.out_proj.weight"}
    assert (costs["attn.in_proj_weight"].macs_dense, costs["attn.in_proj_weight"].macs) == (960, 910)
    assert costs["attn.attention"].macs == 400
    assert costs["attn.out_proj.weight"].macs == 320
    assert costs["attn.in_proj_weight"].active_neurons == 23  # row 0 has no active weight
    assert flops.total(list(costs.values()))["macs_dense"] == 1680


def test_weight_shared_module_counts_macs_per_call_params_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    (cost,) = flops.count_costs(Twice(), (4,))
    assert (cost.params, cost.macs) == (16, 32)


def test_count_parameters_uses_masks_and_counts_biases():
    layer = nn.Linear(10, 3)  # 30 weights + 3 biases
    layer.register_buffer("weight_mask", _mask_with((3, 10), 7), persistent=False)
    assert flops.count_parameters(layer) == (33, 10)


def test_fan_in_counts_and_count_costs_restores_training_mode():
    layer = nn.Linear(4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    layer.register_buffer("weight_mask", mask, persistent=False)
    assert flops.fan_in_counts(layer, "weight") == [2, 0, 3]
    model = nn.Sequential(layer, nn.Dropout(0.5)).train()
    (cost,) = flops.count_costs(model, (4,))
    assert cost.active_neurons == 2 and model.training and model[1].training


def test_condensed_layers_count_their_stored_values():
    from srigl.condensed import CondensedLinear

    linear = nn.Linear(6, 4)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[[0, 0, 2, 2], [1, 3, 0, 5]] = True  # fan-in 2 in rows 0 and 2; rows 1 and 3 ablated
    with torch.no_grad():
        linear.weight.mul_(mask)
    condensed = CondensedLinear.from_dense(linear, mask)
    (cost,) = flops.count_costs(nn.Sequential(condensed), (6,))
    assert (cost.params_dense, cost.params, cost.macs, cost.active_neurons) == (24, 4, 4, 2)
    assert flops.fan_in_counts(condensed, "weight") == [2, 0, 2, 0]


def test_human():
    assert [flops.human(v) for v in (12, 1_234, 2_500_000, 3e9)] == ["12", "1.23k", "2.5M", "3G"]


# ------------------------------------------------------------------------------------------ LR
def test_lr_factor_golden():
    # 10 steps, 2 of warm-up: 0.5, 1.0, then cosine over the remaining 8 steps.
    assert lr_factor(0, 10, 2, "cosine") == 0.5
    assert lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(5, 10, 0, "constant") == 1.0
    # step: x0.2 from 30 %, x0.04 from 60 %, x0.008 from 90 % of the steps.
    assert [lr_factor(s, 10, 0, "step") for s in (0, 2, 3, 6, 9)] == pytest.approx([1, 1, 0.2, 0.04, 0.008])


# ------------------------------------------------------------------------------------------ TOML / JSON
_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, st.one_of(_scalars, st.lists(st.integers(-5, 5), max_size=4)), max_size=6))
def test_toml_writer_round_trips_through_tomllib(values):
    assert tomllib.loads(dumps_toml(values)) == values


def test_toml_writer_tables_and_none():
    text = dumps_toml({"a": 1, "skip": None, "t": {"x": 0.5, "y": "q\"uote"}})
    assert tomllib.loads(text) == {"a": 1, "t": {"x": 0.5, "y": 'q"uote'}}


def test_dumps_json_keeps_number_lists_on_one_line():
    text = dumps_json({"layers": {"fc": {"fan_in_counts": [1, 2, 3]}}, "x": [{"a": 1}]})
    assert '"fan_in_counts": [1, 2, 3]' in text
    import json

    assert json.loads(text) == {"layers": {"fc": {"fan_in_counts": [1, 2, 3]}}, "x": [{"a": 1}]}


# ------------------------------------------------------------------------------------------ config
def test_resolve_fills_dependent_defaults():
    c = resolve_config(TrainConfig(data="digits"))
    assert (c.method, c.sparsity, c.gamma_sal, c.lr, c.weight_decay) == ("srigl", 0.9, 0.3, 0.1, 5e-4)
    assert c.out.endswith("digits-mlp-srigl-g0.3-s0.9-seed0")
    assert resolve_config(TrainConfig(data="digits", model="vit-tiny")).gamma_sal == 0.95
    dense = resolve_config(TrainConfig(data="digits", method="dense"))
    assert (dense.sparsity, dense.gamma_sal) == (0.0, None)
    adamw = resolve_config(TrainConfig(data="digits", optimizer="adamw"))
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.05)
    off = resolve_config(TrainConfig(data="digits", no_ablation=True))
    assert off.gamma_sal == 0.0 and run_name(off).endswith("srigl-noablation-s0.9-seed0")


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "srigl"])
@pytest.mark.parametrize("no_ablation", [False, True])
def test_resolve_is_idempotent_through_toml(method, no_ablation, tmp_path):
    if no_ablation and method != "srigl":
        return
    c = resolve_config(TrainConfig(data="digits", method=method, no_ablation=no_ablation, out=str(tmp_path)))
    again = resolve_config(config_from_mapping(tomllib.loads(dumps_toml(c.to_dict()))))
    assert again == c


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(model="nope"), ["unknown model 'nope'", "mlp", "lenet5", "vit-tiny"]),
        (dict(data="imagenet"), ["unknown data set 'imagenet'", "fashion-mnist", "digits"]),
        (dict(method="magic"), ["unknown method 'magic'", "dense", "rigl", "srigl"]),
        (dict(method="rigl", gamma_sal=0.3), ["gamma_sal applies to method 'srigl' only"]),
        (dict(method="set", no_ablation=True), ["no_ablation applies to method 'srigl' only"]),
        (dict(no_ablation=True, gamma_sal=0.5), ["no_ablation means gamma_sal = 0", "0.5"]),
        (dict(method="dense", sparsity=0.5), ["method 'dense'", "sparsity=0.5"]),
        (dict(sparsity=1.0), ["sparsity must be in [0.0, 1.0)", "1.0"]),
        (dict(sparsity=-0.1), ["sparsity must be in [0.0, 1.0)", "-0.1"]),
        (dict(method="rigl", sparsity=0.0), ["needs a sparsity in (0, 1)"]),
        (dict(gamma_sal=1.5), ["gamma_sal must be in [0.0, 1.0]", "1.5"]),
        (dict(epochs=0), ["epochs must be >= 1, got 0"]),
        (dict(warmup_epochs=5, epochs=2), ["warmup_epochs must be in [0, epochs=2], got 5"]),
        (dict(t_end_fraction=0.0), ["t_end_fraction must be in (0.0, 1.0]"]),
        (dict(compact=True, method="rigl"), ["compact training is for method 'srigl'"]),
    ],
)
def test_resolve_refuses_with_the_numbers(kwargs, words):
    with pytest.raises(InvalidConfigError) as error:
        resolve_config(TrainConfig(**{"data": "digits", **kwargs}))
    for word in words:
        assert word in str(error.value)


def test_config_from_mapping_checks_keys_and_types():
    with pytest.raises(InvalidConfigError, match=r"unknown keys \['epoch'\]; valid keys are \[.*'epochs'"):
        config_from_mapping({"epoch": 3})
    with pytest.raises(InvalidConfigError, match="epochs must be int, got True"):
        config_from_mapping({"epochs": True})
    with pytest.raises(InvalidConfigError, match="sparsity must be float, got '0.9'"):
        config_from_mapping({"sparsity": "0.9"})
    assert config_from_mapping({"sparsity": 1, "lr": 2}).sparsity == 1.0  # an int is a valid float


# ------------------------------------------------------------------------------------------ data order
def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(50, 3, 7) == epoch_order(50, 3, 7)
    assert epoch_order(50, 3, 7) != epoch_order(50, 3, 8)
    assert epoch_order(50, 3, 7) != epoch_order(50, 4, 7)
    assert sorted(i for i, _ in epoch_order(50, 0, 0)) == list(range(50))


def test_shard_splits_like_a_distributed_sampler():
    order = list(range(10))
    parts = [shard(order, rank, 3) for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded by wrapping to 12
    assert shard(order, 0, 1) is order


def test_fast_batches_equal_the_data_loader():
    from torch.utils.data import DataLoader

    from srigl.app.datasets import load_dataset

    train_set, _, _ = load_dataset("digits")
    subset = train_set.head(300)
    order = epoch_order(len(subset), 0, 1)
    fast = list(batches(subset, order, 64))
    slow = list(DataLoader(subset, batch_size=64, sampler=order))
    assert len(fast) == len(slow) == 5
    for (x_fast, y_fast), (x_slow, y_slow) in zip(fast, slow):
        assert torch.equal(x_fast, x_slow) and torch.equal(y_fast, y_slow)


# ------------------------------------------------------------------------------------------ sparse init
def test_rescale_to_sparse_fan_in_golden():
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.75, "2.weight": 0.0}, total_steps=10)
    rescale_to_sparse_fan_in(sp)
    # k = 4 of 16 per neuron: active weights become sqrt(16 / 4) = 2, inactive stay 0.
    weight, mask = model[0].weight, model[0].weight_mask
    assert torch.equal(weight[mask], torch.full((16,), 2.0))
    assert torch.equal(weight[~mask], torch.zeros(48))


# ------------------------------------------------------------------------------------------ registry x registry
@pytest.mark.parametrize("algorithm", sorted(srigl.ALGORITHMS))
@pytest.mark.parametrize("model_name", list_models())
def test_every_model_trains_one_step_under_every_algorithm(model_name, algorithm):
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=1, image_size=28, num_classes=10)
    config = resolve_config(TrainConfig(data="digits", model=model_name, method=algorithm, sparsity=0.9, delta=1))
    optimizer = build_optimizer(config, model)
    # total_steps 4 -> t_end 3: step 1 is a mask update (RigL/SRigL/SET drop and regrow).
    sp = build_sparsifier(config, model, optimizer, total_steps=4)
    rescale_to_sparse_fan_in(sp)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(images), labels)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    stats = sp.step()
    optimizer.zero_grad()
    assert (stats is not None) == (algorithm != "static")
    assert sp.global_sparsity() == pytest.approx(0.9, abs=0.01)
    for name, mask in sp.masks().items():
        weight = model.get_parameter(name)
        assert not weight[~mask].any(), f"{name} has non-zero weights outside its mask"
    assert torch.isfinite(nn.functional.cross_entropy(model(images), labels))


def test_flop_count_of_a_compact_vit_matches_the_masked_one():
    # The compact attention's projections are counted through its compact children and its
    # weight-free core (Q K^T, softmax(.) V) by the attention module itself.
    import srigl
    from srigl.app.flops import count_costs
    from srigl.app.models import create_model

    def totals(compact: bool):
        torch.manual_seed(0)
        model = create_model("vit-tiny", in_channels=1, image_size=28, num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        srigl.SRigL(model, opt, sparsity=0.9, total_steps=100, compact=compact)
        costs = count_costs(model, (1, 28, 28))
        return sum(c.macs_dense for c in costs), sum(c.macs for c in costs)

    assert totals(compact=True) == totals(compact=False)
