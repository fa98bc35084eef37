"""Where a sparse tensor starts: its initial mask (random, by magnitude, or adopted), and the
rescale of freshly initialised weights to their sparse fan-in.

Three ways to draw the first mask, chosen by ``mask_init`` (``"auto"``, the default, picks per
tensor: ``"nonzero"`` when its weights already hold at least as many exact zeros as the target
sparsity asks for -- a sparse model loaded from ``model.state_dict()``, which does not hold masks --
and ``"random"`` otherwise):

* ``"random"``    -- top-n of uniform noise per unit of the structure (a fresh model). The noise
  comes from the sparsifier's own generator, seeded by :func:`mask_stream_seed`, never from the
  stream that initialised the weights.
* ``"magnitude"`` -- the largest ``|w|`` per unit, under the same budget (a pretrained model).
* ``"nonzero"``   -- the weights' own non-zeros (an already-sparse model), refused with the numbers
  when they break the structure or the budget.
"""

from __future__ import annotations

import torch

from srigl.blockwise import rows_per_block
from srigl.errors import InvalidConfigError, SriglError
from srigl.orientation import WeightView
from srigl.structures import ConstantFanIn, Structure, topk_mask

MASK_INITS = ("auto", "random", "magnitude", "nonzero")


def looks_sparse(weight: torch.Tensor, budget: int) -> bool:
    """Whether ``weight`` already holds no more non-zeros than ``budget`` (and some zeros): what
    ``mask_init="auto"`` adopts instead of drawing a random mask that would zero trained weights."""
    nnz = int(torch.count_nonzero(weight))
    return 0 < nnz <= budget < weight.numel()

# An odd 64-bit constant (the golden ratio's fraction) that separates the mask stream from the
# weight stream: torch.manual_seed(s) seeds the weights' mt19937 with s itself.
_STREAM = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def mask_stream_seed(seed: int) -> int:
    """Seed of the sparsifier's generator for a user ``seed``: a SplitMix64 hash of it.

    ``srigl train`` (and most scripts) seed the model with ``torch.manual_seed(seed)`` and the
    sparsifier with the same ``seed``. Seeding the mask generator with ``seed`` itself would replay
    the very uniform draws that made the first layer's weights, so the "random" mask would keep
    exactly its largest weights. The hash gives an unrelated mt19937 stream for every seed, equal or
    not to the model's; it is a pure function, so runs stay reproducible.
    """
    z = (int(seed) + _STREAM) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)  # torch seeds are < 2**63 on every platform


def check_mask_init(mask_init: str) -> str:
    """Return ``mask_init`` if it names one of :data:`MASK_INITS`, else raise with the choices."""
    if mask_init not in MASK_INITS:
        raise InvalidConfigError(f"mask_init must be one of {list(MASK_INITS)}, got {mask_init!r}")
    return mask_init


def random_mask(n_rows: int, fan_in: int, n: int, structure: Structure, generator: torch.Generator) -> torch.Tensor:
    """``(n_rows, fan_in)`` bool mask: top-``n`` of uniform noise per unit of ``structure``."""
    noise = torch.rand(n_rows, fan_in, generator=generator)  # (out, fan_in)
    return topk_mask(noise, n, structure)


def random_layout(
    n_rows: int, fan_in: int, n: int, generator: torch.Generator, *, dtype: torch.dtype = torch.int64,
    block_rows: int | None = None,
) -> torch.Tensor:
    """The columns :func:`random_mask` keeps under ``ConstantFanIn``, without its dense tensors.

    ``(n_rows, n)`` of ``dtype``, ascending along each row. The noise is drawn ``block_rows`` rows at
    a time (default: :func:`srigl.blockwise.rows_per_block`): consecutive draws from one generator
    are the rows of a single whole draw, so the layout equals the dense mask's while at most one
    ``(block_rows, fan_in)`` block of noise exists -- what lets a 670k-output layer start compact.
    """
    block_rows = rows_per_block(fan_in) if block_rows is None else block_rows
    layout = torch.empty(n_rows, n, dtype=dtype)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        noise = torch.rand(r1 - r0, fan_in, generator=generator)  # (B, fan_in): rows [r0, r1) of one draw
        keep = topk_mask(noise, n, ConstantFanIn())
        layout[r0:r1] = keep.nonzero()[:, 1].view(r1 - r0, n)  # nonzero() lists a row's columns ascending
    return layout


def magnitude_mask(weight: torch.Tensor, n: int, structure: Structure) -> torch.Tensor:
    """``(n_rows, fan_in)`` bool mask of the ``n`` largest ``|weight|`` per unit of ``structure``."""
    return topk_mask(weight.detach().abs().float(), n, structure)


def nonzero_mask(weight: torch.Tensor, structure: Structure, n: int, name: str) -> torch.Tensor:
    """The non-zeros of an ``(n_rows, fan_in)`` weight as its mask, if they fit ``structure`` and the budget.

    ``n`` is what the structure keeps per unit at the target density (as for a random mask). A
    constant fan-in tensor may have ablated (all-zero) neurons: each of its ``r`` surviving neurons
    gets the fan-in the update itself would give it, ``k = min(n_rows * n // r, fan_in)``.

    A trained sparse model often holds a few active weights that are exactly 0 (regrown at 0 behind
    a dead input). They read as pruned, so a unit may hold fewer non-zeros than its quota: it is
    topped up with zero weights at its lowest free indices. The layer computes the same function,
    and the next update drops those zeros first (see ``docs/algorithm.md``, choice (f)).

    Raises:
        NotConstantFanInError: some unit holds more non-zeros than the structure allows it.
        InvalidConfigError: more non-zeros than the budget, or no non-zero at all.
    """
    nonzero = weight.detach() != 0  # (out, fan_in)
    n_rows, fan_in = nonzero.shape
    n_keep, alive = structure.adopt(nonzero, n, name)
    # Non-zeros first (+inf), then the lowest indices (a decreasing score) to top a unit up.
    order = -torch.arange(n_rows * fan_in, dtype=torch.float64).view(n_rows, fan_in)  # (out, fan_in)
    mask = topk_mask(torch.where(nonzero, torch.inf, order), n_keep, structure)
    return mask if alive is None else mask & alive[:, None]


@torch.no_grad()
def rescale_to_sparse_fan_in(weight: torch.Tensor, mask: torch.Tensor, view: WeightView | None = None) -> None:
    """Scale each neuron's weights in place by ``sqrt(dense fan-in / active fan-in)``.

    Standard initialisations draw with a standard deviation proportional to ``1 / sqrt(fan_in)``
    of the *dense* layer; with only ``k`` of ``fan_in`` weights active, each pre-activation gets
    ``k / fan_in`` of the intended variance and the signal vanishes at high sparsity (a LeNet-5 at
    99 % does not train at all). Row ``i`` scaled by ``sqrt(fan_in / k_i)`` restores it: the SRigL
    reference's sparse Kaiming init (``std = gain / sqrt(k_i)``), for any base init.

    Args:
        weight: the parameter, any shape ``(out, ...)``; modified in place.
        mask: bool mask shaped like ``weight``.
        view: how ``weight`` reads as ``(out, fan_in)`` (default: rows along its first dimension;
            a Conv1D's neurons are its columns).
    """
    view = view or WeightView(tuple(weight.shape))
    counts = view.rows(mask).sum(dim=1)  # (out, fan_in) -> (out,)
    scale = torch.sqrt(view.fan_in / counts.clamp(min=1).to(weight.dtype))  # (out,)
    factor = view.stored(scale[:, None].expand(view.rows_shape))  # (out, fan_in) -> stored layout
    weight.mul_(factor)  # in place, whatever the layout


def resolve_mask_init(mask_init: str, param: torch.Tensor, budget: int) -> str:
    """``mask_init`` for one tensor, with ``"auto"`` resolved (``"nonzero"`` if it :func:`looks_sparse`)."""
    if mask_init != "auto":
        return mask_init
    return "nonzero" if looks_sparse(param.detach(), budget) else "random"


def first_mask(
    param: torch.Tensor, view: WeightView, n: int, name: str, how: str, *, auto: bool, structure: Structure,
    generator: torch.Generator,
) -> torch.Tensor:
    """The first mask of ``param`` (shaped like it), keeping ``n`` per unit of ``structure`` in its
    ``(out, fan_in)`` ``view``, drawn ``how`` (resolved; ``auto``: the user asked for ``"auto"``)."""
    n_rows, fan_in = view.rows_shape
    weight = view.rows(param.detach())  # (out, fan_in)
    if how == "magnitude":
        mask = magnitude_mask(weight, n, structure)
    elif how == "nonzero" and auto:
        try:
            mask = nonzero_mask(weight, structure, n, name)
        except SriglError as e:  # InvalidConfigError, NotConstantFanInError
            # Drawing random masks over trained sparse weights would zero most of them.
            raise InvalidConfigError(
                f"{name} is already sparse but its zeros do not fit {structure!r} at this budget ({e}); "
                "pass mask_init='magnitude' to keep its largest weights or mask_init='random' to start afresh"
            ) from e
    elif how == "nonzero":
        mask = nonzero_mask(weight, structure, n, name)
    else:
        mask = random_mask(n_rows, fan_in, n, structure, generator)
    return view.stored(mask.to(param.device)).contiguous()  # (out, fan_in) -> stored layout
