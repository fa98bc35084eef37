"""Where masks live, and the model or optimizer a wrapper hides: the one owner of these conventions.

A masked-dense sparse parameter keeps its mask on the module that owns it, as a non-persistent bool
buffer named ``<param>_mask`` (``fc.weight`` -> ``fc.weight_mask``). It follows ``.to(device)``,
:func:`srigl.condense` and the FLOP counter find it, and the model's own ``state_dict`` keeps its
usual keys (the sparsifier's ``state_dict`` holds the masks).

Wrappers (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``'s ``OptimizedModule``)
rename parameters (``module.fc.weight``, ``_orig_mod.fc.weight``); srigl always names tensors by the
user's own module, :func:`unwrap`. Training frameworks wrap the optimizer too (accelerate's
``AcceleratedOptimizer`` under the Hugging Face Trainer, Lightning's ``LightningOptimizer``); the
sparsifier hooks the torch optimizer inside, :func:`unwrap_optimizer`.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_SUFFIX = "_mask"


def mask_name(param_name: str) -> str:
    """The buffer name of ``param_name``'s mask on its owning module (``"weight"`` -> ``"weight_mask"``)."""
    return param_name + MASK_SUFFIX


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """``module``'s mask buffer for its parameter ``param_name``, or None when it has none."""
    return module._buffers.get(mask_name(param_name))


def set_mask(module: nn.Module, param_name: str, mask: torch.Tensor) -> None:
    """Register (or replace) the mask buffer of ``module.<param_name>``; not saved with the module."""
    module.register_buffer(mask_name(param_name), mask, persistent=False)


def split_fqn(fqn: str) -> tuple[str, str]:
    """``"blocks.0.fc.weight"`` -> ``("blocks.0.fc", "weight")``; a root parameter has module ``""``."""
    module_name, _, param_name = fqn.rpartition(".")
    return module_name, param_name


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{param FQN: mask}`` of every ``<param>_mask`` buffer in ``model`` (wrappers unwrapped)."""
    found = {}
    for module_name, module in unwrap(model).named_modules():
        for name, param in module.named_parameters(recurse=False):
            mask = get_mask(module, name)
            if mask is not None:
                found[f"{module_name}.{name}".lstrip(".")] = mask
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers, however nested."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside delegating wrappers (accelerate, Lightning), however nested.

    A wrapper is recognised by what it does, not by its type (srigl imports neither framework): its
    ``optimizer`` attribute is another torch optimizer whose very ``param_groups`` it shows. Its
    ``step`` calls the inner optimizer's, so a step hook must sit on the inner one (accelerate's
    wrapper, a ``torch.optim.Optimizer`` subclass that never ran ``Optimizer.__init__``, cannot even
    take one).
    """
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if (
            not isinstance(inner, torch.optim.Optimizer)
            or inner is optimizer
            or getattr(optimizer, "param_groups", None) is not inner.param_groups
        ):
            return optimizer
        optimizer = inner
