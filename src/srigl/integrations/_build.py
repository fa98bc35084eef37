"""What both callbacks do alike: build the sparsifier on the framework's real model and optimizer,
fresh or from a saved state, once the framework has created (and perhaps restored) them."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from srigl.algorithms import get_algorithm
from srigl.sparsifier import Sparsifier


def check_method(method: str) -> str:
    """``method`` if it names a registered algorithm (else the registry's InvalidConfigError, at once)."""
    get_algorithm(method)
    return method


def build_sparsifier(
    model: nn.Module,
    optimizer: Any,
    method: str,
    sparsity: Any,
    total_steps: int,
    kwargs: Mapping[str, Any],
    saved: Mapping[str, Any] | None = None,
) -> Sparsifier:
    """The sparsifier ``method`` over ``model`` and ``optimizer``, resumed from ``saved`` when given.

    On resume the framework has already loaded the trained weights (and the Hugging Face Trainer the
    optimizer state too, before any callback runs). The first masks are then the loaded weights' own
    non-zeros (``mask_init="nonzero"``: no weight is zeroed or rescaled, whatever ``mask_init`` the
    run began with), and the saved state replaces them exactly. Building resets the optimizer state
    only outside those first masks, where the weights are exactly 0 and so is their state (a weight
    is regrown at 0 with its state reset, and stays 0 only where its gradient was 0).
    """
    kwargs = {"total_steps": total_steps, **kwargs}
    if saved is None:
        return get_algorithm(method)(model, optimizer, sparsity, **kwargs)
    sparsifier = get_algorithm(method)(model, optimizer, sparsity, **{**kwargs, "mask_init": "nonzero"})
    sparsifier.load_state_dict(saved)
    return sparsifier
