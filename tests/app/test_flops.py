"""FLOP and parameter counting (:mod:`srigl.app.flops`): hand-computed goldens for Linear, Conv2d,
attention, shared and condensed layers, and the compact ViT counted like the masked one."""

from __future__ import annotations

import math

import torch
from torch import nn

from srigl.app import flops


def _mask_with(shape: tuple[int, ...], nnz: int, seed: int = 0) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:nnz]] = True
    return flat.view(shape)


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
