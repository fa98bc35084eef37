"""Initial masks: independent of the weights for every seed pair, by magnitude for pretrained
models, adopted from the non-zeros of sparse ones; the sparse-init rescale of fresh weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import srigl
from srigl import initial


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _sparsifier(name: str, model: nn.Module, seed: int, **kw) -> srigl.Sparsifier:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return srigl.get_algorithm(name)(model, opt, sparsity=0.9, total_steps=1000, seed=seed, **kw)


@pytest.mark.parametrize("algorithm", sorted(srigl.ALGORITHMS))
@pytest.mark.parametrize("model_seed, mask_seed", [(0, 0), (1, 1), (42, 42), (0, 1), (5, 3)])
def test_random_masks_are_independent_of_the_weights(algorithm, model_seed, mask_seed):
    # torch.manual_seed(s) made the weights; a mask generator seeded with s itself replayed those
    # uniform draws, so the first layer kept exactly its largest (all positive) weights.
    torch.manual_seed(model_seed)
    model = _mlp()
    dense = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    sp = _sparsifier(algorithm, model, mask_seed, sparse_init=False)
    for layer, weight in zip((m for m in model if isinstance(m, nn.Linear)), dense):
        mask = getattr(layer, "weight_mask", None)
        if mask is None:
            continue  # kept dense by the distribution
        active = weight[mask]
        n = active.numel()
        # Kaiming-uniform weights: sign and |w| / bound are independent, with means 1/2 each.
        bound = 1 / math.sqrt(weight.shape[1])
        positive = float((active > 0).float().mean())
        magnitude = float((active.abs() / bound).mean())
        assert abs(positive - 0.5) < 5 * math.sqrt(0.25 / n), (algorithm, n, positive)
        assert abs(magnitude - 0.5) < 5 * math.sqrt(1 / 12 / n), (algorithm, n, magnitude)
    assert sp.mask_init == "auto" and set(sp.initial_masks.values()) == {"random"}  # fresh weights: random


def test_mask_stream_seed_is_a_fixed_hash_that_separates_streams():
    assert initial.mask_stream_seed(0) != 0
    assert initial.mask_stream_seed(0) == initial.mask_stream_seed(0)
    seeds = {initial.mask_stream_seed(s) for s in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    # The first draws of the two streams differ (the bug: they were identical).
    torch.manual_seed(7)
    weights_stream = torch.rand(8)
    masks_stream = torch.rand(8, generator=torch.Generator().manual_seed(initial.mask_stream_seed(7)))
    assert not torch.equal(weights_stream, masks_stream)


def test_sparse_init_rescales_each_row_to_its_sparse_fan_in_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5))
    before = model[0].weight.detach().clone()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"0.weight": 0.75, "2.weight": 0.5},
                     total_steps=100)
    mask = model[0].weight_mask
    k = int(mask.sum(dim=1)[0])
    assert k == 10 and sp.sparse_init
    torch.testing.assert_close(model[0].weight, before * mask * math.sqrt(40 / 10), rtol=0, atol=1e-7)


def test_sparse_init_false_and_trained_masks_keep_the_weights():
    for kw in ({"sparse_init": False}, {"mask_init": "magnitude"}, {"mask_init": "magnitude", "sparse_init": True}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5))
        before = model[0].weight.detach().clone()
        srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"0.weight": 0.75, "2.weight": 0.5},
                    total_steps=100, **kw)
        assert torch.equal(model[0].weight, before * model[0].weight_mask), kw


def test_magnitude_masks_keep_the_largest_weights_per_unit_golden():
    weight = torch.tensor([[0.1, -0.9, 0.3, 0.0], [0.5, 0.2, -0.6, 0.05]])
    assert initial.magnitude_mask(weight, 2, srigl.ConstantFanIn()).tolist() == [
        [False, True, True, False], [True, False, True, False]]
    assert initial.magnitude_mask(weight, 3, srigl.Unstructured()).tolist() == [
        [False, True, False, False], [True, False, True, False]]
    assert initial.magnitude_mask(weight, 1, srigl.NM(1, 2)).tolist() == [
        [False, True, True, False], [True, False, True, False]]


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


@pytest.fixture(scope="module")
def trained_dense():
    x, y, xt, yt = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, xt, yt


@pytest.mark.parametrize("algorithm", ["srigl", "rigl"])
def test_a_pretrained_model_keeps_its_accuracy_with_magnitude_masks(trained_dense, algorithm):
    import copy

    model, xt, yt = trained_dense
    dense_acc = _accuracy(model, xt, yt)
    assert dense_acc > 0.9
    accs = {}
    for mask_init in ("magnitude", "random"):
        sparse = copy.deepcopy(model)
        srigl.get_algorithm(algorithm)(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), sparsity=0.5,
                                       total_steps=100, mask_init=mask_init)
        accs[mask_init] = _accuracy(sparse, xt, yt)
    # Magnitude masks keep what the model learnt; random ones (the old behaviour) do not.
    assert accs["magnitude"] > dense_acc - 0.05, (accs, dense_acc)
    assert accs["random"] < accs["magnitude"] - 0.05, (accs, dense_acc)


def test_nonzero_adopts_a_condensed_then_expanded_model():
    from srigl.condensed import CondensedLinear

    torch.manual_seed(0)
    x = torch.randn(64, 32)
    y = torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = srigl.SRigL(model, opt, sparsity=0.9, total_steps=60, delta=5, gamma_sal=0.9, seed=1)
    for _ in range(60):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    masks = sp.masks()
    ablated = sum(int((~m.any(dim=1)).sum()) for m in masks.values())
    assert ablated > 0  # the round trip covers ablated neurons too
    # Condense each layer, expand it again into a plain dense model.
    expanded = nn.Sequential(*[
        CondensedLinear.from_dense(m, m.weight_mask).to_dense() if isinstance(m, nn.Linear) else m for m in model
    ])
    sp.remove_hooks()
    adopted = srigl.SRigL(expanded, torch.optim.SGD(expanded.parameters(), lr=0.05), sparsity=0.9, total_steps=60,
                          gamma_sal=0.9, mask_init="nonzero")
    for name, mask in adopted.masks().items():
        weight = expanded.get_parameter(name)
        # Same neurons, same fan-ins, same non-zeros; an active weight that is exactly 0 may come
        # back at another zero position of its neuron (the function is the same).
        assert torch.equal(mask.sum(dim=1), masks[name].sum(dim=1)), name
        assert torch.equal(mask & (weight != 0), masks[name] & (weight != 0)), name
        assert bool((mask == masks[name])[weight != 0].all()), name
    assert {l.name: l.budget for l in adopted.layers} == {l.name: l.budget for l in sp.layers}
    torch.testing.assert_close(expanded(x), model(x))


def test_nonzero_refuses_a_dense_model_with_the_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    with pytest.raises(srigl.NotConstantFanInError,
                       match=r"0\.weight: mask_init='nonzero' found neurons with up to 20 non-zeros \(200 in all, "
                             r"10 non-zero neurons\), but the target sparsity gives this layer 100 weights: fan-in 10"):
        srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"0.weight": 0.5, "2.weight": 0.5},
                    total_steps=10, mask_init="nonzero")
    assert not hasattr(model[0], "weight_mask")  # refused before touching the model


def test_nonzero_tops_up_units_holding_zero_valued_active_weights_golden():
    weight = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # n = 1 per row: a budget of 3 over 2 non-zero neurons gives k = 1, which row 0 exceeds.
    with pytest.raises(srigl.NotConstantFanInError, match="up to 2 non-zeros"):
        initial.nonzero_mask(weight, srigl.ConstantFanIn(), 1, "w")
    # n = 2 per row: budget 6 over 2 survivors gives k = 3; row 1 (one non-zero) is topped up at
    # its lowest free indices, the all-zero row 2 stays ablated.
    assert initial.nonzero_mask(weight, srigl.ConstantFanIn(), 2, "w").int().tolist() == [
        [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert initial.nonzero_mask(weight, srigl.Unstructured(), 4, "w").int().tolist() == [
        [1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    nm_weight = torch.tensor([[0.0, 5.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]])
    assert initial.nonzero_mask(nm_weight, srigl.NM(1, 2), 1, "w").int().tolist() == [[0, 1, 1, 0], [1, 0, 1, 0]]


def test_nonzero_refuses_too_many_non_zeros():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(srigl.InvalidConfigError, match=r"found 3 non-zeros of 8, but the target sparsity keeps 2"):
        srigl.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.75, total_steps=10,
                   mask_init="nonzero")
    with pytest.raises(srigl.NotConstantFanInError, match=r"found 1 of 4 groups of 2 with more than 1 non-zeros"):
        srigl.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), structure=srigl.NM(1, 2),
                     mask_init="nonzero")
    sp = srigl.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"0.weight": 0.625}, total_steps=10,
                    mask_init="nonzero")
    assert sp.masks()["0.weight"].tolist() == [[True, True, False, False], [True, False, False, False]]


def test_unknown_mask_init_is_refused():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(srigl.InvalidConfigError, match=r"mask_init must be one of \['auto', 'random', 'magnitude', 'nonzero'\]"):
        srigl.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, mask_init="ones")


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), fan_in=st.integers(1, 12), data=st.data())
def test_rescale_gives_every_row_the_dense_variance_scale(rows, fan_in, data):
    k = data.draw(st.integers(1, fan_in))
    weight = torch.randn(rows, fan_in)
    mask = initial.random_mask(rows, fan_in, k, srigl.ConstantFanIn(), torch.Generator().manual_seed(0))
    scaled = weight.clone()
    initial.rescale_to_sparse_fan_in(scaled, mask)
    torch.testing.assert_close(scaled, weight * math.sqrt(fan_in / k))
