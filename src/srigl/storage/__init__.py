"""How one sparse tensor is stored while it trains: the seam between the update and the memory.

The :class:`srigl.Sparsifier` runs one update template over every sparse tensor; what differs
between a masked-dense weight and a compact ``(n_active, k)`` layer is only how the tensor is held,
how its dense gradient is obtained and how a new mask is installed. Each sparse tensor is a
:class:`SparseParam`, addressed by the FQN of its dense weight:

* :class:`~srigl.storage.masked.MaskedParam` (``storage="masked"``, the default): the dense weight
  plus a ``<param>_mask`` buffer; a gradient hook masks ``.grad`` and, on the step before an
  update, sums the dense gradient.
* :class:`~srigl.storage.compact.CompactParam` (``storage="compact"``): the layer is swapped for a
  condensed twin whose ``(n_active, k)`` values the optimizer steps; on the step before an update a
  forward hook keeps its input and output gradient, and the dense gradient ``g^T x`` is formed one
  layer at a time. Imported only when asked for (it needs :mod:`srigl.condensed`).

The sparsifier never asks which kind it holds.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch


class SparseParam(Protocol):
    """One sparse tensor as the sparsifier sees it. ``n_rows``, ``fan_in`` and every tensor the update
    reads or gets are of the dense ``(out, fan_in)`` view (:mod:`srigl.orientation`); masks it saves or
    returns are shaped like the stored weight."""

    name: str  # FQN of the dense weight, e.g. "layer1.0.conv1.weight"
    shape: tuple[int, ...]  # the dense weight's shape as stored (a Hugging Face Conv1D's is (in, out))
    sparsity: float  # target from the distribution
    budget: int  # active weights this tensor keeps (fixed for the run)
    ablate: bool  # whether its neurons may be ablated
    #: Set by the sparsifier on the step before an update: keep what forms the dense gradient.
    collecting: bool
    #: The key of this kind in the sparsifier's ``state_dict`` (``"masks"`` or ``"layouts"``).
    state_key: str
    #: Rows per block when the update runs on the condensed layout (:mod:`srigl.blockwise`, with
    #: ``layout``, ``weight_rows``, ``grad_rows`` and ``install_layout``); None: on :meth:`dense_view`.
    block_rows: int | None

    @property
    def stepped(self) -> torch.Tensor:
        """The Parameter the optimizer steps for this tensor (the dense weight, or compact values)."""

    @property
    def n_rows(self) -> int: ...

    @property
    def fan_in(self) -> int: ...

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, mask)`` as ``(out, fan_in)`` tensors: the weight to read (it may be a view of
        the live parameter), and a copy of the mask."""

    def fan_in_counts(self) -> torch.Tensor:
        """Active weights per output neuron, ``(out,)``, without building the dense mask."""

    def mask(self) -> torch.Tensor:
        """The bool mask shaped like the dense weight (a copy)."""

    def dense_grad(self) -> torch.Tensor:
        """This rank's dense ``(out, fan_in)`` gradient for the update (zeros if the tensor was unused)."""

    def grads_finite(self) -> bool:
        """Whether what the dense gradient would be formed from is finite (checked before any update)."""

    def install(self, weight: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Make ``new`` the mask: kept weights keep their values and optimizer state, regrown ones
        start at 0 with zero state. ``weight`` and ``old`` are what :meth:`dense_view` gave."""

    def after_optimizer_step(self) -> None:
        """Keep inactive weights exactly 0 after ``optimizer.step()``."""

    def clear(self) -> None:
        """Let go of everything held for the dense gradient."""

    def held(self) -> Iterable[torch.Tensor]:
        """The tensors held right now for the dense gradient (memory accounting)."""

    def saved(self) -> Any:
        """This tensor's entry in the sparsifier's ``state_dict[state_key]``."""

    def problem_with(self, entry: Any) -> str | None:
        """Why ``entry`` (a saved :meth:`saved`) cannot be loaded here, or None."""

    def entry_problem(self, entry: Any, structure: Any, budget: int) -> str | None:
        """Why a saved entry (that passed :meth:`problem_with`) breaks ``structure`` with ``budget``."""

    def load(self, entry: Any) -> None:
        """Take a saved :meth:`saved` entry (already checked with :meth:`problem_with`)."""

    def describe(self) -> dict[str, Any]:
        """Storage facts for the summary (``storage``, and for compact ``layout``)."""

    def ddp_ignored_names(self, module_names: dict[int, str]) -> list[str]:
        """Tensors (relative to the model) DDP must leave alone; ``module_names`` maps ``id(module)``."""

    def average_over_ranks(self) -> None:
        """From now on average over ranks what DDP does not (for compact: the values' gradients)."""

    def remove_hooks(self) -> None:
        """Detach this tensor's hooks."""


STORAGES = ("masked", "compact")


def reset_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero every optimizer state tensor shaped like ``param`` outside ``keep`` (bool, same shape)."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(~keep, 0)


def grad_was_reset(param: torch.Tensor) -> bool:
    """Whether ``param.grad`` was cleared since the last backward: None (``zero_grad()``), or all
    zeros (``zero_grad(set_to_none=False)``). Checked only on the step before a mask update."""
    return param.grad is None or not bool(param.grad.any())
