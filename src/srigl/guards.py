"""Guards against misuse that would silently lose work: a second sparsifier on tensors another one
masks, and weights loaded without their masks (``model.state_dict()`` holds none)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from srigl import initial
from srigl.errors import InvalidConfigError, MaskError, SriglError
from srigl.storage.masked import MaskedParam

if TYPE_CHECKING:
    from srigl.sparsifier import Sparsifier

# Tensor -> the sparsifier that masks it. Weak both ways: nothing here keeps either alive.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_unclaimed(sp: "Sparsifier", names: list[str]) -> None:
    """Refuse tensors that another live sparsifier masks (it would lose its masks silently)."""
    params = dict(sp.model.named_parameters())
    for name in names:
        owner = _OWNERS.get(params[name])
        if owner is not None and owner is not sp:
            raise InvalidConfigError(
                f"{name} is already sparsified by another {type(owner).__name__} (step {owner.step_count}); "
                "a second sparsifier would replace its masks: call remove_hooks() on the first one before "
                "building another"
            )


def claim(sp: "Sparsifier") -> None:
    """Record ``sp`` as the owner of its tensors."""
    for layer in sp.layers:
        _OWNERS[layer.stepped] = sp


def release(sp: "Sparsifier") -> None:
    """Forget ``sp`` as the owner of its tensors (after ``remove_hooks``)."""
    for layer in sp.layers:
        if _OWNERS.get(layer.stepped) is sp:
            del _OWNERS[layer.stepped]


@torch.no_grad()
def adopt_loaded_weights(sp: "Sparsifier", module: nn.Module) -> None:
    """After ``module.load_state_dict``: where the loaded weights have non-zeros outside the masks,
    re-derive the masks from the weights' zeros (they fit the structure and budget), or raise.

    Saving only ``model.state_dict()`` (the common habit; Lightning's and Hugging Face's checkpoints do
    the same) and loading it into a model that already has a sparsifier would otherwise zero the
    weights outside the new random masks at the next optimizer step.
    """
    for layer in sp.layers:
        if not isinstance(layer, MaskedParam) or layer.module is not module:
            continue
        weight, mask = layer.dense_view()  # (out, fan_in) each
        outside = int(((weight != 0) & ~mask).sum())
        if outside == 0:
            continue
        n = layer.budget // sp.structure.units(layer.n_rows, layer.fan_in)
        try:
            new = initial.nonzero_mask(weight, sp.structure, n, layer.name)
        except SriglError as e:  # InvalidConfigError, NotConstantFanInError
            raise MaskError(
                f"{layer.name}: the loaded weights have {outside} non-zeros outside the sparsifier's mask, and "
                f"their zeros do not fit {sp.structure!r} with budget {layer.budget} ({e}); load the "
                "sparsifier's state_dict() with the model's (srigl.save_checkpoint keeps both)"
            ) from e
        layer.install(weight, new, new)  # every loaded weight is kept, with its optimizer state
        warnings.warn(
            f"srigl: {layer.name} was loaded with {outside} non-zeros outside its mask (model.state_dict() holds "
            "no masks): its mask is re-derived from the loaded weights' zeros; save and load "
            "sparsifier.state_dict() too to keep masks exactly",
            UserWarning,
            stacklevel=4,
        )
