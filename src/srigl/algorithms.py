"""Dynamic sparse training algorithms on one template: scores -> drop -> grow -> reset.

``Static`` never changes its masks; ``SET`` regrows at random; ``RigL`` regrows where the dense
gradient is largest; ``SRigL`` is RigL with the constant fan-in structure and neuron ablation. The
update itself (:meth:`srigl.sparsifier.Sparsifier._update_layer`) is written once; algorithms
override only their grow scores, their default structure and which neurons survive.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from srigl import ablation
from srigl.errors import InvalidConfigError
from srigl.schedules import CosineDrop
from srigl.sparsifier import Sparsifier
from srigl.state import STATE_DICT_VERSION
from srigl.structures import ConstantFanIn

__all__ = [
    "ALGORITHMS", "RigL", "SET", "SRigL", "STATE_DICT_VERSION", "Sparsifier", "Static", "get_algorithm",
    "register_algorithm",
]

ALGORITHMS: dict[str, type[Sparsifier]] = {}


def register_algorithm(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator adding a sparsifier to :data:`ALGORITHMS` under ``name``."""

    def decorate(cls: type[Sparsifier]) -> type[Sparsifier]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def get_algorithm(name: str) -> type[Sparsifier]:
    """Look up an algorithm class by name, listing the valid names when it is unknown."""
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise InvalidConfigError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None


@register_algorithm("static")
class Static(Sparsifier):
    """Fixed random masks for the whole run (the sparse baseline)."""

    def _make_schedule(self, total_steps, delta, alpha, t_end) -> CosineDrop:
        # Static needs no total_steps: its masks never change whatever t_end would be.
        schedule = super()._make_schedule(total_steps, delta, alpha, 0 if t_end is None else t_end)
        return dataclasses.replace(schedule, t_end=0)  # no update step ever


@register_algorithm("set")
class SET(Sparsifier):
    """Sparse Evolutionary Training: drop the smallest magnitudes, regrow at random."""

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)

    grow_scores.reads_weight = False  # only its shape and device


@register_algorithm("rigl")
class RigL(Sparsifier):
    """Rigged Lottery: drop the smallest magnitudes, regrow where the dense gradient is largest."""

    needs_dense_grad = True

    def grow_scores(self, weight: torch.Tensor, dense_grad: torch.Tensor | None) -> torch.Tensor:
        return dense_grad.abs()

    grow_scores.reads_weight = False


@register_algorithm("srigl")
class SRigL(RigL):
    """Structured RigL: constant fan-in per neuron, with dynamic neuron ablation.

    Args:
        gamma_sal: minimum fraction of a neuron's ``k`` weights that must be salient for it to stay
            active (0.3 for CNNs, 0.95 for ViTs in the paper); 0 disables ablation, giving plain
            constant fan-in RigL.
        **kwargs: as :class:`Sparsifier` (``compact=True`` trains every sparse layer as
            ``(n_active, k)`` values + indices).
    """

    default_structure = ConstantFanIn()

    def __init__(self, model, optimizer, sparsity=0.9, total_steps=None, *, gamma_sal: float = 0.3, **kwargs: Any):
        try:
            value = math.nan if isinstance(gamma_sal, (str, bytes)) else float(gamma_sal)
        except (TypeError, ValueError):
            value = math.nan  # None, objects: refused below with the value named
        if not (0.0 <= value <= 1.0):
            raise InvalidConfigError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
        self.gamma_sal = float(gamma_sal)
        structure = kwargs.get("structure")
        if structure is not None and structure != ConstantFanIn():
            # Checked before the base class masks anything, so the model is left untouched.
            raise InvalidConfigError(f"SRigL needs the ConstantFanIn structure, got {structure!r}")
        super().__init__(model, optimizer, sparsity, total_steps, **kwargs)

    def surviving_rows(self, layer, salient_counts, k) -> torch.Tensor:
        if not layer.ablate or self.gamma_sal == 0.0:
            return torch.ones(layer.n_rows, dtype=torch.bool)
        return ablation.surviving_neurons(
            salient_counts(), k, self.gamma_sal, ablation.min_neurons_for(layer.budget, layer.fan_in)
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma_sal": self.gamma_sal}
