"""srigl.condense folds eval-mode BatchNorms into the sparse layer feeding them (srigl.condensed.folding)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import srigl
from srigl.condensed import CondensedConv2d, CondensedLinear
from sparse_models import sparsify


class ConvNet(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, affine=affine)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.bn3 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y)) + y  # conv2's output is read twice: bn2 cannot fold
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(torch.relu(self.bn3(self.fc(x))))


def _model(affine: bool = True) -> nn.Module:
    return sparsify(ConvNet(affine), density=0.4, ablated=0.0, seed=3).eval()


def test_fold_golden_single_channel():
    conv = nn.Conv2d(2, 1, 1, bias=False)  # one of two weights active: sparse
    bn = nn.BatchNorm2d(1, eps=1.0).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, 0.0]).view(1, 2, 1, 1))
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(3.0)  # sqrt(3 + eps) = 2
        bn.weight.fill_(4.0)
        bn.bias.fill_(0.5)
    conv.register_buffer("weight_mask", torch.tensor([True, False]).view(1, 2, 1, 1), persistent=False)
    condensed, report = srigl.condense(nn.Sequential(conv, bn).eval(), return_report=True)
    layer = condensed[0]
    assert isinstance(layer, CondensedConv2d) and isinstance(condensed[1], nn.Identity)
    assert layer.values.item() == 4.0  # 2 * (4 / 2)
    assert layer.bias.item() == -1.5  # (0 - 1) * 2 + 0.5
    assert report["folded_batchnorms"] == [{"batchnorm": "1", "into": "0"}]
    assert report["layers"]["0"]["folded_batchnorm"] == "1"


@pytest.mark.parametrize("affine", [True, False])
def test_folded_model_matches_the_masked_model(affine):
    model = _model(affine)
    condensed, report = srigl.condense(model, return_report=True)
    folded = {entry["batchnorm"]: entry["into"] for entry in report["folded_batchnorms"]}
    assert folded == {"bn1": "conv1", "bn3": "fc"}
    assert isinstance(condensed.bn1, nn.Identity) and isinstance(condensed.bn3, nn.Identity)
    assert isinstance(condensed.bn2, nn.BatchNorm2d)  # conv2's output also feeds the residual sum
    assert isinstance(condensed.conv1, CondensedConv2d) and condensed.conv1.bias is not None
    assert isinstance(condensed.fc, CondensedLinear)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), model(x), rtol=1e-4, atol=1e-5)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the input model is untouched


def test_no_fold_in_training_mode_or_when_disabled():
    model = _model().train()
    condensed, report = srigl.condense(model, return_report=True)
    assert report["folded_batchnorms"] == []
    assert any("bn1 after conv1 not folded: it is in training mode" in note for note in report["notes"])
    assert isinstance(condensed.bn1, nn.BatchNorm2d)
    model.eval()
    kept, report = srigl.condense(model, fold_batchnorm=False, return_report=True)
    assert report["folded_batchnorms"] == [] and isinstance(kept.bn1, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x), rtol=1e-4, atol=1e-5)


def test_dense_layers_keep_their_batchnorm():
    model = _model()
    del model.conv1.weight_mask  # conv1 is dense now (and its weight nonzero only on the old mask:
    with torch.no_grad():  # give it dense weights so it is not read as sparse)
        model.conv1.weight.copy_(torch.randn_like(model.conv1.weight))
    masks = {n + ".weight": m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    condensed, report = srigl.condense(copy.deepcopy(model), masks, return_report=True)
    assert "bn1" not in {entry["batchnorm"] for entry in report["folded_batchnorms"]}
    assert isinstance(condensed.bn1, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_folded_model_saves_and_loads(tmp_path):
    model = _model()
    condensed = srigl.condense(model)
    path = srigl.save_condensed(condensed, tmp_path / "folded.safetensors")
    loaded = srigl.load_condensed(path, ConvNet())  # the skeleton still has its BatchNorms
    assert isinstance(loaded.bn1, nn.Identity) and isinstance(loaded.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), condensed(x), rtol=0, atol=0)


class Untraceable(ConvNet):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


def test_an_untraceable_model_is_condensed_without_folding():
    model = sparsify(Untraceable(), density=0.4, ablated=0.0, seed=3).eval()
    condensed, report = srigl.condense(model, return_report=True)
    assert report["folded_batchnorms"] == [] and isinstance(condensed.bn1, nn.BatchNorm2d)
    assert any(note.endswith("no BatchNorm folded") for note in report["notes"])
    assert isinstance(condensed.conv1, CondensedConv2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), model(x), rtol=1e-4, atol=1e-5)
