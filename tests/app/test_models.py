"""Model registry: every registered model on both input shapes, one SGD step, naming of the
input and output layers, deterministic construction, and golden parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srigl.app.models import UnknownModelError, create_model, list_models, register_model

INPUT_SHAPES = [(1, 28), (3, 32)]  # (in_channels, image_size): MNIST-like and CIFAR-like
NUM_CLASSES = 7  # not 10, so a hard-coded 10 anywhere shows up
# Narrow versions for the backward-pass test, which keeps the file fast on a busy 2-core
# machine; a model missing here is tested at its defaults.
SMALL = {"resnet18": {"width": 0.25}, "wrn-22-2": {"depth": 10, "widen_factor": 1}, "vit-tiny": {"dim": 32, "depth": 2}}
# Real-size entries whose defaults do not fit 28x28 (patch 16) or are too slow for every test:
# every test builds them with these overrides; their real size is shape-checked on the meta device.
TINY = {"vit-b16": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}, "resnet50": {"width": 0.125}}
SMALL.update(TINY)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels,image_size", INPUT_SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", list_models())
def test_output_shape(name, in_channels, image_size):
    torch.manual_seed(0)
    model = create_model(name, in_channels, image_size, NUM_CLASSES, **TINY.get(name, {}))
    logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, image_size, image_size)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("in_channels,image_size", INPUT_SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", list_models())
def test_one_sgd_step_gives_every_parameter_a_finite_gradient(name, in_channels, image_size):
    torch.manual_seed(0)
    model = create_model(name, in_channels, image_size, NUM_CLASSES, **SMALL.get(name, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, in_channels, image_size, image_size)
    y = torch.randint(0, NUM_CLASSES, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{name}: SGD step changed no parameter"


@pytest.mark.parametrize("name", list_models())
def test_classifier_and_first_layer_are_named(name):
    model = create_model(name, 3, 32, NUM_CLASSES, **TINY.get(name, {}))
    classifier = model.get_submodule(model.classifier_name)
    assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES
    expected = "head" if name.startswith("vit") else "fc"
    assert model.classifier_name == expected
    first = model.get_submodule(model.first_layer_name)
    fan_in = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    assert fan_in in (3, 3 * 32 * 32)


@pytest.mark.parametrize("name", list_models())
def test_construction_is_deterministic_under_manual_seed(name):
    torch.manual_seed(123)
    a = create_model(name, 1, 28, NUM_CLASSES, **TINY.get(name, {})).state_dict()
    torch.manual_seed(123)
    b = create_model(name, 1, 28, NUM_CLASSES, **TINY.get(name, {})).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownModelError) as info:
        create_model("alexnet", 1, 28, 10)
    assert isinstance(info.value, ValueError)
    for name in list_models():
        assert name in str(info.value)


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_model("mlp")(lambda **kwargs: nn.Identity())


def test_mlp_is_lenet_300_100():
    model = create_model("mlp", 1, 28, 10)
    # 784*300 + 300 + 300*100 + 100 + 100*10 + 10
    assert n_params(model) == 266_610
    assert [m.weight.shape for m in (model.fc1, model.fc2, model.fc)] == [(300, 784), (100, 300), (10, 100)]


def test_lenet5_flatten_size_follows_the_input():
    assert create_model("lenet5", 1, 28, 10).fc1.in_features == 16 * 5 * 5
    assert create_model("lenet5", 3, 32, 10).fc1.in_features == 16 * 6 * 6
    assert n_params(create_model("lenet5", 1, 28, 10)) == 61_706


def test_resnet18_parameter_count_and_width():
    assert n_params(create_model("resnet18", 3, 32, 10)) == 11_173_962
    narrow = create_model("resnet18", 3, 32, 10, width=0.25)
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128


def test_wide_resnet_depth_and_width():
    model = create_model("wrn-22-2", 3, 32, 10)
    assert [len(g) for g in (model.block1, model.block2, model.block3)] == [3, 3, 3]
    assert model.fc.in_features == 128
    deeper = create_model("wrn-22-2", 3, 32, 10, depth=16, widen_factor=4)
    assert len(deeper.block1) == 2 and deeper.fc.in_features == 256
    with pytest.raises(ValueError, match="6n \\+ 4 .* got 23"):
        create_model("wrn-22-2", 3, 32, 10, depth=23)


def test_vit_patch_grid_and_options():
    assert create_model("vit-tiny", 1, 28, 10).pos_embed.shape == (1, 7 * 7 + 1, 128)
    assert create_model("vit-tiny", 3, 32, 10).pos_embed.shape == (1, 8 * 8 + 1, 128)
    small = create_model("vit-tiny", 3, 32, 10, dim=64, depth=2, heads=2, mlp_dim=96)
    assert len(small.blocks) == 2 and small.head.in_features == 64
    with pytest.raises(ValueError, match="image_size 28 is not a multiple of patch_size 8"):
        create_model("vit-tiny", 1, 28, 10, patch_size=8)
    with pytest.raises(ValueError, match="dim 100 is not a multiple of heads 3"):
        create_model("vit-tiny", 1, 28, 10, dim=100, heads=3)


def test_vit_b16_real_size_on_the_meta_device():
    with torch.device("meta"):
        model = create_model("vit-b16", 3, 224, 1000)
        logits = model(torch.empty(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert model.pos_embed.shape == (1, 14 * 14 + 1, 768) and len(model.blocks) == 12
    assert model.blocks[0].mlp[0].weight.shape == (3072, 768) and model.blocks[0].attn.num_heads == 12
    assert 86_000_000 < n_params(model) < 87_000_000  # ViT-B/16 with a 1000-class head: 86.6M
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("vit-b16", 1, 28, 10)


def test_resnet50_real_size_on_the_meta_device():
    with torch.device("meta"):
        model = create_model("resnet50", 3, 224, 1000)
        logits = model(torch.empty(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    assert model.fc.in_features == 2048
    assert n_params(model) == 25_557_032  # torchvision's resnet50 count
