"""The update of a constant fan-in layer from its condensed layout, one block of output rows at a time.

:meth:`srigl.Sparsifier._update_layer` sees a tensor as dense ``(out, fan_in)`` weight, mask and
gradient. For a compact layer with many outputs (an extreme-classification head of 670k labels) those
dense tensors are gigabytes; this is the same seven-step update without them:

1. Scores. Drop scores are read off the ``(n_active, k)`` values (every active weight is there);
   grow scores come per block of output rows from ``grow_block(r0, r1)`` (``|g^T x|`` of those rows,
   or random ones), never for the whole layer at once.
2. ``K`` (``n_drop``) as in the dense update: the drop fraction of the active weights, raised to the
   number of active weights that are exactly 0.
3.-5. Ablation asks the algorithm (:meth:`~srigl.Sparsifier.surviving_rows`) with a callable that
   counts salient weights per row: top ``n_active - K`` magnitudes (on the values) or top ``K`` grow
   scores of the whole layer (a threshold found in one pass over the blocks, then a counting pass).
   Algorithms that do not ablate never call it, so a layer that is never ablated (an output layer)
   makes a single pass over its gradient.
6. Drop: the ``K`` smallest magnitudes of the layer, selected on the values.
7. Grow: each block lifts its kept weights to ``+inf`` and takes every surviving row's top ``k'``
   positions straight from ``torch.topk`` (ties at the ``k'``-th score by lowest position) -- a
   per-row selection, so a block gives exactly the rows the whole would.

The result is the new ``(active_rows, indices)`` and, for every new entry, the flat position in the
old values it keeps (``-1``: regrown, starts at 0); the storage moves values and optimizer state.
Selections take the same scores as the dense update and resolve ties the same way (lowest index,
:func:`srigl.structures.topk_mask`), so the masks are identical to it.
"""

from __future__ import annotations

from typing import Callable

import torch

from srigl import distributed
from srigl.errors import MaskInvariantError
from srigl.structures import ConstantFanIn, Unstructured, topk_mask

#: Elements of one ``(rows, fan_in)`` block of grow scores: bounds the extra memory of an update
#: (a few tensors of this many elements: scores, lifted scores, positions).
BLOCK_ELEMENTS = 1 << 22


def rows_per_block(fan_in: int, block_elements: int | None = None) -> int:
    """Output rows per block so a ``(rows, fan_in)`` block holds about ``block_elements``
    (:data:`BLOCK_ELEMENTS` by default)."""
    return max(1, (BLOCK_ELEMENTS if block_elements is None else block_elements) // max(fan_in, 1))


def _blocks(n_rows: int, block_rows: int):
    for r0 in range(0, n_rows, block_rows):
        yield r0, min(r0 + block_rows, n_rows)


def _dense_rows(flags: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, n_rows: int, fan_in: int,
                fill) -> torch.Tensor:
    """Scatter per-entry ``flags`` ``(n, k)`` of condensed rows ``rows`` ``(n,)`` (block-local) into a
    ``(n_rows, fan_in)`` tensor filled with ``fill`` elsewhere."""
    out = torch.full((n_rows, fan_in), fill, dtype=flags.dtype, device=flags.device)
    if rows.numel():
        out[rows[:, None], indices.long()] = flags  # (n, k) entries into (n_rows, fan_in)
    return out


def _kth_largest(blocks: Callable[[], "object"], n: int) -> tuple[float, int]:
    """The ``n``-th largest score over every block, and how many scores equal it must be taken
    (scores above it are all taken): a running top-``n`` merged block by block."""
    best = None
    for scores in blocks():
        flat = scores.reshape(-1)
        top = torch.topk(flat, min(n, flat.numel()), sorted=False).values
        best = top if best is None else torch.topk(torch.cat([best, top]), min(n, best.numel() + top.numel()),
                                                    sorted=False).values
    threshold = best.min()
    return threshold, n - int((best > threshold).sum())


def update(
    *,
    values: torch.Tensor,
    indices: torch.Tensor,
    active_rows: torch.Tensor,
    n_rows: int,
    fan_in: int,
    budget: int,
    drop_fraction: float,
    drop_scores: Callable[[torch.Tensor], torch.Tensor],
    grow_block: Callable[[int, int], torch.Tensor],
    surviving_rows: Callable[[Callable[[], torch.Tensor], int], torch.Tensor],
    restart: Callable[[], None],
    block_rows: int,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One constant fan-in update of a condensed layer (see the module docstring).

    Args:
        values, indices: ``(n_active, k)`` condensed layout; ``active_rows`` ``(n_active,)`` ascending.
        n_rows, fan_in: the dense ``(out, fan_in)`` shape; ``budget`` the layer's active weights.
        drop_fraction: this step's drop fraction.
        drop_scores: ``|w|`` of a values tensor (the algorithm's drop score).
        grow_block: grow scores ``(r1 - r0, fan_in)`` of output rows ``[r0, r1)``; called in
            ascending row order, once per pass.
        surviving_rows: the algorithm's ablation, called as ``surviving_rows(salient_counts, k)``.
        restart: called before each pass over the blocks (rewinds a random grow score's generator,
            so every pass sees the same scores).
        block_rows: rows per block.
        name: the tensor's FQN, for errors.

    Returns:
        ``(active_rows, indices, source, n_grown)`` of the new layout: ``indices`` in the dtype of the
        old ones; ``source`` ``(n_active', k')`` (int32, int64 from 2**31 entries) holds each entry's
        flat position in the old values, or -1 where it is regrown.
    """
    n_act, k = values.shape
    device = values.device
    n_active = n_act * k
    n_zero = int((values == 0).sum())
    n_drop = max(int(drop_fraction * n_active), n_zero) if drop_fraction > 0 else 0
    drop = drop_scores(values)  # (n_act, k)
    def grow_scores_all():
        restart()
        for r0, r1 in _blocks(n_rows, block_rows):
            yield grow_block(r0, r1)

    def salient_counts() -> torch.Tensor:
        # ablation.salient_weights, counted per row without the dense tensors: the top n_active - K
        # magnitudes (on the values) or the top K grow scores of the whole layer.
        by_magnitude = topk_mask(drop, n_active - n_drop, Unstructured())  # (n_act, k)
        counts = torch.zeros(n_rows, dtype=torch.long, device=device)
        counts[active_rows] = by_magnitude.sum(dim=1)
        if n_drop == 0:
            return counts
        threshold, ties_left = _kth_largest(grow_scores_all, n_drop)
        restart()
        for r0, r1 in _blocks(n_rows, block_rows):
            grow = grow_block(r0, r1)  # (B, fan_in)
            by_gradient = grow > threshold
            tied = grow == threshold
            if ties_left > 0 and bool(tied.any()):
                # Ties at the K-th score: the first ones in row-major order (topk's order among ties
                # is unspecified; this one does not depend on the block size).
                order = tied.reshape(-1).cumsum(0).view_as(tied)  # (B, fan_in)
                take = tied & (order <= ties_left)
                ties_left -= int(take.sum())
                by_gradient |= take
            a0, a1 = entries(active_rows, r0, r1)
            magnitude_block = _dense_rows(by_magnitude[a0:a1], indices[a0:a1], active_rows[a0:a1] - r0, r1 - r0,
                                          fan_in, False)
            counts[r0:r1] += (by_gradient & ~magnitude_block).sum(dim=1)
        return counts

    k_now = k if n_act else 0
    alive = surviving_rows(salient_counts, k_now).to(device)  # (out,)
    per_unit = ConstantFanIn().per_unit_after(budget, int(alive.sum()), fan_in)

    # Drop: of the active weights in surviving neurons, keep all but the K smallest magnitudes of the
    # whole layer, then at most k' per row (k' may shrink when neurons revive).
    candidates = alive[active_rows][:, None].expand(n_act, k)  # (n_act, k)
    n_keep = max(int(candidates.sum()) - n_drop, 0)
    keep = topk_mask(torch.where(candidates, drop, -torch.inf), n_keep, Unstructured())  # (n_act, k)
    if per_unit < k:
        keep &= topk_mask(torch.where(keep, drop, -torch.inf), per_unit, ConstantFanIn())
    drop = candidates = None  # the peak is in the grow loop below (salient_counts has run): hold only what it needs

    # Grow, block by block: of each surviving row, its kept weights (lifted to +inf) and the best grow
    # scores of the rest, k' in all. Rows are selected by torch.topk's positions directly: no dense
    # mask of the block is formed, nor scattered back to the condensed layout.
    # The new layout is written in place, block by block: a list of per-block pieces concatenated
    # at the end would hold it twice. Sources fit int32 below 2**31 entries (4 bytes an entry saved).
    new_rows = alive.nonzero().squeeze(1)  # (n_active',) ascending
    new_indices = torch.empty(new_rows.numel(), per_unit, dtype=indices.dtype, device=device)
    sources = torch.empty(new_rows.numel(), per_unit, device=device,
                          dtype=torch.int32 if n_active < 2**31 else torch.long)
    at_new = 0  # rows of the new layout written so far
    n_grown = n_kept_found = 0
    restart()
    for r0, r1 in _blocks(n_rows, block_rows):
        grow = grow_block(r0, r1)  # (B, fan_in); drawn for every block, so SET's stream stays whole
        a0, a1 = entries(active_rows, r0, r1)  # condensed rows [a0, a1) lie in dense rows [r0, r1)
        rows = alive[r0:r1].nonzero().squeeze(1)  # block-local surviving rows, ascending
        if per_unit == 0 or rows.numel() == 0:
            continue
        local = active_rows[a0:a1] - r0  # (n,) block-local dense row of each condensed row
        old_cols = indices[a0:a1].long()  # (n, k), ascending per row
        kept = keep[a0:a1]  # (n, k)
        if a1 - a0 == r1 - r0:  # every row of the block active: condensed row i is block row i
            lifted = grow.scatter(1, old_cols, torch.where(kept, torch.inf, grow.gather(1, old_cols)))
        else:
            lifted = grow.index_put((local[:, None].expand(-1, k)[kept], old_cols[kept]), grow.new_tensor(torch.inf))
        if rows.numel() < r1 - r0:
            lifted = lifted[rows]  # (R, fan_in): ablated rows take no part
        cols = _row_top(lifted, per_unit)  # (R, k') ascending
        # Where each new entry was in the old values (kept, or dropped and chosen again), else -1.
        old_of = torch.full((r1 - r0,), -1, dtype=torch.long, device=device)
        old_of[local] = torch.arange(a0, a1, device=device)
        entry = old_of[rows]  # (R,) old condensed row, -1: the neuron was ablated
        had = entry >= 0
        if bool(had.all()):
            source, kept_found = _sources(old_cols, kept, entry - a0, cols, a0, k)
        else:
            source = torch.full_like(cols, -1)
            source[had], kept_found = _sources(old_cols, kept, entry[had] - a0, cols[had], a0, k)
        n_grown += int(torch.count_nonzero(source < 0))
        n_kept_found += kept_found
        new_indices[at_new:at_new + rows.numel()] = cols
        sources[at_new:at_new + rows.numel()] = source
        at_new += rows.numel()
    if n_kept_found != int(torch.count_nonzero(keep)):
        raise MaskInvariantError(f"{name}: {int(torch.count_nonzero(keep))} kept weights, {n_kept_found} in the new layout")
    if per_unit == 0:  # every neuron ablated or no budget left: an empty layout
        new_rows = new_rows[:0]
        return new_rows, new_indices[:0, :0], sources[:0, :0], 0
    return new_rows, new_indices, sources, n_grown


def entries(active_rows: torch.Tensor, r0: int, r1: int) -> tuple[int, int]:
    """Condensed rows ``[a0, a1)`` held by dense rows ``[r0, r1)`` (``active_rows`` is ascending)."""
    bounds = torch.tensor([r0, r1], device=active_rows.device)
    a0, a1 = torch.searchsorted(active_rows, bounds).tolist()
    return a0, a1


def _sources(old_cols: torch.Tensor, kept: torch.Tensor, at_rows: torch.Tensor, cols: torch.Tensor, a0: int,
             k: int) -> tuple[torch.Tensor, int]:
    """Flat positions in the old values of new entries ``cols`` ``(R, k')`` of old block rows
    ``at_rows`` ``(R,)`` (-1 where a column was not active), and how many of them were kept."""
    before = old_cols[at_rows]  # (R, k) the rows' old columns, ascending
    at = torch.searchsorted(before, cols).clamp_(max=k - 1)  # (R, k')
    found = before.gather(1, at) == cols
    kept_found = int(torch.count_nonzero(found & kept[at_rows].gather(1, at)))
    return torch.where(found, (at_rows[:, None] + a0) * k + at, -1), kept_found


def _row_top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``(R, n)`` ascending column positions of each row's ``n`` highest ``scores`` ``(R, fan_in)``,
    ties at the ``n``-th score taken by lowest position (as :func:`srigl.structures.topk_mask`)."""
    top = torch.topk(scores, n, dim=1, sorted=False)
    nth = top.values.min(dim=1, keepdim=True).values  # (R, 1)
    tied_rows = (torch.count_nonzero(scores >= nth, dim=1) > n).nonzero().squeeze(1)  # rows with ties at the n-th score
    cols = top.indices
    if tied_rows.numel():
        # nonzero() lists a row's columns in ascending order, n of them per row.
        cols[tied_rows] = topk_mask(scores[tied_rows], n, ConstantFanIn()).nonzero()[:, 1].view(-1, n)
    return cols.sort(dim=1).values


def update_layer(sparsifier, layer, drop_fraction: float) -> dict[str, int]:
    """``sparsifier``'s update of ``layer``, a tensor held as a condensed layout (its storage has
    ``block_rows``): :func:`update` with the sparsifier's scores, ablation and generator, then the
    new layout installed. Returns the update's statistics of the layer."""
    layout = layer.layout()
    generator_state = sparsifier.generator.get_state()

    # A grow score marked as reading only the weight's shape (RigL's, SET's) gets a zero-stride
    # stand-in instead of the block's dense weight; an override elsewhere is given the real one.
    reads_weight = getattr(type(sparsifier).grow_scores, "reads_weight", True)

    def grow_block(r0: int, r1: int) -> torch.Tensor:
        if reads_weight:
            weight = layer.weight_rows(r0, r1)  # (r1 - r0, fan_in)
        else:
            weight = layout.values.new_zeros(()).expand(r1 - r0, layer.fan_in)  # (r1 - r0, fan_in), no memory
        # Averaged over ranks block by block (same order everywhere), like the whole gradient.
        grad = distributed.mean_(layer.grad_rows(r0, r1)) if sparsifier.needs_dense_grad else None
        return sparsifier.grow_scores(weight, grad)

    active_rows, indices, source, n_grown = update(
        values=layout.values, indices=layout.indices, active_rows=layout.active_rows,
        n_rows=layer.n_rows, fan_in=layer.fan_in, budget=layer.budget, drop_fraction=drop_fraction,
        drop_scores=sparsifier.drop_scores, grow_block=grow_block,
        surviving_rows=lambda counts, k: sparsifier.surviving_rows(layer, counts, k),
        # Every pass over the blocks draws the same random scores (SET), as one dense draw would.
        restart=lambda: sparsifier.generator.set_state(generator_state),
        block_rows=layer.block_rows, name=layer.name,
    )
    layer.install_layout(active_rows, indices, source)
    layer.clear()
    return {"grown": n_grown, "active_neurons": int(active_rows.numel())}
