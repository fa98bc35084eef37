"""A constant fan-in weight as ``(active_rows, indices, values)``: the one place a layer is condensed.

A constant fan-in mask gives every active output neuron exactly ``k`` incoming weights, so a weight
can be stored as ``values`` and ``indices`` of shape ``(n_active, k)``: row ``i`` holds the weights
of output neuron ``active_rows[i]`` and the fan-in positions they read. Neurons with no active weight
(*ablated*) are not stored. :func:`condense_tensor` turns ``(weight, mask)`` into that triple and is
where constant fan-in (:func:`constant_fan_in`) and the mask (:func:`check_mask`) are checked.
"""

from __future__ import annotations

import dataclasses

import torch

from srigl.errors import MaskError, NotConstantFanInError
from srigl.kernels import index_dtype_for
from srigl.structures import fan_in_counts

__all__ = ["CondensedTensor", "check_mask", "condense_tensor", "constant_fan_in"]


@dataclasses.dataclass(frozen=True)
class CondensedTensor:
    """A constant fan-in weight stored as the active weights of its active rows.

    Attributes:
        active_rows: ``(n_active,)`` int64, ascending: the output neurons with any active weight.
        indices: ``(n_active, fan_in)``, ascending along each row: positions in the flattened fan-in
            (``in_features`` for a Linear, ``in_channels / groups * kh * kw`` for a Conv2d).
        values: ``(n_active, fan_in)``: the weights at those positions.
        fan_in: ``k``, active weights per active row.
        out_features: rows of the dense weight.
        in_features_flat: columns of the dense weight viewed as ``(out, fan_in_flat)``.
    """

    active_rows: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    fan_in: int
    out_features: int
    in_features_flat: int

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features_flat)`` weight, zero outside the mask."""
        return _scatter_rows(self.values, self.indices, self.active_rows, self.out_features, self.in_features_flat)


def _scatter_rows(values, indices, active_rows, out_features: int, in_features: int) -> torch.Tensor:
    rows = values.new_zeros(values.shape[0], in_features).scatter_(1, indices.long(), values)  # (n_active, in)
    return values.new_zeros(out_features, in_features).index_copy_(0, active_rows, rows)  # (out, in)


def constant_fan_in(mask: torch.Tensor, name: str = "weight") -> int:
    """The number of active weights shared by every active row of ``mask`` (0 if none is active).

    Args:
        mask: bool ``(out, *fan_in_dims)``.
        name: the tensor's name, for the error message.

    Raises:
        NotConstantFanInError: active rows hold different numbers of active weights. The message
            (and the ``counts`` attribute, ``{fan_in: n_rows}``) lists every distinct count.
    """
    counts = fan_in_counts(mask)  # (out,)
    fan_ins, n_rows = torch.unique(counts[counts > 0], return_counts=True)
    if fan_ins.numel() > 1:
        by_count = dict(zip(fan_ins.tolist(), n_rows.tolist()))
        listed = ", ".join(f"{rows} row(s) with {k}" for k, rows in by_count.items())
        error = NotConstantFanInError(
            f"{name}: active rows do not share one fan-in: {listed} active weights "
            f"(and {int((counts == 0).sum())} ablated rows with 0)"
        )
        error.counts = by_count
        raise error
    return int(fan_ins[0]) if fan_ins.numel() else 0


def check_mask(weight: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """Raises :class:`~srigl.errors.MaskError` unless ``mask`` is a bool tensor shaped like ``weight``
    and ``weight`` is exactly zero outside it."""
    if mask.dtype != torch.bool:
        raise MaskError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise MaskError(f"{name}: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    # The condensed layer drops everything outside the mask; a nonzero there would silently change
    # what the model computes, so it is an error, not a rounding detail.
    n_outside = int(torch.count_nonzero(weight.detach().masked_fill(mask, 0)))
    if n_outside:
        raise MaskError(
            f"{name}: {n_outside} weights are nonzero where the mask is False "
            f"(expected the parameter to be exactly zero outside its mask)"
        )


def condense_tensor(weight: torch.Tensor, mask: torch.Tensor, *, name: str = "weight") -> CondensedTensor:
    """Condense a constant fan-in ``weight`` to ``(active_rows, indices, values)``.

    Args:
        weight: ``(out, *fan_in_dims)``; zero wherever ``mask`` is False.
        mask: bool, same shape; the truth about which weights are active (an active weight may be 0).
        name: the tensor's name, for error messages.

    Returns:
        The :class:`CondensedTensor`; indices use the smallest integer dtype that holds the fan-in.

    Raises:
        MaskError: wrong mask dtype or shape, or a nonzero weight outside the mask.
        NotConstantFanInError: active rows with different numbers of active weights.
    """
    check_mask(weight, mask, name)
    out_features = weight.shape[0]
    fan_in = constant_fan_in(mask, name)
    weight_2d = weight.detach().reshape(out_features, -1)  # (out, in_flat)
    mask_2d = mask.reshape(out_features, -1)  # (out, in_flat)
    in_features_flat = weight_2d.shape[1]
    active_rows = mask_2d.any(dim=1).nonzero().squeeze(1)  # (n_active,)
    # nonzero() lists each row's active columns in ascending order, and every active row has exactly
    # fan_in of them, so the flat column list reshapes to sorted rows: no sort, no loop over neurons.
    columns = mask_2d[active_rows].nonzero()[:, 1].reshape(active_rows.numel(), fan_in)  # (n_active, k)
    values = weight_2d[active_rows].gather(1, columns)  # (n_active, k)
    return CondensedTensor(
        active_rows=active_rows,
        indices=columns.to(index_dtype_for(in_features_flat)),
        values=values,
        fan_in=fan_in,
        out_features=out_features,
        in_features_flat=in_features_flat,
    )
