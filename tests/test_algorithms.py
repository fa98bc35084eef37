"""Golden tests: hand-computed RigL and SRigL updates, and a tiny end-to-end training run.

Every golden case drives the public API (construct, backward, optimizer.step, sparsifier.step) with
lr = 0, so the weights at the update are exactly the ones written here, and the loss is built so that
the dense gradient equals a hand-chosen matrix G: with an identity after the sparse layer and inputs
X = G, the loss sum_b (W x_b)_b has dL/dW = sum_b e_b x_b^T = G.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import srigl


def _drop_fraction_at_step_1(alpha: float, total_steps: int) -> float:
    t_end = int(0.75 * total_steps)
    return alpha / 2 * (1 + math.cos(math.pi / t_end))


def _one_layer(weight: torch.Tensor, mask: torch.Tensor, algorithm, alpha: float, **kw):
    """A bias-free Linear with a hand-set weight and mask, updated after step 1 (delta=1)."""
    out_features, in_features = weight.shape
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    density = mask.sum().item() / mask.numel()
    sp = algorithm(model, opt, sparsity={"0.weight": 1 - density}, total_steps=10_000, delta=1, alpha=alpha, **kw)
    with torch.no_grad():
        model[0].weight_mask.copy_(mask)
        model[0].weight.copy_(weight * mask)
    return model, opt, sp


def _step_with_grad(model, opt, sp, grad: torch.Tensor):
    """One training step whose dense gradient w.r.t. the first layer's weight is exactly ``grad``."""
    out_features = grad.shape[0]
    y = model(grad)  # (out, out): row b is W x_b
    loss = (y * torch.eye(out_features)).sum()
    loss.backward()
    opt.step()
    stats = sp.step()
    opt.zero_grad()
    return stats


W4 = torch.tensor([[0.9, 0.0, -0.1, 0.0], [0.0, 0.5, 0.0, -0.7]])
M4 = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize(
    "alpha, grad, expected_mask",
    [
        # K = 2: keep |0.9|, |-0.7|; grow the two largest |g| outside the kept set: 0.8 at (0,1), 0.6 at (1,0).
        (0.6, [[0.2, 0.8, 0.1, 0.3], [0.6, 0.05, 0.4, 0.7]], [[1, 1, 0, 0], [1, 0, 0, 1]]),
        # K = 1: drop only |-0.1| at (0,2); grow 0.8 at (0,1).
        (0.3, [[0.2, 0.8, 0.1, 0.3], [0.6, 0.05, 0.4, 0.7]], [[1, 1, 0, 0], [0, 1, 0, 1]]),
        # K = 2, unstructured: both regrown weights land in row 0 (0.9 and 0.8 beat 0.6).
        (0.6, [[0.2, 0.8, 0.1, 0.9], [0.6, 0.05, 0.4, 0.7]], [[1, 1, 0, 1], [0, 0, 0, 1]]),
    ],
)
def test_rigl_golden(alpha, grad, expected_mask):
    assert int(_drop_fraction_at_step_1(alpha, 10_000) * 4) in (1, 2)
    model, opt, sp = _one_layer(W4, M4, srigl.RigL, alpha)
    _step_with_grad(model, opt, sp, torch.tensor(grad))
    expected = torch.tensor(expected_mask, dtype=torch.bool)
    assert torch.equal(sp.masks()["0.weight"], expected)
    # Kept weights keep their value, dropped ones are zero, regrown ones start at zero.
    assert torch.equal(model[0].weight.detach(), W4 * (expected & M4))
    momentum = opt.state[model[0].weight]["momentum_buffer"]
    assert torch.all(momentum[expected & ~M4] == 0)
    assert torch.all(momentum[~expected] == 0)


def test_srigl_without_ablation_golden_keeps_constant_fan_in():
    # Same inputs as the last RigL case: RigL put 3 weights in row 0; SRigL must keep k = 2 per row.
    model, opt, sp = _one_layer(W4, M4, srigl.SRigL, 0.6, gamma_sal=0.0)
    _step_with_grad(model, opt, sp, torch.tensor([[0.2, 0.8, 0.1, 0.9], [0.6, 0.05, 0.4, 0.7]]))
    # Drop K=2 across the layer: keep 0.9 (0,0) and -0.7 (1,3). Regrow per row to k=2 by |g|:
    # row 0 takes 0.9 at (0,3), row 1 takes 0.6 at (1,0).
    expected = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(sp.masks()["0.weight"], expected)
    assert torch.equal(model[0].weight.detach(), W4 * (expected & M4))


# Three neurons with k = 2 (budget 6); neuron 1 holds two tiny weights.
W3 = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.0, 0.05, 0.04, 0.0], [0.7, 0.0, 0.0, 0.6]])
M3 = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
G3 = torch.tensor([[0.1, 0.13, 0.2, 0.14], [0.3, 0.1, 0.11, 0.12], [0.15, 0.12, 0.11, 0.5]])


def _ablation_model(gamma_sal: float):
    """Linear(4, 3) (sparse, ablatable) -> Linear(3, 3) = identity (dense, the output layer)."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = srigl.SRigL(
        model,
        opt,
        sparsity={"0.weight": 0.5},
        total_steps=10_000,
        delta=1,
        alpha=0.4,
        gamma_sal=gamma_sal,
        policy=srigl.SparsityPolicy(exclude=("1.*",)),
    )
    with torch.no_grad():
        model[0].weight_mask.copy_(M3)
        model[0].weight.copy_(W3)
    return model, opt, sp


def test_srigl_ablation_golden():
    # K = int(0.4 * 6) = 2. Salient by magnitude: top n_active - K = 4 of |w| -> rows 0 and 2 (2 each).
    # Salient by gradient: top K = 2 of |g| -> 0.5 at (2,3) and 0.3 at (1,0). Counts: 2, 1, 2.
    # gamma_sal = 0.6 -> a neuron needs 0.6 * 2 = 1.2 salient weights: neuron 1 (1) is ablated.
    # k' = budget 6 // 2 surviving = 3. Drop the K=2 smallest active weights of surviving rows:
    # 0.7 and 0.6 at (2,0), (2,3). Regrow each surviving row to 3 by |g|:
    # row 0: kept (0,0), (0,1) + 0.2 at (0,2); row 2: 0.5 at (2,3), 0.15 at (2,0), 0.12 at (2,1).
    assert int(_drop_fraction_at_step_1(0.4, 10_000) * 6) == 2
    model, opt, sp = _ablation_model(gamma_sal=0.6)
    stats = _step_with_grad(model, opt, sp, G3)
    expected = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(sp.masks()["0.weight"], expected)
    # (2,0) and (2,3) were dropped and regrown in the same step: they keep their values.
    expected_weight = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.0, 0.6]])
    assert torch.equal(model[0].weight.detach(), expected_weight)
    summary = sp.summary()["0.weight"]
    assert summary["fan_in"] == 3 and summary["active_neurons"] == 2 and summary["nnz"] == 6
    assert stats["layers"]["0.weight"]["active_neurons"] == 2
    # The new connections' momentum starts at zero.
    momentum = opt.state[model[0].weight]["momentum_buffer"]
    assert torch.all(momentum[expected & ~M3] == 0)


def test_srigl_low_gamma_keeps_every_neuron():
    # gamma_sal = 0.3 -> 0.6 salient weights needed; neuron 1 has 1, so nobody is ablated and k' = 2.
    # Drop K=2 smallest: 0.05, 0.04 of neuron 1. Regrow neuron 1 to 2 by |g|: 0.3 at (1,0), 0.12 at (1,3).
    model, opt, sp = _ablation_model(gamma_sal=0.3)
    _step_with_grad(model, opt, sp, G3)
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(sp.masks()["0.weight"], expected)
    assert torch.equal(model[0].weight.detach()[1], torch.zeros(4))


def test_output_layer_is_never_ablated():
    # The same layer as the output (last eligible) layer: gamma_sal = 0.6 would ablate neuron 1, but may not.
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = srigl.SRigL(model, opt, sparsity={"0.weight": 0.5}, total_steps=10_000, delta=1, alpha=0.4, gamma_sal=0.6)
    with torch.no_grad():
        model[0].weight_mask.copy_(M3)
        model[0].weight.copy_(W3)
    _step_with_grad(model, opt, sp, G3)
    counts = sp.masks()["0.weight"].sum(dim=1)
    assert counts.tolist() == [2, 2, 2]


def test_set_regrows_same_count_and_static_never_changes():
    torch.manual_seed(0)
    for cls, should_change in ((srigl.SET, True), (srigl.Static, False)):
        model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = cls(model, opt, sparsity=0.8, distribution="uniform", total_steps=100, delta=2)
        before = sp.masks()
        for _ in range(10):
            model(torch.randn(8, 20)).pow(2).mean().backward()
            opt.step()
            sp.step()
            opt.zero_grad()
        after = sp.masks()
        for name in before:
            assert after[name].sum() == before[name].sum()
        assert any(not torch.equal(before[n], after[n]) for n in before) == should_change


def test_dense_gradient_is_collected_only_for_update_steps():
    model = nn.Sequential(nn.Linear(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.RigL(model, opt, sparsity=0.5, distribution="uniform", total_steps=100, delta=5)
    held = []
    for step in range(1, 11):
        model(torch.randn(3, 6)).sum().backward()
        held.append(bool(sp.held_tensors()))
        # The optimizer sees only the masked gradient.
        assert torch.all(model[0].weight.grad[~model[0].weight_mask] == 0)
        opt.step()
        sp.step()
        opt.zero_grad()
    assert held == [False, False, False, False, True] * 2


def test_state_dict_round_trip_and_mismatch():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, opt, sparsity=0.7, total_steps=50, delta=2)
    for _ in range(4):
        model(torch.randn(5, 10)).sum().backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    state = sp.state_dict()
    model2 = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    sp2 = srigl.SRigL(model2, opt2, sparsity=0.7, total_steps=50, delta=2, seed=1)
    sp2.load_state_dict(state)
    assert sp2.step_count == 4
    for name, mask in sp.masks().items():
        assert torch.equal(sp2.masks()[name], mask)
    other = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 3))
    sp3 = srigl.SRigL(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.7, total_steps=50)
    with pytest.raises(srigl.StateDictMismatchError, match="shape"):
        sp3.load_state_dict(state)
    sp2.remove_hooks()  # a second sparsifier on the same tensors is refused while the first is attached
    sp4 = srigl.SRigL(model2, opt2, sparsity=0.8, total_steps=50)
    with pytest.raises(srigl.StateDictMismatchError, match="sparsity"):
        sp4.load_state_dict(state)


def test_summary_reports_dense_tensors_and_reasons():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.RigL(model, opt, sparsity=0.9, total_steps=100, policy=srigl.SparsityPolicy(dense_first=True))
    summary = sp.summary()
    assert summary["0.weight"]["sparse"] is False and "first layer" in summary["0.weight"]["reason"]
    assert summary["1.weight"]["sparse"] is False and "ndim" in summary["1.weight"]["reason"]
    assert summary["3.weight"]["sparse"] is True
    assert summary["3.weight"]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize("algorithm", [srigl.RigL, srigl.SRigL])
def test_end_to_end_90_percent_trains_well_above_chance(algorithm):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = _digits()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs, batch = 15, 50
    total = epochs * (len(x_train) // batch)
    sp = algorithm(model, opt, sparsity=0.9, total_steps=total, delta=20)
    updates = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train) - batch + 1, batch):
            idx = order[i : i + batch]
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            updates += sp.step() is not None
            opt.zero_grad()
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert updates >= 10
    assert sp.global_sparsity() == pytest.approx(0.9, abs=0.01)
    assert accuracy > 0.8, f"{algorithm.__name__} reached only {accuracy:.3f} (chance is 0.1)"


def test_refused_configuration_leaves_the_model_untouched():
    # The second layer's fan-in (6) is not a multiple of m=4: refused after the first layer was planned.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(6, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(srigl.InvalidSparsityError, match="multiple of m=4"):
        srigl.RigL(model, opt, sparsity=0.5, total_steps=100, structure=srigl.NM(2, 4))
    with pytest.raises(srigl.InvalidConfigError, match="ConstantFanIn"):
        srigl.SRigL(model, opt, sparsity=0.5, total_steps=100, structure=srigl.NM(2, 4))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not hasattr(model[0], "weight_mask")
    assert not opt._optimizer_step_post_hooks


def test_explicit_sparsity_map_with_unknown_name_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(srigl.InvalidSparsityError, match="typo"):
        srigl.RigL(model, opt, sparsity={"0.weight": 0.5, "2.weight": 0.5, "typo": 0.9}, total_steps=100)
    sp = srigl.RigL(model, opt, sparsity={"0.weight": 0.5, "2.weight": 0.0}, total_steps=100)
    assert sp.summary()["2.weight"]["reason"] == "explicit sparsity 0"


def _train_steps(model, opt, sp, steps: int, probe_at: set[int] = frozenset(), seed: int = 0):
    """Train on fixed random data; before the steps in ``probe_at``, run a gradient-norm probe
    (an extra backward on other data) and ``zero_grad()`` first, as a user measuring it would."""
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(steps)]
    probe_x = torch.randn(16, 20, generator=gen) * 3
    for step, (x, y) in enumerate(data, start=1):
        if step in probe_at:
            nn.functional.cross_entropy(model(probe_x), torch.zeros(16, dtype=torch.long)).backward()
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_gradient_probe_before_an_update_does_not_change_the_masks(compact, set_to_none):
    masks = []
    for probe_at in (set(), {5, 10}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kw = {"compact": True} if compact else {}
        sp = srigl.SRigL(model, opt, sparsity=0.8, total_steps=40, delta=5, **kw)
        if not set_to_none:
            opt.zero_grad = lambda set_to_none=False, _z=opt.zero_grad: _z(set_to_none=False)
        _train_steps(model, opt, sp, 12, probe_at)
        assert sp.step_count == 12 and sp.last_update["step"] == 10
        masks.append(sp.masks())
    assert masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name


def test_gradients_of_dropped_weights_are_masked_at_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.RigL(model, opt, sparsity=0.8, total_steps=40, delta=3)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    for step in range(1, 4):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        stats = sp.step()
    assert stats is not None and sum(s["grown"] for s in stats["layers"].values()) > 0
    for layer in sp.layers:
        # Before zero_grad: the gradient a later optimizer step would apply is masked already.
        assert bool((layer.param.grad[~layer.live_mask] == 0).all()), layer.name


def test_summary_prints_as_a_table_and_stays_a_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=40)
    summary = sp.summary()
    assert isinstance(summary, dict) and summary["0.weight"]["sparse"] and "fan_in" in summary["0.weight"]
    lines = str(summary).splitlines()
    assert lines[0].split() == ["tensor", "shape", "sparsity", "fan-in", "neurons", "note"]
    row = next(line for line in lines if line.startswith("0.weight"))
    k = summary["0.weight"]["fan_in"]
    assert f"{k}/20" in row and "32/32" in row and "ConstantFanIn(), ablation" in row
    assert f"{100 * summary['0.weight']['sparsity']:.1f} %" in row
    bias_row = next(line for line in lines if line.startswith("0.bias"))
    assert "dense" in bias_row and "bias or norm" in bias_row
    assert len(lines) == 2 + len(summary)
