"""Sparse models and masks shared by the condensed, serialization and export tests.

Lives at the root of tests/ (on sys.path through the rootdir conftest), so every test directory
imports it by name: ``from sparse_models import sparsify``.
"""

from __future__ import annotations

import torch
from torch import nn

from srigl.structures import ConstantFanIn, topk_mask


def constant_fan_in_mask(shape, density: float, ablated: float, generator: torch.Generator) -> torch.Tensor:
    """A random constant fan-in bool mask of ``shape`` with ``round(ablated * out)`` empty rows."""
    out, fan_in = shape[0], torch.Size(shape[1:]).numel()
    k = max(1, round(density * fan_in))
    mask = topk_mask(torch.rand(out, fan_in, generator=generator), k, ConstantFanIn())  # (out, fan_in)
    mask[torch.randperm(out, generator=generator)[: round(ablated * out)]] = False
    return mask.view(shape)


def sparsify(model: nn.Module, density=0.3, ablated=0.25, seed=0, skip=()) -> nn.Module:
    """Give every Linear/Conv2d (but ``skip``) a ``weight_mask`` buffer as the sparsifier does, and a
    random bias and BatchNorm statistics so that folded constants are not trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        with torch.no_grad():
            if type(module) in (nn.Linear, nn.Conv2d) and name not in skip:
                mask = constant_fan_in_mask(module.weight.shape, density, ablated, generator)
                module.register_buffer("weight_mask", mask, persistent=False)
                module.weight.mul_(mask)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.randn(module.num_features, generator=generator))
                    module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()


def assert_same_outputs(reference: nn.Module, condensed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = reference(x), condensed(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


class SmallCNN(nn.Module):
    """Conv -> BN -> ReLU -> Conv (no padding) -> ReLU -> MaxPool -> Conv -> ReLU -> pool -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3),
        )
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = torch.relu(self.features(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


class _AttentionBlock(nn.Module):
    """Pre-norm-free transformer block: ``x + attn(x)``, then ``x + mlp(x)``."""

    def __init__(self, dim=8, heads=2, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


def _mask_attention(model, generator, in_density=0.5, out_density=0.5, ablated=0.25):
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            e = module.embed_dim
            masks[f"{name}.in_proj_weight"] = constant_fan_in_mask((3 * e, e), in_density, ablated, generator)
            masks[f"{name}.out_proj.weight"] = constant_fan_in_mask((e, e), out_density, ablated, generator)
            with torch.no_grad():
                module.in_proj_weight.mul_(masks[f"{name}.in_proj_weight"])
                module.out_proj.weight.mul_(masks[f"{name}.out_proj.weight"])
                module.in_proj_bias.copy_(torch.randn(3 * e, generator=generator))
                module.out_proj.bias.copy_(torch.randn(e, generator=generator))
    return masks

