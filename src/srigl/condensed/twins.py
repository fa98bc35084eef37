"""Conversion of a model between masked-dense and compact (condensed) form, for compact training.

:func:`from_masked_dense` swaps every masked ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention``
for its twin in :data:`COMPACT_TWINS` (the condensed layers of :mod:`srigl.condensed.layers` and
:class:`~srigl.condensed.attention.CondensedMultiheadAttention`) and :func:`to_masked_dense` swaps
them back, with the ``<param>_mask`` buffers the masked-dense sparsifier keeps. Unlike
:func:`srigl.condensed.condense` (inference), a compact twin keeps the original bias Parameters,
keeps ablated neurons in place and accepts a state dict whose layout changed during training, so an
optimizer and a checkpoint stay valid. compact storage (:mod:`srigl.storage.compact`) converts with the helpers
here (:func:`_convert`, :func:`_why_not_compact`, :func:`_unit_of`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from srigl.masks import get_mask
from srigl.orientation import stores_transposed
from srigl.condensed.attention import CondensedMultiheadAttention, masked_dense_twin, why_attention_not_condensable
from srigl.condensed.layers import CONDENSERS, CondensedConv2d, CondensedLinear
from srigl.errors import InvalidConfigError

__all__ = ["COMPACT_TWINS", "from_masked_dense", "to_masked_dense"]

# Dense module type -> its compact training twin: the condensers of the two layer types whose dense
# gradient compact training can form (srigl.storage.compact.dense_weight_grad), and the attention. A snapshot, so
# a condenser registered later for another type does not become trainable in compact form by
# accident. Exact types only: a Linear subclass such as the out_proj of nn.MultiheadAttention is
# read as a raw tensor by its owner, so it is converted with its owner, never alone.
COMPACT_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    **{dense_type: CONDENSERS[dense_type] for dense_type in (nn.Linear, nn.Conv2d)},
    nn.MultiheadAttention: CondensedMultiheadAttention,
}
_COMPACT_LAYERS = (CondensedLinear, CondensedConv2d)
# Sparse tensors of a convertible module, by local name.
_SPARSE_TENSORS = {
    nn.Linear: ("weight",),
    nn.Conv2d: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "out_proj.weight"),
}
# Local tensor name -> the submodule of the twin that holds its values ("" is the twin itself).
_HOLDER = {"weight": "", "in_proj_weight": "in_proj", "out_proj.weight": "out_proj"}


def _why_not_compact(module: nn.Module, parent: nn.Module | None, types: tuple[type[nn.Module], ...]) -> str | None:
    """Why ``module`` cannot be swapped for a compact twin, or None when it can."""
    kind = type(module).__name__
    if stores_transposed(module):
        return f"{kind} stores its weight (in, out) and has no compact twin; it trains masked-dense"
    if type(module) not in COMPACT_TWINS:
        return f"{kind} has no compact twin"
    if type(module) not in types:
        return f"{kind} not in compact_types"
    if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        # The dense gradient for regrowth is formed with torch.nn.grad.conv2d_weight, which takes
        # numeric zero padding only.
        return f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    if isinstance(module, nn.MultiheadAttention):
        return why_attention_not_condensable(module, parent)
    if parent is None:
        return "the root module cannot be swapped"
    return None


def _resize_to_incoming(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: take the saved layout's shapes (``k'`` and ``n_active`` change
    with ablation), so a checkpoint loads into a freshly converted model in any order."""
    values = state_dict.get(prefix + "values")
    if isinstance(values, torch.Tensor) and values.shape != module.values.shape:
        # The same Parameter keeps its place in the optimizer; a new one would be stepped by nobody.
        module.values.data = module.values.new_empty(values.shape)
        module.values.grad = None
    for name in ("indices", "active_rows"):
        saved, mine = state_dict.get(prefix + name), getattr(module, name)
        if isinstance(saved, torch.Tensor) and saved.shape != mine.shape:
            setattr(module, name, mine.new_empty(saved.shape))


def _compact_twin(module: nn.Module, mask: torch.Tensor, name: str) -> nn.Module:
    """The compact twin of a Linear (subclasses too) or Conv2d under ``mask``; it shares the original
    bias Parameter, so an optimizer holding that bias stays right."""
    twin_type = CondensedConv2d if isinstance(module, nn.Conv2d) else CondensedLinear
    twin = twin_type.from_dense(module, mask, name=name)
    if module.bias is not None:
        twin.bias = module.bias
    twin.values.requires_grad_(module.weight.requires_grad)
    twin.register_load_state_dict_pre_hook(_resize_to_incoming)
    return twin


def _masks_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The ``<param>_mask`` buffers of a convertible module, by local tensor name."""
    masks = {}
    for local in _SPARSE_TENSORS.get(type(module), ()):
        owner_name, _, param_name = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        mask = get_mask(owner, param_name)
        if mask is not None:
            masks[local] = mask
    return masks


def _convert(module: nn.Module, masks: Mapping[str, torch.Tensor], name: str) -> nn.Module:
    """The compact twin of ``module`` under ``masks`` (local tensor name -> mask)."""
    if isinstance(module, nn.MultiheadAttention):
        return CondensedMultiheadAttention.from_masked(module, masks, name, condense_projection=_compact_twin)
    return _compact_twin(module, masks["weight"], f"{name}.weight")


def from_masked_dense(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, nn.Module]:
    """Swap masked ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention`` modules for compact twins, in place.

    Args:
        model: a model whose sparse weights are exactly zero outside their masks.
        masks: ``{param FQN: bool mask}`` (e.g. ``"fc1.weight"``, ``"blocks.0.attn.in_proj_weight"``);
            by default the ``<param>_mask`` buffers the masked-dense sparsifier registers. Modules
            without a mask stay as they are.

    Returns:
        ``{module name: compact module}`` for every swapped module. Biases (and unmasked weights of
        an attention) stay the original Parameters; each compact ``values`` is a new Parameter (an
        optimizer built before the call still holds the dense weights: build it after, or let
        compact storage convert it).

    Raises:
        srigl.errors.MaskError: a mask with the wrong shape, or a weight nonzero outside its mask.
        srigl.errors.NotConstantFanInError: a mask whose active rows have different fan-ins.
        InvalidConfigError: a mask for a tensor that cannot be made compact (the reason is named).
    """
    wanted = dict(masks) if masks is not None else None
    modules = dict(model.named_modules())
    swapped: dict[str, nn.Module] = {}
    for module_name, module in modules.items():
        if type(module) not in _SPARSE_TENSORS or any(module_name.startswith(f"{n}.") for n in swapped):
            continue
        prefix = f"{module_name}." if module_name else ""
        if wanted is None:
            local = _masks_of(module)
        else:
            local = {t: wanted.pop(prefix + t) for t in _SPARSE_TENSORS[type(module)] if prefix + t in wanted}
        if not local:
            continue
        parent = modules.get(module_name.rpartition(".")[0]) if module_name else None
        reason = _why_not_compact(module, parent, tuple(COMPACT_TWINS))
        if reason is not None:
            raise InvalidConfigError(f"{sorted(prefix + t for t in local)}: cannot be made compact ({reason})")
        twin = _convert(module, local, module_name)
        model.set_submodule(module_name, twin)
        swapped[module_name] = twin
    if wanted:
        raise InvalidConfigError(f"masks name {len(wanted)} tensors without a compact twin: {sorted(wanted)[:5]}")
    return swapped


def to_masked_dense(model: nn.Module) -> dict[str, torch.Tensor]:
    """Swap every compact module of ``model`` back for its dense type, in place.

    Dense weights are zero outside their masks, and each mask is registered as the non-persistent
    ``<param>_mask`` buffer, exactly as the masked-dense sparsifier keeps it. Biases are the compact
    modules' own Parameters.

    Returns:
        ``{param FQN: bool mask}`` shaped like each dense weight.
    """
    masks: dict[str, torch.Tensor] = {}
    # Attentions first: their compact projections are children that must not be swapped on their own.
    for module_name, module in list(model.named_modules()):
        if isinstance(module, CondensedMultiheadAttention) and module_name:
            dense, local = module.to_dense()
            model.set_submodule(module_name, dense)
            masks.update({f"{module_name}.{t}": mask for t, mask in local.items()})
    for module_name, module in list(model.named_modules()):
        if isinstance(module, _COMPACT_LAYERS) and module_name:
            dense = masked_dense_twin(module)
            model.set_submodule(module_name, dense)
            masks[f"{module_name}.weight"] = get_mask(dense, "weight")
    return masks


def _unit_of(name: str, modules: Mapping[str, nn.Module]) -> tuple[str, str]:
    """The module swapped to make tensor ``name`` compact, and the tensor's name local to it: the
    owner of a weight, or the attention owning ``in_proj_weight`` or ``out_proj.weight``."""
    module_name, _, param_name = name.rpartition(".")
    parent_name, _, child = module_name.rpartition(".")
    if child == "out_proj" and param_name == "weight" and type(modules.get(parent_name)) is nn.MultiheadAttention:
        return parent_name, "out_proj.weight"
    return module_name, param_name
