"""The training run (:mod:`srigl.app.train`): the LR schedule, the sparse initialisation, one
training step of every registered model under every registered algorithm, and the same starting
point from ``srigl train`` as from the Python API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import srigl
from srigl.app import train as train_module
from srigl.app.cli import main
from srigl.app.config import TrainConfig, resolve_config
from srigl.app.models import create_model, list_models
from srigl.app.train import build_optimizer, build_sparsifier, lr_factor

from .test_models import TINY


# ------------------------------------------------------------------------------------------ LR
def test_lr_factor_golden():
    # 10 steps, 2 of warm-up: 0.5, 1.0, then cosine over the remaining 8 steps.
    assert lr_factor(0, 10, 2, "cosine") == 0.5
    assert lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(5, 10, 0, "constant") == 1.0
    # step: x0.2 from 30 %, x0.04 from 60 %, x0.008 from 90 % of the steps.
    assert [lr_factor(s, 10, 0, "step") for s in (0, 2, 3, 6, 9)] == pytest.approx([1, 1, 0.2, 0.04, 0.008])


# ------------------------------------------------------------------------------------------ sparse init
@pytest.mark.parametrize("compact", [False, True], ids=["masked", "compact"])
def test_sparse_init_rescales_to_sparse_fan_in_golden(compact):
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, optimizer, sparsity={"0.weight": 0.75, "2.weight": 0.0}, total_steps=10, compact=compact)
    assert sp.storage == ("compact" if compact else "masked")
    # k = 4 of 16 per neuron: active weights become sqrt(16 / 4) = 2, inactive stay 0.
    weight, mask = sp.layers[0].dense_view()[0], sp.masks()["0.weight"]  # (4, 16) each
    assert torch.equal(weight[mask], torch.full((16,), 2.0))
    assert torch.equal(weight[~mask], torch.zeros(48))


# ------------------------------------------------------------------------------------------ registry x registry
@pytest.mark.parametrize("algorithm", sorted(srigl.ALGORITHMS))
@pytest.mark.parametrize("model_name", list_models())
def test_every_model_trains_one_step_under_every_algorithm(model_name, algorithm):
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=1, image_size=28, num_classes=10, **TINY.get(model_name, {}))
    config = resolve_config(TrainConfig(data="digits", model=model_name, method=algorithm, sparsity=0.9, delta=1))
    optimizer = build_optimizer(config, model)
    # total_steps 4 -> t_end 3: step 1 is a mask update (RigL/SRigL/SET drop and regrow).
    sp = build_sparsifier(config, model, optimizer, total_steps=4)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(images), labels)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    stats = sp.step()
    optimizer.zero_grad()
    assert (stats is not None) == (algorithm != "static")
    assert sp.global_sparsity() == pytest.approx(0.9, abs=0.01)
    for name, mask in sp.masks().items():
        weight = model.get_parameter(name)
        assert not weight[~mask].any(), f"{name} has non-zero weights outside its mask"
    assert torch.isfinite(nn.functional.cross_entropy(model(images), labels))


# ------------------------------------------------------------------------------------------ CLI = API
@pytest.mark.parametrize("method", sorted(srigl.ALGORITHMS))
def test_cli_and_python_api_start_from_the_same_weights_and_masks(tmp_path, monkeypatch, method):
    # What `srigl train` builds, caught as its sparsifier is made (before any training step).
    started = {}

    def build_and_record(config, model, optimizer, total_steps):
        sparsifier = build_sparsifier(config, model, optimizer, total_steps)
        started.update(weights=copy.deepcopy(model.state_dict()), masks=copy.deepcopy(sparsifier.masks()),
                       config=sparsifier.config(), total_steps=total_steps)
        return sparsifier

    monkeypatch.setattr(train_module, "build_sparsifier", build_and_record)
    assert main(["train", "--data", "digits", "--model", "mlp", "--method", method, "--sparsity", "0.9",
                 "--seed", "3", "--epochs", "1", "--limit-train", "128", "--limit-test", "64",
                 "--batch-size", "64", "--no-progress", "--out", str(tmp_path / "run")]) == 0

    # The README's way, with the same seed and step count and every other argument at its default.
    torch.manual_seed(3)
    model = create_model("mlp", in_channels=1, image_size=28, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = srigl.ALGORITHMS[method](model, optimizer, sparsity=0.9, total_steps=started["total_steps"], seed=3)

    assert sparsifier.config() == started["config"]  # the CLI's defaults are the API's
    weights = model.state_dict()
    assert weights.keys() == started["weights"].keys()
    for name, weight in weights.items():
        assert torch.equal(weight, started["weights"][name]), name
    masks = sparsifier.masks()
    assert masks.keys() == started["masks"].keys() and masks
    for name, mask in masks.items():
        assert torch.equal(mask, started["masks"][name]), name
