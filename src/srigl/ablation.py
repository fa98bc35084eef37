"""SRigL neuron ablation: which output neurons keep enough salient weights to stay active.

A weight is *salient* when unconstrained RigL would keep it this step: it is among the
``n_active - K`` largest magnitudes (the weights the drop step keeps), or among the ``K`` largest
dense-gradient magnitudes (the weights the grow step would add). A neuron with fewer than
``gamma_sal * k`` salient weights is ablated: all its incoming weights are pruned and its share of
the layer budget is spread over the surviving neurons (a larger fan-in ``k'``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from srigl.structures import Unstructured, topk_mask


def salient_weights(mask: torch.Tensor, weight_score: torch.Tensor, grad_score: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Boolean ``(out, fan_in)`` mask of salient weights (see module docstring).

    Args:
        mask: current ``(out, fan_in)`` bool mask.
        weight_score: ``|weight|``, shape ``(out, fan_in)``.
        grad_score: ``|dense gradient|``, shape ``(out, fan_in)``.
        n_drop: ``K``, the number of weights dropped and regrown this step.
    """
    n_active = int(mask.sum())
    by_magnitude = topk_mask(torch.where(mask, weight_score, -torch.inf), n_active - n_drop, Unstructured())
    by_gradient = topk_mask(grad_score, n_drop, Unstructured())
    return by_magnitude | by_gradient


def min_salient(gamma_sal: float, k: int) -> int:
    """Fewest salient weights a neuron of fan-in ``k`` needs to survive: ``ceil(gamma_sal * k)``.

    Computed in integers from the decimal the user wrote: in floating point ``0.55 * 100`` is
    ``55.000000000000007``, which would ablate a neuron holding exactly 55 salient weights.
    """
    # repr() is the shortest decimal that round-trips (0.55 -> '0.55'), so Fraction is exact.
    return math.ceil(Fraction(repr(float(gamma_sal))) * k)


def surviving_neurons(counts: torch.Tensor, k: int, gamma_sal: float, min_neurons: int) -> torch.Tensor:
    """Neurons that stay active, shape ``(out,)`` bool, from their salient weight ``counts`` ``(out,)``.

    A neuron survives when it has at least :func:`min_salient` ``(gamma_sal, k)`` salient weights.
    When fewer than ``min_neurons`` would survive (the layer budget needs them:
    ``k' = budget // survivors`` must not exceed the dense fan-in), the threshold drops to the
    salient count of the ``min_neurons``-th most salient neuron, and every neuron reaching it
    survives: ties all survive, so the choice never depends on a neuron's index.
    """
    need = min_salient(gamma_sal, k)
    if int((counts >= need).sum()) < min_neurons:
        need = int(torch.topk(counts, min_neurons).values[-1])  # the min_neurons-th largest count
    return counts >= need


def min_neurons_for(budget: int, fan_in: int) -> int:
    """Fewest neurons that can hold ``budget`` weights without exceeding the dense ``fan_in``."""
    return max(1, math.ceil(budget / fan_in))
