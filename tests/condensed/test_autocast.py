"""Condensed and compact layers under torch.autocast (CPU bf16): a dense layer in bf16 may feed a
sparse one, as autocast's rule for matmul-like ops says (issue #15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srigl


def _net(conv: bool) -> nn.Module:
    torch.manual_seed(0)
    if conv:
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(16 * 4 * 4, 10))
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _input(conv: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g) if conv else torch.randn(8, 32, generator=g)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
def test_condensed_inference_under_autocast_matches_the_masked_model_in_bf16(conv):
    model = _net(conv)
    srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=10)
    condensed = srigl.condense(model).eval()
    x = _input(conv)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.eval()(x)
        got = condensed(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
def test_compact_training_under_autocast_updates_masks_like_fp32(conv):
    model = _net(conv)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = srigl.SRigL(model, opt, sparsity=0.8, total_steps=20, delta=2, compact=True)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    for step in range(1, 5):  # steps 2 and 4 update the masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(_input(conv)), y)
        loss.backward()
        for layer in sp.layers:
            grad = layer.module.values.grad
            assert grad is not None and grad.dtype == torch.float32 and bool(torch.isfinite(grad).all()), layer.name
        opt.step()
        stats = sp.step()
        opt.zero_grad()
        if step % 2 == 0:
            assert not stats.get("skipped") and sum(s["grown"] for s in stats["layers"].values()) > 0
    for name, entry in sp.summary().items():
        if entry["sparse"]:
            assert entry["fan_in"] is not None, f"{name}: fan-in not constant after bf16 updates"
