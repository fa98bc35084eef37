"""Sparsity structures as values, and the one vectorised top-k that serves them all.

A structure says over which *unit* a mask keeps its top-n entries:

* ``Unstructured()``   -- the whole tensor is one unit (n = total kept weights).
* ``ConstantFanIn()``  -- each output neuron (row of the ``(out, fan_in)`` view) is a unit
  (n = k, the fan-in every active neuron keeps).
* ``NM(n, m)``         -- each group of ``m`` consecutive fan-in weights is a unit (n fixed by the
  structure).

Drop and grow never loop over neurons: callers *lift* scores (``-inf`` for entries that must not be
chosen, ``+inf`` for entries that must be kept) and call :func:`topk_mask` once.

Each structure also carries its own rules, so the sparsifier asks instead of testing types:
``unit_view`` (the ``(units, unit_size)`` view top-k runs over), ``min_density`` (the sparsest a tensor
may be), ``fixed_density`` (N:M fixes it), ``per_unit_after`` (weights per unit after an update,
given the surviving neurons), ``check_update`` (the invariant every update must keep) and
``ablatable`` (whether whole neurons may be switched off while the rest keep their quota).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from srigl.errors import InvalidConfigError, InvalidSparsityError, MaskInvariantError, NotConstantFanInError


class _Rules:
    """Rules shared by the structures; each structure overrides what differs."""

    #: Whether a neuron may be ablated (all its weights off) while the others keep the per-unit count.
    ablatable = False
    #: Whether every active row holds the same number of weights, so a layer can be stored as
    #: ``(n_active, k)`` values + indices (compact training, condensed layers).
    condensable = False

    def fixed_density(self) -> float | None:
        """The density the structure itself imposes (N:M), or None when the target decides."""
        return None

    def min_density(self, n_rows: int, fan_in: int) -> float:
        """Smallest density an ``(n_rows, fan_in)`` tensor may get: one weight in the whole tensor."""
        return 1.0 / (n_rows * fan_in)

    def check_shape(self, n_rows: int, fan_in: int, name: str = "tensor") -> None:
        """Raise if the structure cannot be laid over an ``(n_rows, fan_in)`` tensor."""

    def check_update(self, name: str, new: torch.Tensor, alive: torch.Tensor, per_unit: int, budget: int) -> None:
        """Cheap vectorised check of an updated ``(out, fan_in)`` mask: an internal error, never a user's."""

    def counts_problem(self, counts: torch.Tensor, budget: int, fan_in: int) -> str | None:
        """Why per-neuron active counts ``(out,)`` cannot come from this structure's updates with
        ``budget`` weights (a mask edited by hand, a foreign state dict), or None. An emptied mask is
        allowed: the next update regrows the whole budget."""
        return None

    def mask_problem(self, mask: torch.Tensor, budget: int) -> str | None:
        """As :meth:`counts_problem`, for an ``(out, fan_in)`` bool mask."""
        return self.counts_problem(mask.sum(dim=1), budget, mask.shape[1])

    def adopt(self, nonzero: torch.Tensor, n: int, name: str) -> tuple[int, torch.Tensor | None]:
        """Whether an existing ``(out, fan_in)`` pattern of non-zeros fits this structure at ``n`` per
        unit (``mask_init="nonzero"``): ``(per-unit count to keep, surviving rows or None)``, or a
        named error with the numbers."""
        raise NotImplementedError


@dataclass(frozen=True)
class Unstructured(_Rules):
    """No constraint on where the kept weights are (RigL, SET)."""

    def units(self, n_rows: int, fan_in: int) -> int:
        """Number of independent top-k units in an ``(n_rows, fan_in)`` tensor."""
        return 1

    def n_per_unit(self, density: float, n_rows: int, fan_in: int) -> int:
        """Weights kept per unit for a target density (rounded to the nearest integer)."""
        return int(round(density * n_rows * fan_in))

    def unit_view(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``(n_rows, fan_in)`` viewed as ``(units, unit_size)``: here one unit of everything."""
        return scores.reshape(1, -1)  # (1, n_rows * fan_in)

    def per_unit_after(self, budget: int, n_alive: int, fan_in: int) -> int:
        """Weights each unit keeps after an update with ``n_alive`` surviving neurons: the whole budget."""
        return budget

    def counts_problem(self, counts: torch.Tensor, budget: int, fan_in: int) -> str | None:
        nnz = int(counts.sum())
        return None if nnz in (budget, 0) else f"{nnz} active weights, budget {budget}"

    def adopt(self, nonzero: torch.Tensor, n: int, name: str) -> tuple[int, None]:
        nnz = int(nonzero.sum())
        if nnz > n:
            raise InvalidConfigError(
                f"{name}: mask_init='nonzero' found {nnz} non-zeros of {nonzero.numel()}, but the target sparsity keeps {n}"
            )
        return n, None

    def check_update(self, name: str, new: torch.Tensor, alive: torch.Tensor, per_unit: int, budget: int) -> None:
        if int(new.sum()) != budget:
            raise MaskInvariantError(f"{name}: {int(new.sum())} active weights after the update, budget {budget}")


@dataclass(frozen=True)
class ConstantFanIn(_Rules):
    """Every active output neuron keeps exactly ``k`` incoming weights (SRigL)."""

    ablatable = True
    condensable = True

    def units(self, n_rows: int, fan_in: int) -> int:
        return n_rows

    def n_per_unit(self, density: float, n_rows: int, fan_in: int) -> int:
        return int(round(density * fan_in))

    def unit_view(self, scores: torch.Tensor) -> torch.Tensor:
        return scores  # (n_rows, fan_in): one unit per row

    def min_density(self, n_rows: int, fan_in: int) -> float:
        return 1.0 / fan_in  # one weight per neuron

    def per_unit_after(self, budget: int, n_alive: int, fan_in: int) -> int:
        # k': the layer budget spread over the surviving neurons.
        return min(budget // n_alive, fan_in)

    def counts_problem(self, counts: torch.Tensor, budget: int, fan_in: int) -> str | None:
        alive = int((counts > 0).sum())
        if alive == 0:
            return None  # emptied: the next update regrows the whole budget
        fan_ins = counts[counts > 0].unique().tolist()
        if len(fan_ins) > 1:
            return f"fan-in not constant: active neurons hold {fan_ins[:6]} weights"
        # Every update gives each of the n surviving neurons k' = min(budget // n, fan_in).
        expected = self.per_unit_after(budget, alive, fan_in)
        if fan_ins[0] != expected:
            return f"{alive} active neurons with fan-in {fan_ins[0]}, but budget {budget} gives them {expected} each"
        return None

    def adopt(self, nonzero: torch.Tensor, n: int, name: str) -> tuple[int, torch.Tensor]:
        # Ablated (all-zero) neurons are allowed: each of the r survivors gets the fan-in the update
        # itself would give it, k = min(n_rows * n // r, fan_in).
        n_rows, fan_in = nonzero.shape
        counts = nonzero.sum(dim=1)  # (out,)
        alive = counts > 0
        survivors = int(alive.sum())
        if survivors == 0:
            raise InvalidConfigError(f"{name}: mask_init='nonzero' found no non-zero weight in {tuple(nonzero.shape)}")
        n_keep = min(n_rows * n // survivors, fan_in)
        if int(counts.max()) > n_keep:
            raise NotConstantFanInError(
                f"{name}: mask_init='nonzero' found neurons with up to {int(counts.max())} non-zeros "
                f"({int(counts.sum())} in all, {survivors} non-zero neurons), but the target sparsity gives this "
                f"layer {n_rows * n} weights: fan-in {n_keep} over {survivors} neurons"
            )
        return n_keep, alive

    def check_update(self, name: str, new: torch.Tensor, alive: torch.Tensor, per_unit: int, budget: int) -> None:
        counts = new.sum(dim=1)  # (out,)
        if not bool((counts == torch.where(alive, per_unit, 0)).all()):
            raise NotConstantFanInError(
                f"{name}: fan-in after the update is not constant: counts {counts.unique().tolist()} for k'={per_unit}"
            )


@dataclass(frozen=True)
class NM(_Rules):
    """``n`` of every ``m`` consecutive weights along the fan-in are kept (N:M sparsity)."""

    n: int
    m: int

    def __post_init__(self):
        if not (0 < self.n <= self.m):
            raise InvalidSparsityError(f"NM structure needs 0 < n <= m, got n={self.n}, m={self.m}")

    def units(self, n_rows: int, fan_in: int) -> int:
        return n_rows * (fan_in // self.m)

    def n_per_unit(self, density: float, n_rows: int, fan_in: int) -> int:
        # The density of an N:M layer is fixed by the structure itself.
        return self.n

    def fixed_density(self) -> float:
        return self.n / self.m

    def min_density(self, n_rows: int, fan_in: int) -> float:
        return self.n / self.m

    def unit_view(self, scores: torch.Tensor) -> torch.Tensor:
        # Without the shape check a (-1, m) view of e.g. (2, 6) scores with m=4 would build groups
        # that straddle rows and silently return a mask with no N:M meaning.
        self.check_shape(*scores.shape, "scores")
        return scores.reshape(-1, self.m)  # (n_rows * fan_in / m, m)

    def per_unit_after(self, budget: int, n_alive: int, fan_in: int) -> int:
        return self.n

    def counts_problem(self, counts: torch.Tensor, budget: int, fan_in: int) -> str | None:
        per_row = self.n * (fan_in // self.m)
        wrong = int(((counts != per_row) & (counts != 0)).sum())
        return None if wrong == 0 else f"{wrong} of {counts.numel()} rows hold neither 0 nor {per_row} weights"

    def mask_problem(self, mask: torch.Tensor, budget: int) -> str | None:
        groups = mask.reshape(-1, self.m).sum(dim=1)  # (out * fan_in / m,)
        wrong = int(((groups != self.n) & (groups != 0)).sum())  # emptied groups are regrown
        return None if wrong == 0 else f"{wrong} of {groups.numel()} groups of {self.m} do not hold exactly {self.n}"

    def adopt(self, nonzero: torch.Tensor, n: int, name: str) -> tuple[int, None]:
        groups = nonzero.reshape(-1, self.m).sum(dim=1)  # (out * fan_in / m,)
        if int(groups.max()) > self.n:
            raise NotConstantFanInError(
                f"{name}: mask_init='nonzero' found {int((groups > self.n).sum())} of {groups.numel()} groups "
                f"of {self.m} with more than {self.n} non-zeros (up to {int(groups.max())})"
            )
        return self.n, None

    def check_shape(self, n_rows: int, fan_in: int, name: str = "tensor") -> None:
        if fan_in % self.m != 0:
            raise InvalidSparsityError(f"{name}: fan-in {fan_in} is not a multiple of m={self.m} for NM({self.n}, {self.m})")


Structure = Union[Unstructured, ConstantFanIn, NM]


def check_shape(structure: Structure, n_rows: int, fan_in: int, name: str = "tensor") -> None:
    """Raise if ``structure`` cannot be laid over an ``(n_rows, fan_in)`` tensor."""
    structure.check_shape(n_rows, fan_in, name)


def _check_n(n: int, unit: int, structure: Structure, shape: torch.Size) -> None:
    # A negative n used to return an empty mask silently (breaking "exactly n per unit"), and an n
    # above the unit size failed deep inside torch.topk without naming the unit.
    if not 0 <= n <= unit:
        raise InvalidSparsityError(
            f"topk_mask cannot keep n={n} entries per unit of {unit} ({structure!r} over scores {tuple(shape)})"
        )


def topk_mask(scores: torch.Tensor, n: int, structure: Structure) -> torch.Tensor:
    """Boolean mask of the ``n`` highest scores in every unit of ``structure``.

    Args:
        scores: ``(n_rows, fan_in)`` float scores; lifted entries may be ``+inf``/``-inf``.
        n: entries to keep per unit (total for ``Unstructured``, per row for ``ConstantFanIn``,
            per group of ``m`` for ``NM``).
        structure: the unit the top-k runs over.

    Returns:
        Bool tensor shaped like ``scores`` with exactly ``n`` True entries per unit.
    """
    if scores.dim() != 2:
        raise ValueError(f"topk_mask expects a 2-D (n_rows, fan_in) tensor, got shape {tuple(scores.shape)}")
    if not isinstance(structure, _Rules):
        raise TypeError(f"unknown structure {structure!r}")
    groups = structure.unit_view(scores)  # (units, unit_size)
    _check_n(n, groups.shape[1], structure, scores.shape)
    if n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # torch.topk's choice among equal scores depends on the tensor's layout, the thread count and
    # the device; taking ties by lowest index instead makes the mask a function of the scores alone,
    # so an update run on the condensed layout, or block by block, picks what the dense one does.
    if groups.shape[0] == 1 and groups.shape[1] >= _BRACKET_FROM:
        nth = nth_largest(groups[0], n).view(1, 1)  # one huge unit: bracket, then select in the bracket
    else:
        nth = torch.topk(groups, n, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # (units, 1)
    mask = groups >= nth  # every score reaching the n-th largest: n of them unless ties at it
    over = (mask.sum(dim=1) if groups.shape[0] > 1 else torch.count_nonzero(mask, dim=1)) > n  # (units,)
    if bool(over.any()):
        rows = over.nonzero().squeeze(1)
        unit, at = groups[rows], nth[rows]  # (r, unit_size), (r, 1)
        above, tied = unit > at, unit == at
        need = n - above.sum(dim=1, keepdim=True)  # (r, 1): places left for ties
        mask[rows] = above | (tied & (tied.cumsum(dim=1) <= need))  # the first ties in index order
    return mask.view(scores.shape)


#: Entries from which :func:`nth_largest` brackets the answer instead of one ``torch.topk``.
_BRACKET_FROM = 1 << 18
#: Entries of the strided sample that brackets it.
_SAMPLE = 1 << 14


def nth_largest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n``-th largest of the 1-D ``scores`` (0-d tensor), ``1 <= n <= scores.numel()``.

    ``torch.topk`` of one huge row runs on one thread and returns ``n`` values and int64 positions
    (a drop over a 670k x 32 layer keeps 15M of 21M). Here a strided sample brackets the answer
    between two of its order statistics, two multi-threaded comparison passes count what lies above
    and inside the bracket, and ``torch.topk`` runs only on the bracket's contents. Where the sample
    misses (adversarial orderings, a bracket that would be large), it falls back to ``torch.topk``:
    the result is exact either way.
    """
    total = scores.numel()
    if total < _BRACKET_FROM:
        return torch.topk(scores, n, sorted=False).values.min()
    sample = scores[:: total // _SAMPLE].contiguous()  # (about _SAMPLE,)
    m = sample.numel()
    at = n * m / total  # where the n-th largest falls among the sample's, counted from the top
    # A margin of several binomial standard deviations of the sampled rank, plus slack.
    margin = int(6 * math.sqrt(at * (1 - at / m) + 1)) + 8
    top, bottom = int(at) - margin, int(at) + margin  # 0-based ranks from the top
    # kthvalue counts from the bottom (1-based); two O(m) selections instead of sorting the sample.
    hi = float(torch.kthvalue(sample, m - top).values) if top >= 0 else torch.inf
    lo = float(torch.kthvalue(sample, m - bottom).values) if bottom < m else -torch.inf
    # count_nonzero: a bool tensor's .sum() is several times slower on the CPU.
    above = int(torch.count_nonzero(scores > hi))
    inside = (scores <= hi) & (scores >= lo)
    n_inside = int(torch.count_nonzero(inside))
    if above < n <= above + n_inside and n_inside <= max(total // 16, 1 << 16):
        return torch.topk(scores[inside], n - above, sorted=False).values.min()
    return torch.topk(scores, n, sorted=False).values.min()


def fan_in_counts(mask: torch.Tensor) -> torch.Tensor:
    """Active weights per output neuron of an ``(out, ...)`` mask, shape ``(out,)``."""
    return mask.reshape(mask.shape[0], -1).sum(dim=1)


def fan_in_of(shape: torch.Size | tuple[int, ...]) -> int:
    """Fan-in of a weight of ``shape``: the product of every dimension but the first."""
    return math.prod(shape[1:])
