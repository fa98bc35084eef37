"""Layer-wise sparsity distributions: the budget equation, ERK's proportionality and dense overflow,
and the errors that name the largest feasible target."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from srigl.distributions import (
    check_sparsity,
    erk,
    get_distribution,
    layer_sparsities,
    max_feasible_sparsity,
    uniform,
)
from srigl.errors import InfeasibleSparsityError, InvalidSparsityError

MLP = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}

RESNET_LIKE = {
    "conv1.weight": (16, 3, 3, 3),
    "layer1.0.conv1.weight": (16, 16, 3, 3),
    "layer1.0.conv2.weight": (16, 16, 3, 3),
    "layer2.0.conv1.weight": (32, 16, 3, 3),
    "layer2.0.conv2.weight": (32, 32, 3, 3),
    "layer2.0.downsample.0.weight": (32, 16, 1, 1),
    "layer3.0.conv1.weight": (64, 32, 3, 3),
    "layer3.0.conv2.weight": (64, 64, 3, 3),
    "layer3.0.downsample.0.weight": (64, 32, 1, 1),
    "fc.weight": (10, 64),
}

VIT_LIKE = {
    "patch_embed.proj.weight": (192, 3, 16, 16),
    "blocks.0.attn.in_proj_weight": (576, 192),
    "blocks.0.attn.out_proj.weight": (192, 192),
    "blocks.0.mlp.fc1.weight": (768, 192),
    "blocks.0.mlp.fc2.weight": (192, 768),
    "blocks.1.attn.in_proj_weight": (576, 192),
    "blocks.1.attn.out_proj.weight": (192, 192),
    "blocks.1.mlp.fc1.weight": (768, 192),
    "blocks.1.mlp.fc2.weight": (192, 768),
    "head.weight": (100, 192),
}

MODELS = {"mlp": MLP, "resnet": RESNET_LIKE, "vit": VIT_LIKE}


def _size(shape) -> int:
    return math.prod(shape)


def _ratio(shape, power: float = 1.0) -> float:
    # Written out again here (not imported) so the test checks the formula, not itself.
    return (sum(shape) / math.prod(shape)) ** power


def _budget_error(shapes, sparsities, target) -> float:
    """Relative error of sum_l d_l N_l against (1 - S) sum_l N_l."""
    total = sum(_size(s) for s in shapes.values())
    kept = sum((1.0 - sparsities[n]) * _size(s) for n, s in shapes.items())
    return abs(kept - (1.0 - target) * total) / total


# ----------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("target", [0.0, 0.5, 0.9, 0.99])
def test_uniform_gives_every_tensor_the_target(target):
    result = uniform(MLP, target)
    assert result == {name: target for name in MLP}
    assert _budget_error(MLP, result, target) < 1e-15


# ----------------------------------------------------------------------------- ERK
def test_erk_golden_two_layers():
    # a: 4x4, N=16, r=8/16=1/2; b: 8x8, N=64, r=16/64=1/4. S=0.8: budget 0.2*80 = 16 weights,
    # eps = 16 / (1/2*16 + 1/4*64) = 16/24 = 2/3, so d_a = 1/3, d_b = 1/6.
    result = erk({"a": (4, 4), "b": (8, 8)}, 0.8)
    assert result["a"] == pytest.approx(2 / 3, abs=1e-12)
    assert result["b"] == pytest.approx(5 / 6, abs=1e-12)


def test_erk_golden_dense_overflow():
    # a: 2x2, N=4, r=1; b: 10x10, N=100, r=1/5. S=0.5: budget 52, eps = 52/(4 + 20) = 2.17 gives
    # a density 2.17 > 1, so a becomes dense (exactly 1) and b is re-solved with the rest:
    # eps = (52 - 4) / 20 = 2.4, d_b = 2.4 / 5 = 0.48.
    result = erk({"a": (2, 2), "b": (10, 10)}, 0.5)
    assert result["a"] == 0.0
    assert result["b"] == pytest.approx(0.52, abs=1e-12)


def test_erk_tiny_layer_among_big_ones_is_dense_and_the_rest_resolved():
    shapes = {"big1": (512, 512), "tiny": (2, 3), "big2": (256, 512)}
    result = erk(shapes, 0.5)
    assert result["tiny"] == 0.0  # density exactly 1, not 1 - 1e-16
    # Re-solved by hand: the tiny layer's 6 weights leave the budget, the big layers share the rest.
    budget = 0.5 * sum(_size(s) for s in shapes.values()) - 6
    eps = budget / (_ratio(shapes["big1"]) * _size(shapes["big1"]) + _ratio(shapes["big2"]) * _size(shapes["big2"]))
    assert 1 - result["big1"] == pytest.approx(eps * _ratio(shapes["big1"]), rel=1e-12)
    assert 1 - result["big2"] == pytest.approx(eps * _ratio(shapes["big2"]), rel=1e-12)
    assert _budget_error(shapes, result, 0.5) < 1e-12


def test_erk_cascading_overflow():
    # a: 2x2 (N=4, r=1), b: 8x8 (N=64, r=1/4), c: 20x20 (N=400, r=1/10); S=0.5, budget 234.
    # Round 1: eps = 234/60 = 3.9 -> only a overflows (b would get 0.975).
    # Round 2: eps = 230/56 = 4.107 -> now b overflows (1.027), pushed over 1 by a leaving.
    # Round 3: eps = (234 - 68)/40 = 4.15 -> d_c = 0.415.
    result = erk({"a": (2, 2), "b": (8, 8), "c": (20, 20)}, 0.5)
    assert result["a"] == 0.0 and result["b"] == 0.0
    assert result["c"] == pytest.approx(1 - 0.415, abs=1e-12)


@settings(deadline=None, max_examples=80)
@given(model=st.sampled_from(sorted(MODELS)), target=st.floats(0.5, 0.99))
def test_erk_budget_is_exact(model, target):
    shapes = MODELS[model]
    result = erk(shapes, target)
    assert set(result) == set(shapes)
    assert all(0.0 <= s < 1.0 for s in result.values())
    assert _budget_error(shapes, result, target) < 1e-9


@settings(deadline=None, max_examples=80)
@given(
    shapes=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=3),
        st.lists(st.integers(1, 40), min_size=2, max_size=4).map(tuple),
        min_size=1,
        max_size=6,
    ),
    target=st.floats(0.0, 0.99),
    power=st.sampled_from([1.0, 0.5, 2.0]),
)
def test_erk_density_proportional_to_ratio_among_sparse_layers(shapes, target, power):
    result = erk(shapes, target, power=power)
    assert _budget_error(shapes, result, target) < 1e-9
    sparse = [n for n, s in result.items() if s > 0.0]
    dense = [n for n, s in result.items() if s == 0.0]
    assume(sparse)  # a run with every layer dense has no eps to compare
    # One eps for every sparse layer: d_l / r_l is the same number.
    eps_values = [(1.0 - result[n]) / _ratio(shapes[n], power) for n in sparse]
    assert max(eps_values) == pytest.approx(min(eps_values), rel=1e-9)
    eps = eps_values[0]
    # A layer is dense exactly when its ERK density would have exceeded 1.
    for n in dense:
        assert eps * _ratio(shapes[n], power) >= 1.0 - 1e-9
    for n in sparse:
        assert eps * _ratio(shapes[n], power) <= 1.0 + 1e-12


def test_erk_power_changes_the_ratio():
    shapes = {"a": (4, 4), "b": (8, 8)}
    # power 0: every ratio is 1, so ERK collapses to uniform.
    assert erk(shapes, 0.8, power=0.0) == pytest.approx({"a": 0.8, "b": 0.8})
    # power 2: r_a = 1/4, r_b = 1/16; eps = 16 / (16/4 + 64/16) = 2, d_a = 1/2, d_b = 1/8.
    assert erk(shapes, 0.8, power=2.0) == pytest.approx({"a": 0.5, "b": 7 / 8})
    # layer_sparsities forwards erk_power.
    assert layer_sparsities(shapes, 0.8, "erk", erk_power=2.0) == pytest.approx({"a": 0.5, "b": 7 / 8})


def test_erk_ranks_layers_by_ratio():
    result = erk(RESNET_LIKE, 0.9)
    # The 3-channel stem and the classifier have the largest ratios, the 64x64x3x3 conv the smallest.
    assert result["layer3.0.conv2.weight"] == max(result.values())
    assert result["conv1.weight"] < result["layer1.0.conv1.weight"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, shown", [(-0.1, "-0.1"), (1.0, "1.0"), (float("nan"), "nan"), ("abc", "'abc'"), (None, "None")])
def test_check_sparsity_rejects(bad, shown):
    with pytest.raises(InvalidSparsityError, match=re.escape(shown)):
        check_sparsity(bad)
    for fn in (uniform, erk):
        with pytest.raises(InvalidSparsityError, match=re.escape(shown)):
            fn(MLP, bad)


@pytest.mark.parametrize("good", [0.0, 0.5, 0.999999, 1 - 1e-12])
def test_check_sparsity_accepts(good):
    assert check_sparsity(good) == good


def test_unknown_distribution_lists_valid_names():
    with pytest.raises(InvalidSparsityError, match=r"'gaussian'.*\['erk', 'uniform'\]"):
        layer_sparsities(MLP, 0.9, "gaussian")
    assert get_distribution("ERK") is erk  # names are case-insensitive


def test_explicit_map_is_used_as_given():
    explicit = {"fc1.weight": 0.95, "fc2.weight": 0.5, "fc3.weight": 0.0}
    assert layer_sparsities(MLP, explicit) == explicit


def test_explicit_map_missing_names():
    with pytest.raises(InvalidSparsityError, match=r"misses 2 tensors: \['fc2.weight', 'fc3.weight'\]"):
        layer_sparsities(MLP, {"fc1.weight": 0.9})


def test_explicit_map_invalid_value_names_the_tensor():
    with pytest.raises(InvalidSparsityError, match=r"sparsity of fc2\.weight must be in \[0, 1\), got 1\.5"):
        layer_sparsities(MLP, {"fc1.weight": 0.9, "fc2.weight": 1.5, "fc3.weight": 0.9})


# ----------------------------------------------------------------------------- infeasible targets
DEPTHWISE = {"dw.weight": (32, 1, 3, 3), "fc.weight": (64, 512)}
ONE_PER_NEURON = {"dw.weight": 1 / 9, "fc.weight": 1 / 512}


def _feasible(shapes, target, distribution, min_density) -> bool:
    try:
        layer_sparsities(shapes, target, distribution, min_density)
    except InfeasibleSparsityError:
        return False
    return True


def test_uniform_infeasible_names_the_largest_feasible_sparsity():
    # Uniform: every layer gets 1 - S, and the depthwise layer needs 1/9, so S <= 8/9 exactly.
    with pytest.raises(InfeasibleSparsityError) as info:
        layer_sparsities(DEPTHWISE, 0.95, "uniform", ONE_PER_NEURON)
    err = info.value
    assert err.max_feasible == pytest.approx(8 / 9, abs=1e-9)
    assert "dw.weight" in str(err) and "(32, 1, 3, 3)" in str(err)
    # The number printed in the message is one a user can paste back in and have it work.
    printed = float(re.search(r"largest feasible uniform sparsity is ([0-9.]+)", str(err)).group(1))
    assert printed == pytest.approx(8 / 9, abs=1e-6)
    assert _feasible(DEPTHWISE, printed, "uniform", ONE_PER_NEURON)


@pytest.mark.parametrize("shapes", [DEPTHWISE, RESNET_LIKE, VIT_LIKE], ids=["depthwise", "resnet", "vit"])
def test_erk_infeasible_max_feasible_is_the_boundary(shapes):
    # Ask for at least 5% density everywhere, then for a target that cannot meet it.
    min_density = {n: 0.05 for n in shapes}
    with pytest.raises(InfeasibleSparsityError) as info:
        layer_sparsities(shapes, 0.99, "erk", min_density)
    err = info.value
    best = err.max_feasible
    assert 0.0 < best < 0.99
    assert _feasible(shapes, best, "erk", min_density)
    assert not _feasible(shapes, best + 1e-3, "erk", min_density)
    # The message names the same boundary, rounded down so that pasting it back works.
    printed = float(re.search(r"largest feasible erk sparsity is ([0-9.]+)", str(err)).group(1))
    assert best - 1e-6 <= printed <= best
    assert _feasible(shapes, printed, "erk", min_density)


def test_max_feasible_sparsity_direct():
    assert max_feasible_sparsity(DEPTHWISE, uniform, ONE_PER_NEURON) == pytest.approx(8 / 9, abs=1e-12)
    # No minimum at all: anything below 1 is feasible.
    assert max_feasible_sparsity(DEPTHWISE, uniform, {}) > 1 - 1e-9


def test_explicit_map_below_min_density_is_infeasible():
    with pytest.raises(InfeasibleSparsityError, match=r"dw\.weight") as info:
        layer_sparsities(DEPTHWISE, {"dw.weight": 0.95, "fc.weight": 0.5}, min_density=ONE_PER_NEURON)
    assert math.isnan(info.value.max_feasible)  # no global target to name for an explicit map
