"""Masked-dense storage: the dense weight stays, and a ``<param>_mask`` buffer says which entries live.

The parameter is exactly zero wherever the mask is False after every optimizer step, so
``model.fc.weight`` always reads as the effective weight. A gradient hook masks ``.grad`` (with
``masked_fill``: NaN * 0 is NaN, and a pruned weight must stay exactly 0) and, on the step before an
update, keeps the dense gradient that scores regrowth.

The mask, the saved masks and the held gradient are all in the parameter's stored layout; the update
reads them through the tensor's :class:`~srigl.orientation.WeightView` as ``(out, fan_in)`` (a
transposed view for a weight stored ``(fan_in, out)``, such as Hugging Face's ``Conv1D``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from srigl import masks
from srigl.errors import MaskError
from srigl.orientation import WeightView
from srigl.storage import grad_was_reset, reset_state


class MaskedParam:
    """One masked-dense sparse tensor (see :class:`srigl.storage.SparseParam`).

    Args:
        name: FQN of the parameter.
        module: the module that owns it.
        param_name: its local name on ``module``.
        mask: the first mask, shaped like the parameter; registered as ``<param>_mask``, and the
            parameter zeroed outside it.
        sparsity, budget, ablate: see :class:`srigl.storage.SparseParam`.
        optimizer: the optimizer stepping the parameter (its state is reset with the mask).
        transposed: the parameter is stored ``(fan_in, out)``: its neurons are its columns.
    """

    state_key = "masks"
    #: Updated on its whole dense view at once (it holds one anyway).
    block_rows = None

    def __init__(
        self,
        name: str,
        module: nn.Module,
        param_name: str,
        mask: torch.Tensor,
        sparsity: float,
        budget: int,
        ablate: bool,
        optimizer: torch.optim.Optimizer,
        *,
        transposed: bool = False,
    ):
        self.name, self.module, self.param_name = name, module, param_name
        #: The one place that maps the stored layout to the update's (out, fan_in) and back.
        self.view = WeightView(tuple(getattr(module, param_name).shape), transposed)
        self.sparsity, self.budget, self.ablate = sparsity, budget, ablate
        self.optimizer = optimizer
        self.collecting = False
        self._grad_sum: torch.Tensor | None = None
        masks.set_mask(module, param_name, mask)
        with torch.no_grad():
            self.param.masked_fill_(~mask, 0.0)
        reset_state(optimizer, self.param, mask)
        self._hooked = self.param  # the tensor the gradient hook sits on
        self._handle = self._hooked.register_hook(self._on_grad)

    # ------------------------------------------------------------------ the tensors
    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def stepped(self) -> nn.Parameter:
        return self.param

    @property
    def live_mask(self) -> torch.Tensor:
        """The mask buffer itself (not a copy)."""
        return masks.get_mask(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def n_rows(self) -> int:
        return self.view.n_rows

    @property
    def fan_in(self) -> int:
        return self.view.fan_in

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Row-major: a transposed view is copied once here rather than read column-strided by every
        # top-k and row reduction of the update.
        weight = self.view.rows(self.param.detach()).contiguous()  # (out, fan_in), a view unless transposed
        return weight, self.view.rows(self.live_mask).clone(memory_format=torch.contiguous_format)  # (out, fan_in)

    def fan_in_counts(self) -> torch.Tensor:
        return self.view.rows(self.live_mask).sum(dim=1)  # (out,)

    def mask(self) -> torch.Tensor:
        return self.live_mask.detach().clone()

    # ------------------------------------------------------------------ gradients
    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.collecting:
            # The dense gradient (of masked weights too) scores regrowth; kept only for the step
            # that updates masks. Gradient accumulation sums over backward calls, but only as long
            # as .grad does: a zero_grad() since the last backward (after a gradient probe, say)
            # starts the sum afresh, so regrowth follows what .grad saw.
            held = None if grad_was_reset(self.param) else self._grad_sum
            self._grad_sum = grad.detach().clone() if held is None else held.add_(grad)
        return grad.masked_fill(~self.live_mask, 0.0)

    def dense_grad(self) -> torch.Tensor:
        if self._grad_sum is None:  # unused in this step's forward: zero gradient
            return torch.zeros(self.n_rows, self.fan_in, dtype=self.param.dtype, device=self.param.device)
        grad, self._grad_sum = self._grad_sum, None
        return self.view.rows(grad).contiguous()  # (out, fan_in), row-major

    def grads_finite(self) -> bool:
        return self._grad_sum is None or bool(torch.isfinite(self._grad_sum).all())

    def clear(self) -> None:
        self._grad_sum = None

    def held(self) -> Iterable[torch.Tensor]:
        return [] if self._grad_sum is None else [self._grad_sum]

    # ------------------------------------------------------------------ installing masks
    def install(self, weight: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        new, old = self.view.stored(new), self.view.stored(old)  # (out, fan_in) -> stored layout
        self.live_mask.copy_(new)
        param = self.param
        param.masked_fill_(~(new & old), 0.0)  # dropped -> 0; regrown (not in old) start at exactly 0
        if param.grad is not None:
            # The gradient of a just-dropped weight would otherwise live on until zero_grad (and
            # move the weight in an optimizer step taken before it).
            param.grad.masked_fill_(~new, 0.0)
        reset_state(self.optimizer, param, new & old)

    def after_optimizer_step(self) -> None:
        param = self.param
        if param is not self._hooked:
            raise MaskError(
                f"{self.name} was replaced by another Parameter after the sparsifier was built: its gradient "
                "is no longer masked nor collected for regrowth; build the sparsifier after replacing parameters"
            )
        param.masked_fill_(~self.live_mask, 0.0)

    # ------------------------------------------------------------------ state
    def saved(self) -> torch.Tensor:
        return self.mask()

    def problem_with(self, entry: Any) -> str | None:
        if not isinstance(entry, torch.Tensor):
            return f"saved mask is a {type(entry).__name__}, not a tensor"
        if tuple(entry.shape) != self.shape:
            return f"saved mask shape {tuple(entry.shape)} != parameter shape {self.shape}"
        if entry.dtype != torch.bool:
            return f"saved mask has dtype {entry.dtype}, not torch.bool"
        return None

    def entry_problem(self, entry: torch.Tensor, structure: Any, budget: int) -> str | None:
        """Why a saved mask (already of the right shape) breaks ``structure`` with ``budget``, or None."""
        return structure.mask_problem(self.view.rows(entry), budget)

    def load(self, entry: torch.Tensor) -> None:
        mask = self.live_mask
        mask.copy_(entry.to(mask.device, torch.bool))
        self.param.masked_fill_(~mask, 0.0)
        self._grad_sum = None

    # ------------------------------------------------------------------ the rest of the contract
    def describe(self) -> dict[str, Any]:
        return {"storage": "masked"}

    def ddp_ignored_names(self, module_names: dict[int, str]) -> list[str]:
        return []  # DDP averages the dense gradient itself

    def average_over_ranks(self) -> None:
        pass

    def remove_hooks(self) -> None:
        self._handle.remove()

    def __repr__(self) -> str:
        transposed = ", transposed=True" if self.view.transposed else ""
        return f"MaskedParam({self.name!r}, shape={self.shape}{transposed}, budget={self.budget}, ablate={self.ablate})"
