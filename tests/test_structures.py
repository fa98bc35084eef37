"""Structures and the one top-k: golden 8-element cases by hand, lifting, and exact counts per unit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl.errors import InvalidSparsityError
from srigl.structures import NM, ConstantFanIn, Unstructured, check_shape, fan_in_counts, fan_in_of, topk_mask

INF = math.inf

# One 8-element score tensor used by every golden case below, as (2, 4) and as (1, 8).
SCORES = torch.tensor([[0.5, -1.0, 3.0, 2.0], [7.0, 0.0, -2.0, 1.0]])


def _mask(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ----------------------------------------------------------------------------- golden cases
@pytest.mark.parametrize(
    "n, expected",
    [
        (0, [[0, 0, 0, 0], [0, 0, 0, 0]]),
        # The three largest of the whole tensor: 7, 3, 2 (two of them in row 0).
        (3, [[0, 0, 1, 1], [1, 0, 0, 0]]),
        # Five largest: 7, 3, 2, 1, 0.5.
        (5, [[1, 0, 1, 1], [1, 0, 0, 1]]),
        (8, [[1, 1, 1, 1], [1, 1, 1, 1]]),
    ],
)
def test_unstructured_keeps_n_in_total(n, expected):
    assert torch.equal(topk_mask(SCORES, n, Unstructured()), _mask(expected))


@pytest.mark.parametrize(
    "n, expected",
    [
        # Row 0: 3 > 2 > 0.5 > -1; row 1: 7 > 1 > 0 > -2.
        (1, [[0, 0, 1, 0], [1, 0, 0, 0]]),
        (2, [[0, 0, 1, 1], [1, 0, 0, 1]]),
        (3, [[1, 0, 1, 1], [1, 1, 0, 1]]),
    ],
)
def test_constant_fan_in_keeps_n_per_row(n, expected):
    assert torch.equal(topk_mask(SCORES, n, ConstantFanIn()), _mask(expected))


def test_unstructured_may_unbalance_rows_constant_fan_in_may_not():
    # Scores where the four largest (9, 8, 7, 6) all sit in row 0.
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    assert fan_in_counts(topk_mask(scores, 4, Unstructured())).tolist() == [4, 0]
    assert torch.equal(topk_mask(scores, 2, ConstantFanIn()), _mask([[1, 1, 0, 0], [0, 0, 1, 1]]))


def test_nm_2_4_on_one_row_of_eight():
    scores = SCORES.reshape(1, 8)  # (1, 8): two groups of 4 along the fan-in
    # Group [0.5, -1, 3, 2] keeps 3 and 2; group [7, 0, -2, 1] keeps 7 and 1.
    expected = _mask([[0, 0, 1, 1, 1, 0, 0, 1]])
    assert torch.equal(topk_mask(scores, 2, NM(2, 4)), expected)


def test_nm_1_2_on_two_rows_of_four():
    # Groups [0.5, -1] [3, 2] | [7, 0] [-2, 1]: the larger of each pair.
    expected = _mask([[1, 0, 1, 0], [1, 0, 0, 1]])
    assert torch.equal(topk_mask(SCORES, 1, NM(1, 2)), expected)


def test_nm_groups_do_not_straddle_rows():
    # fan_in 6 is not a multiple of m=4 although 2 * 6 is: a (-1, 4) view would build groups
    # across the row boundary and silently return a mask with no N:M meaning.
    scores = torch.arange(12.0).reshape(2, 6)
    with pytest.raises(InvalidSparsityError, match="fan-in 6"):
        topk_mask(scores, 2, NM(2, 4))


# ----------------------------------------------------------------------------- lifting
def test_plus_inf_is_always_chosen():
    scores = torch.tensor([[-5.0, INF, 1.0, 2.0], [INF, 0.0, 0.1, -3.0]])
    # Both +inf entries beat every finite score, even the larger ones.
    assert torch.equal(topk_mask(scores, 2, Unstructured()), _mask([[0, 1, 0, 0], [1, 0, 0, 0]]))
    assert torch.equal(topk_mask(scores, 3, Unstructured()), _mask([[0, 1, 0, 1], [1, 0, 0, 0]]))
    assert torch.equal(topk_mask(scores, 1, ConstantFanIn()), _mask([[0, 1, 0, 0], [1, 0, 0, 0]]))


def test_minus_inf_is_never_chosen_while_enough_finite_scores_remain():
    scores = torch.tensor([[-INF, -100.0, -INF, -200.0], [-INF, -INF, -1e30, -INF]])
    # Three finite entries in total: n=3 takes exactly them.
    assert torch.equal(topk_mask(scores, 3, Unstructured()), _mask([[0, 1, 0, 1], [0, 0, 1, 0]]))
    # Row 0 has two finite, row 1 one: k=1 per row never reaches a -inf.
    assert torch.equal(topk_mask(scores, 1, ConstantFanIn()), _mask([[0, 1, 0, 0], [0, 0, 1, 0]]))
    # NM(1, 2): groups [-inf, -100] [-inf, -200] | [-inf, -inf] [-1e30, -inf].
    picked = topk_mask(scores, 1, NM(1, 2))
    assert picked[0].tolist() == [False, True, False, True]
    assert picked[1, 2]


def test_lifting_keeps_then_fills_by_score():
    # The grow step: kept weights lifted to +inf, a forbidden row to -inf, the rest by score.
    grow = torch.tensor([[0.3, 0.9, 0.1, 0.2], [5.0, 6.0, 7.0, 8.0]])
    kept = _mask([[1, 0, 0, 0], [0, 0, 0, 0]])
    alive = _mask([[1], [0]])
    lifted = torch.where(alive, torch.where(kept, INF, grow), -INF)
    # Row 0 keeps its kept weight and adds the best score 0.9; row 1 is forbidden despite its large scores.
    assert torch.equal(topk_mask(lifted, 2, Unstructured()), _mask([[1, 1, 0, 0], [0, 0, 0, 0]]))


# ----------------------------------------------------------------------------- exact counts
scores_elements = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([INF, -INF, 0.0]),
)


@st.composite
def scores_and_n(draw, structure_kind: str):
    rows = draw(st.integers(1, 7))
    if structure_kind == "nm":
        m = draw(st.integers(1, 6))
        n_keep = draw(st.integers(1, m))
        structure = NM(n_keep, m)
        fan_in = m * draw(st.integers(1, 4))
        unit = m
    else:
        fan_in = draw(st.integers(1, 13))
        structure = Unstructured() if structure_kind == "unstructured" else ConstantFanIn()
        unit = rows * fan_in if structure_kind == "unstructured" else fan_in
        n_keep = draw(st.integers(0, unit))
    values = draw(st.lists(scores_elements, min_size=rows * fan_in, max_size=rows * fan_in))
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, fan_in)  # (rows, fan_in)
    return scores, n_keep, structure


@settings(deadline=None, max_examples=60)
@given(scores_and_n("unstructured"))
def test_unstructured_exact_total(case):
    scores, n, structure = case
    mask = topk_mask(scores, n, structure)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == n
    # Whatever is kept scores at least as high as whatever is not.
    if 0 < n < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


@settings(deadline=None, max_examples=60)
@given(scores_and_n("constant_fan_in"))
def test_constant_fan_in_exact_per_row(case):
    scores, n, structure = case
    mask = topk_mask(scores, n, structure)
    assert fan_in_counts(mask).tolist() == [n] * scores.shape[0]
    for row_scores, row_mask in zip(scores, mask):
        if 0 < n < scores.shape[1]:
            assert row_scores[row_mask].min() >= row_scores[~row_mask].max()


@settings(deadline=None, max_examples=60)
@given(scores_and_n("nm"))
def test_nm_exact_per_group(case):
    scores, n, structure = case
    mask = topk_mask(scores, n, structure)
    groups = mask.reshape(scores.shape[0], -1, structure.m)  # (rows, fan_in / m, m)
    assert torch.all(groups.sum(dim=2) == n)
    score_groups = scores.reshape(scores.shape[0], -1, structure.m)  # (rows, fan_in / m, m)
    if n < structure.m:
        kept_min = torch.where(groups, score_groups, INF).amin(dim=2)
        dropped_max = torch.where(groups, -INF, score_groups).amax(dim=2)
        assert torch.all(kept_min >= dropped_max)


# ----------------------------------------------------------------------------- values and shapes
@pytest.mark.parametrize("n, m", [(0, 4), (5, 4), (-1, 4), (1, 0)])
def test_nm_rejects_n_outside_1_to_m(n, m):
    with pytest.raises(InvalidSparsityError, match=f"n={n}, m={m}"):
        NM(n, m)


def test_check_shape_rejects_fan_in_not_multiple_of_m():
    with pytest.raises(InvalidSparsityError, match=r"fc\.weight: fan-in 10 is not a multiple of m=4"):
        check_shape(NM(2, 4), n_rows=3, fan_in=10, name="fc.weight")
    check_shape(NM(2, 4), n_rows=3, fan_in=12)  # multiple of m: fine
    check_shape(ConstantFanIn(), n_rows=3, fan_in=10)  # only N:M constrains the fan-in
    check_shape(Unstructured(), n_rows=3, fan_in=10)


def test_structures_are_frozen_values():
    assert NM(2, 4) == NM(2, 4) and NM(2, 4) != NM(1, 4)
    assert ConstantFanIn() == ConstantFanIn() and Unstructured() != ConstantFanIn()
    assert len({NM(2, 4), NM(2, 4), Unstructured()}) == 2  # hashable
    with pytest.raises(AttributeError):
        NM(2, 4).n = 3


@pytest.mark.parametrize(
    "structure, density, rows, fan_in, units, n",
    [
        (Unstructured(), 0.25, 4, 10, 1, 10),  # 0.25 * 40
        (Unstructured(), 0.13, 3, 5, 1, 2),  # round(1.95)
        (ConstantFanIn(), 0.26, 4, 10, 4, 3),  # round(2.6): nearest, not floor
        (ConstantFanIn(), 0.31, 4, 10, 4, 3),  # round(3.1)
        (NM(2, 4), 0.9, 3, 8, 6, 2),  # the structure fixes n; the density is ignored
    ],
)
def test_units_and_n_per_unit(structure, density, rows, fan_in, units, n):
    assert structure.units(rows, fan_in) == units
    assert structure.n_per_unit(density, rows, fan_in) == n


def test_fan_in_helpers():
    assert fan_in_of((8, 3, 5, 5)) == 75
    assert fan_in_of(torch.Size([7, 11])) == 11
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)  # (out, 2, 2)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[2, 1, 0] = True
    assert fan_in_counts(mask).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "n, structure, unit",
    [(-1, Unstructured(), 8), (9, Unstructured(), 8), (-1, ConstantFanIn(), 4), (5, ConstantFanIn(), 4), (-2, NM(1, 2), 2)],
)
def test_topk_mask_rejects_n_outside_the_unit(n, structure, unit):
    # A negative n must not quietly return an empty mask; an n above the unit size must name it.
    with pytest.raises(InvalidSparsityError, match=f"n={n} entries per unit of {unit}"):
        topk_mask(SCORES, n, structure)


def test_topk_mask_rejects_non_2d_scores():
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        topk_mask(torch.zeros(2, 2, 2), 1, Unstructured())


def test_topk_mask_takes_ties_by_lowest_index_whatever_topk_picks():
    # Golden: the n-th largest score is tied; the first tied entries (in index order) are taken, so a
    # mask depends on the scores alone (not on the device, thread count or the tensor's block).
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert topk_mask(scores, 2, ConstantFanIn()).tolist() == [
        [False, True, True, False, False], [True, True, False, False, False]]
    assert topk_mask(scores, 6, Unstructured()).tolist() == [
        [False, True, False, False, False], [True, True, True, True, True]]
    inf = float("inf")
    assert topk_mask(torch.tensor([[inf, 1.0, -inf, -inf]]), 3, ConstantFanIn()).tolist() == [[True, True, True, False]]
    # Rows split into blocks select what the whole does.
    ties = torch.randint(0, 3, (12, 9)).float()
    whole = topk_mask(ties, 4, ConstantFanIn())
    assert torch.equal(torch.cat([topk_mask(part, 4, ConstantFanIn()) for part in ties.split(5)]), whole)


@pytest.mark.parametrize("kind", ["random", "ties", "infinities", "sorted", "reversed"])
def test_nth_largest_brackets_to_the_exact_answer(monkeypatch, kind):
    import srigl.structures as structures

    # Small thresholds so the bracketing path runs on small tensors.
    monkeypatch.setattr(structures, "_BRACKET_FROM", 1000)
    monkeypatch.setattr(structures, "_SAMPLE", 64)
    g = torch.Generator().manual_seed(0)
    total = 20_011
    scores = {
        "random": torch.rand(total, generator=g),
        "ties": torch.randint(0, 7, (total,), generator=g).float(),
        "infinities": torch.rand(total, generator=g).index_fill(0, torch.arange(0, total, 3), torch.inf)
        .index_fill(0, torch.arange(1, total, 5), -torch.inf),
        "sorted": torch.arange(total, dtype=torch.float32),
        "reversed": torch.arange(total, 0, -1, dtype=torch.float32),
    }[kind]
    for n in (1, 2, 17, total // 3, total // 2, total - 5, total):
        assert structures.nth_largest(scores, n) == torch.topk(scores, n).values[-1], n
    # And topk_mask of one huge unit keeps exactly n, ties by lowest index.
    mask = topk_mask(scores.view(1, -1), total // 3, Unstructured())
    assert int(mask.sum()) == total // 3
    nth = torch.topk(scores, total // 3).values[-1]
    tied = (scores == nth).nonzero().squeeze(1)
    taken = mask.view(-1)[tied]
    assert bool(taken[: int(taken.sum())].all())  # the taken ties are the first ones


def test_row_top_takes_ties_by_lowest_position():
    from srigl.blockwise import _row_top

    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0], [3.0, 2.0, torch.inf, 1.0, 0.0]])
    assert _row_top(scores, 3).tolist() == [[0, 1, 4], [0, 1, 2], [0, 1, 2]]
    g = torch.Generator().manual_seed(1)
    many = torch.randint(0, 4, (50, 30), generator=g).float()
    expected = topk_mask(many, 6, ConstantFanIn()).nonzero()[:, 1].view(50, 6)
    assert torch.equal(_row_top(many, 6), expected)
