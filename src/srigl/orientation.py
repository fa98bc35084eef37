"""How the engine reads a stored weight: always as an ``(out, fan_in)`` matrix, one row per neuron.

Every sparse tensor is updated as ``(out, fan_in)``: constant fan-in counts along a row, ablation
removes rows. Most layers store their weight that way (``nn.Linear`` as ``(out, in)``, a conv as
``(out, C, kh, kw)``, flattened). A few store it transposed: Hugging Face's ``Conv1D`` (GPT-2's
attention and MLP projections) keeps ``(in, out)`` and computes ``y = x @ W + b``.
:class:`WeightView` is the one place that knows the difference: it turns anything shaped like the
stored weight (the weight, its mask, its gradient) into the ``(out, fan_in)`` view the engine reads,
and an ``(out, fan_in)`` tensor back into the stored layout. Masks stay on the module in the stored
layout, so ``weight * weight_mask`` is the effective weight and everything outside the update
(``model.state_dict()``, ``sparsifier.masks()``, checkpoints) sees ordinary tensors.

Transposed types are named by ``"module.qualname"``, so the core never imports their library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Module types (by "module.qualname") whose 2-D ``weight`` is stored (fan_in, out).
TRANSPOSED_WEIGHT_TYPES: frozenset[str] = frozenset({"transformers.pytorch_utils.Conv1D"})


def qualnames(cls: type) -> set[str]:
    """``"module.qualname"`` of ``cls`` and of every class it derives from."""
    return {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}


def stores_transposed(module: nn.Module, param_name: str = "weight") -> bool:
    """Whether ``module.<param_name>`` is a 2-D weight stored ``(fan_in, out)``
    (see :data:`TRANSPOSED_WEIGHT_TYPES`)."""
    param = getattr(module, param_name, None)
    return (
        param_name == "weight"
        and isinstance(param, torch.Tensor)
        and param.dim() == 2
        and bool(qualnames(type(module)) & TRANSPOSED_WEIGHT_TYPES)
    )


@dataclass(frozen=True)
class WeightView:
    """The ``(out, fan_in)`` view of a weight of stored ``shape``.

    Attributes:
        shape: the stored shape (what ``module.weight.shape`` says).
        transposed: the weight is stored ``(fan_in, out)`` (2-D only).
    """

    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def n_rows(self) -> int:
        """Output neurons."""
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def fan_in(self) -> int:
        """Dense fan-in of a neuron."""
        return self.shape[0] if self.transposed else math.prod(self.shape[1:])

    @property
    def rows_shape(self) -> tuple[int, int]:
        """``(out, fan_in)``."""
        return self.n_rows, self.fan_in

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (stored layout) as ``(out, fan_in)``, for reading: a view of it wherever its
        strides allow (always when transposed, then not contiguous), else a copy."""
        if self.transposed:
            return tensor.t()  # (in, out) -> (out, in)
        return tensor.reshape(self.rows_shape)  # (out, ...) -> (out, fan_in)

    def stored(self, rows: torch.Tensor) -> torch.Tensor:
        """An ``(out, fan_in)`` tensor in the stored layout (a view where the layout allows it)."""
        if self.transposed:
            return rows.t()  # (out, in) -> (in, out)
        return rows.reshape(self.shape)  # (out, fan_in) -> (out, ...)
