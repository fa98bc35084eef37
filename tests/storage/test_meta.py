"""Compact layers built from the meta device: only values and indices are ever allocated (#16)."""

from __future__ import annotations

import math

import pytest
import torch
from dispatch_watch import LargestTensor
from torch import nn

import srigl
from srigl import initial
from srigl.errors import InvalidConfigError, LayerTooLargeError
from srigl.storage import compact as compact_storage
from srigl.structures import ConstantFanIn


def _model(out: int, device=None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, out, device=device))


def _sparsifier(model, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsity = {"0.weight": 0.5, "2.weight": 0.75}
    return srigl.SRigL(model, optimizer, sparsity=sparsity, total_steps=40, delta=4, compact=True, **kwargs), optimizer


@pytest.mark.parametrize("block_rows", [1, 3, 7, 1000])
def test_random_layout_is_the_random_masks_columns_drawn_in_row_blocks(block_rows):
    mask = initial.random_mask(17, 24, 5, ConstantFanIn(), torch.Generator().manual_seed(3))
    layout = initial.random_layout(17, 24, 5, torch.Generator().manual_seed(3), dtype=torch.int16, block_rows=block_rows)
    assert layout.dtype == torch.int16
    assert torch.equal(layout.long(), mask.nonzero()[:, 1].view(17, 5))


def test_meta_head_starts_with_the_layout_a_materialised_head_gets():
    real, meta = _model(40), _model(40, device="meta")
    real_sparsifier, _ = _sparsifier(real)
    meta_sparsifier, _ = _sparsifier(meta)
    # The same mask stream in the same order: the same first layouts, hidden layer and head.
    for name, mask in real_sparsifier.masks().items():
        assert torch.equal(meta_sparsifier.masks()[name], mask), name
    head = meta[2]
    assert isinstance(head, srigl.CondensedLinear)
    assert head.values.shape == (40, 6) and head.indices.dtype == torch.int16
    assert not any(p.is_meta for p in meta.parameters()) and not any(b.is_meta for b in meta.buffers())


def test_meta_values_and_bias_are_drawn_as_reset_parameters_would_rescaled_to_the_sparse_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(400, 3000, device="meta"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.0, "1.weight": 0.9}, total_steps=10, compact=True)
    values, bias = model[1].values.detach(), model[1].bias.detach()
    k = values.shape[1]
    assert k == 40
    # U(-1/sqrt(k), 1/sqrt(k)): the dense init's bound 1/sqrt(400) times sqrt(400/k).
    assert float(values.abs().max()) <= 1 / math.sqrt(k)
    assert abs(float(values.std()) - 1 / math.sqrt(3 * k)) < 0.01 / math.sqrt(k) * 10
    assert float(bias.abs().max()) <= 1 / math.sqrt(400) and float(bias.std()) > 0.5 / math.sqrt(3 * 400)


def test_optimizer_holds_the_new_values_and_bias_and_training_updates_the_layout():
    model = _model(40, device="meta")
    sparsifier, optimizer = _sparsifier(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(model[2].values), id(model[2].bias)} <= held
    assert not any(p.is_meta for group in optimizer.param_groups for p in group["params"])
    x, y = torch.randn(16, 12), torch.randint(0, 40, (16,))
    before = model[2].indices.clone()
    for _ in range(4):  # the 4th step is an update
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    assert sparsifier.last_update["layers"]["2.weight"]["grown"] > 0
    assert not torch.equal(before, model[2].indices)
    assert (model[2].bias.grad is not None) and model[2].values.shape == (40, 6)  # the output layer: never ablated


def test_meta_state_dict_round_trips_into_a_materialised_twin():
    meta = _model(40, device="meta")
    meta_sparsifier, _ = _sparsifier(meta)
    real = _model(40)
    real_sparsifier, _ = _sparsifier(real, seed=5)  # another first layout
    real.load_state_dict(meta.state_dict())
    real_sparsifier.load_state_dict(meta_sparsifier.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(real(x), meta(x))


def test_meta_layers_need_compact_storage_and_a_random_start():
    optimizer_for = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    model = _model(40, device="meta")
    with pytest.raises(InvalidConfigError, match=r"2.weight \(40, 24\) lives on the meta device.*storage='masked'"):
        srigl.SRigL(model, optimizer_for(model), sparsity=0.5, total_steps=10)
    with pytest.raises(InvalidConfigError, match="mask_init='magnitude'"):
        srigl.SRigL(model, optimizer_for(model), sparsity=0.5, total_steps=10, compact=True, mask_init="magnitude")
    attention = nn.Sequential(nn.Linear(4, 8))
    attention.add_module("attn", nn.MultiheadAttention(8, 2, device="meta"))
    with pytest.raises(InvalidConfigError, match="attn.in_proj_weight lives on the meta device and cannot start compact"):
        srigl.SRigL(attention, optimizer_for(attention), sparsity=0.5, total_steps=10, compact=True,
                    structure=srigl.ConstantFanIn())
    assert all(p.is_meta for p in model[2].parameters())  # refused before anything was touched


def test_a_head_that_does_not_fit_is_refused_with_the_memory_it_needs(monkeypatch):
    monkeypatch.setattr(compact_storage, "available_bytes", lambda device: 10**9)
    model = nn.Sequential(nn.Linear(4, 768), nn.Linear(768, 20_000_000, device="meta"))
    optimizer = torch.optim.Adam(model.parameters())
    # 20M x 32 entries: values 2.56 GB + gradient 2.56 GB + int16 indices 1.28 GB = 6.40 GB.
    with pytest.raises(LayerTooLargeError, match=r"1.weight \(20000000, 768\) at fan-in 32 needs 6.40 GB .* 1.00 GB are free"):
        srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.0, "1.weight": 1 - 32 / 768}, total_steps=10, compact=True)


def test_available_bytes_reads_this_machine():
    free = compact_storage.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert compact_storage.available_bytes(torch.device("meta")) is None


@pytest.mark.parametrize("gamma_sal", [0.0, 0.9])
def test_a_compact_update_never_forms_a_dense_out_by_fan_in_tensor(monkeypatch, gamma_sal):
    from srigl import blockwise

    out, fan_in, k = 3000, 256, 8
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64 * fan_in)  # 64 rows a block
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, fan_in), nn.Linear(fan_in, out, device="meta"), nn.Linear(out, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.0, "1.weight": 1 - k / fan_in, "2.weight": 0.0},
                             total_steps=40, delta=2, compact=True, gamma_sal=gamma_sal)
    x = torch.randn(32, 16)
    for step in (1, 2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if step == 2:  # the update step
            with LargestTensor() as watch:
                sparsifier.step()
        else:
            sparsifier.step()
    assert sparsifier.last_update["layers"]["1.weight"]["grown"] > 0
    # Per-entry tensors of the layout (out x k) and one block of scores (64 x fan_in) are allowed;
    # the dense (out, fan_in) gradient, mask or scores (768,000 entries) are not.
    assert watch.largest <= max(out * k, 64 * fan_in, 32 * out), watch.largest
    assert watch.largest < out * fan_in // 4
