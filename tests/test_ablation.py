"""SRigL's neuron ablation, and one golden per choice where the paper leaves the definition open.

``docs/algorithm.md`` lists the six choices (a)-(f) next to the seven steps, with the reference
implementation's alternative and the reason for srigl's. Each golden below is built so that the
two alternatives give different masks. The drive pattern (lr = 0, a loss whose dense gradient is a
hand-chosen matrix) is the one of ``test_algorithms.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import srigl
from srigl import ablation


def _layer(weight, mask, gamma_sal, alpha=0.4, sparsity=None, algorithm=srigl.SRigL, **kw):
    """A bias-free Linear (sparse, ablatable) followed by a dense identity output layer."""
    weight, mask = torch.tensor(weight), torch.tensor(mask, dtype=torch.bool)
    rows, fan_in = weight.shape
    model = nn.Sequential(nn.Linear(fan_in, rows, bias=False), nn.Linear(rows, rows, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(rows))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    if algorithm is srigl.SRigL:
        kw["gamma_sal"] = gamma_sal
    sp = algorithm(
        model, opt, sparsity={"0.weight": sparsity if sparsity is not None else 1 - float(mask.float().mean())},
        total_steps=10_000, delta=1, alpha=alpha, policy=srigl.SparsityPolicy(exclude=("1.*",)), **kw,
    )
    with torch.no_grad():
        model[0].weight_mask.copy_(mask)
        model[0].weight.copy_(weight * mask)
    return model, opt, sp


def _update(model, opt, sp, grad):
    """One step whose dense gradient of the sparse weight is exactly ``grad``; returns the new mask."""
    grad = torch.tensor(grad)
    (model[0](grad) * torch.eye(grad.shape[0])).sum().backward()  # dL/dW = grad
    opt.step()
    sp.step()
    opt.zero_grad()
    return sp.masks()["0.weight"].int().tolist()


# ------------------------------------------------------------------------------- (a) the threshold
@pytest.mark.parametrize(
    "gamma_sal, k, need",
    [
        (0.55, 100, 55),  # 0.55 * 100 is 55.000000000000007 in floating point: 55 must suffice
        (0.3, 5, 2),  # 1.5 -> 2 (the reference: max(1, int(1.5)) = 1)
        (0.3, 10, 3),
        (0.95, 20, 19),
        (0.1, 3, 1),
        (0.0, 7, 0),
        (1.0, 7, 7),
    ],
)
def test_a_min_salient_is_ceil_of_gamma_k_in_integers(gamma_sal, k, need):
    assert ablation.min_salient(gamma_sal, k) == need


def test_a_a_neuron_with_exactly_gamma_k_salient_weights_survives():
    salient = torch.zeros(3, 100, dtype=torch.bool)
    salient[0, :55] = True  # exactly 0.55 * 100
    salient[1, :54] = True
    salient[2, :90] = True
    assert ablation.surviving_neurons(salient.sum(dim=1), 100, 0.55, 1).tolist() == [True, False, True]


# ---------------------------------------------------------------- (b) k is the current fan-in
def test_b_threshold_uses_the_current_fan_in_not_the_initial_one():
    # Budget 6 = 3 neurons x initial fan-in 2; an earlier ablation left 2 neurons with k = 3.
    # K = 2. Salient: by magnitude the top 4 active (row 0: 3, row 1: 0.05), by gradient the top 2
    # (row 0's (0,3), (0,4)): counts 5, 1, 0. gamma_sal = 0.5 of the current k = 3 needs 2: row 1
    # is ablated (with the initial k = 2 it would need 1 and survive). k' = 6 // 1 = 6 = fan-in.
    model, opt, sp = _layer(
        [[0.9, 0.8, 0.7, 0, 0, 0], [0, 0, 0, 0.05, 0.04, 0.03], [0, 0, 0, 0, 0, 0]],
        [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]],
        gamma_sal=0.5, sparsity=2 / 3,
    )
    assert sp.layers[0].budget == 6
    grad = [[0.1, 0.1, 0.1, 0.9, 0.8, 0.1], [0.01, 0.01, 0.01, 0.01, 0.01, 0.01], [0.02] * 6]
    assert _update(model, opt, sp, grad) == [[1] * 6, [0] * 6, [0] * 6]


# ------------------------------------------------ (c) ablated weights come on top of K
def test_c_survivors_drop_k_weights_whatever_ablation_removes():
    # K = 2. Salient counts: by magnitude 0.9, 0.8, 0.7, 0.6 (rows 0, 2), by gradient (2,1), (2,2):
    # 2, 0, 4. gamma_sal = 0.6 of k = 2 needs 2: neuron 1 is ablated, k' = 6 // 2 = 3.
    # srigl drops K = 2 more from the survivors (0.7 and 0.6), then regrows each to 3 by |g|:
    # row 0 + (0,3); row 2 takes (2,1), (2,2) and (2,0) (0.02 beats (2,3)'s 0.01).
    # Counting the ablated weights towards K (the reference) would keep 0.7 and 0.6: row 2 = 1 1 0 1.
    model, opt, sp = _layer(
        [[0.9, 0.8, 0, 0], [0, 0.05, 0.04, 0], [0.7, 0, 0, 0.6]],
        [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]],
        gamma_sal=0.6,
    )
    grad = [[0.1, 0.1, 0.2, 0.3], [0.01, 0.01, 0.01, 0.01], [0.02, 0.4, 0.35, 0.01]]
    assert _update(model, opt, sp, grad) == [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    # (2,0) was dropped and regrown in the same step: it keeps its value; (2,3) is gone.
    assert model[0].weight[2].tolist() == pytest.approx([0.7, 0.0, 0.0, 0.0])


# ------------------------------------------- (d) k' from the layer's actual budget
def test_d_new_fan_in_comes_from_the_actual_budget():
    # Linear(10, 3) at sparsity 0.65: round(0.35 * 10) = 4 per neuron, budget 12 (the nominal
    # int(30 * 0.35) = 10 would give k' = 5 after one ablation; srigl gives 12 // 2 = 6).
    weight = [[0.9, 0.8, 0.7, 0.6, 0, 0, 0, 0, 0, 0],
              [0, 0, 0, 0, 0.01, 0.02, 0.03, 0.04, 0, 0],
              [0, 0, 0, 0, 0, 0, 0.5, 0.6, 0.7, 0.8]]
    mask = [[1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    model, opt, sp = _layer(weight, mask, gamma_sal=0.9, sparsity=0.65)
    assert sp.layers[0].budget == 12
    grad = [[0.1, 0.1, 0.1, 0.1, 0.9, 0.8, 0.3, 0.2, 0.1, 0.1],
            [0.001] * 10,
            [0.1, 0.1, 0.3, 0.2, 0.9, 0.8, 0.1, 0.1, 0.1, 0.1]]
    new = _update(model, opt, sp, grad)
    assert [sum(r) for r in new] == [6, 0, 6]
    assert sp.summary()["0.weight"]["fan_in"] == 6 and sp.summary()["0.weight"]["nnz"] == 12


# --------------------------------------- (e) when too few neurons would survive
def test_e_too_few_survivors_lower_the_threshold_and_ties_all_survive():
    salient = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    # k = 4, gamma_sal = 1: nobody has 4. The budget needs 2 neurons: the threshold drops to the
    # 2nd largest count (1), and both neurons holding 1 survive (not the lower index alone).
    assert ablation.surviving_neurons(salient.sum(dim=1), 4, 1.0, 2).tolist() == [True, True, True, False]
    assert ablation.surviving_neurons(salient.sum(dim=1), 4, 1.0, 1).tolist() == [True, False, False, False]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), fan_in=st.integers(1, 8), gamma=st.floats(0, 1), data=st.data())
def test_e_survivors_do_not_depend_on_neuron_order(rows, fan_in, gamma, data):
    salient = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=fan_in, max_size=fan_in),
                                              min_size=rows, max_size=rows)))
    k = data.draw(st.integers(1, fan_in))
    min_neurons = data.draw(st.integers(1, rows))
    alive = ablation.surviving_neurons(salient.sum(dim=1), k, gamma, min_neurons)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rows * 31 + fan_in))
    assert torch.equal(ablation.surviving_neurons(salient[perm].sum(dim=1), k, gamma, min_neurons), alive[perm])
    assert int(alive.sum()) >= min_neurons


# ------------------------------------- (f) active weights that are exactly zero
def test_f_every_zero_valued_active_weight_is_dropped_even_beyond_k():
    # K = int(0.3 * 4) = 1, but two active weights are exactly 0 ((0,2) and (1,1)): both go, and
    # two weights regrow by |g| ((0,1) and (1,0)). Dropping exactly K would keep one of the zeros.
    model, opt, sp = _layer(
        [[0.9, 0, 0.0, 0], [0, 0.0, 0, -0.7]], [[1, 0, 1, 0], [0, 1, 0, 1]], gamma_sal=0.0, alpha=0.3,
        algorithm=srigl.RigL,
    )
    grad = [[0.2, 0.8, 0.1, 0.3], [0.6, 0.05, 0.4, 0.25]]
    assert _update(model, opt, sp, grad) == [[1, 1, 0, 0], [1, 0, 0, 1]]
