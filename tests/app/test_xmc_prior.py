"""The XMC head's bias starts at the logit of the mean label density (#16): golden values, the
degenerate densities refused by name, and the app's untrained head (``--lr 1e-9``) predicting that density."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from srigl.app.cli import main
from srigl.app.datasets.xmc_sources import load_xmc
from srigl.app.train import load_trained_model
from srigl.app.xmc_models import init_prior_bias, prior_logit
from srigl.errors import InvalidConfigError


@pytest.mark.parametrize(("positive", "points", "labels", "logit"), [
    (3, 2, 3, 0.0),                      # p = 1/2
    (2, 4, 2, math.log(1 / 3)),          # p = 1/4: log(0.25 / 0.75)
    (1, 10, 1000, math.log(1 / 9999)),   # p = 1e-4: log(1e-4 / 0.9999)
])
def test_prior_logit_by_hand(positive, points, labels, logit):
    assert prior_logit(positive, points, labels) == pytest.approx(logit, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("positive", "points", "labels"), [(0, 5, 7), (35, 5, 7), (-1, 5, 7)])
def test_a_density_of_0_or_1_is_refused_with_its_counts(positive, points, labels):
    with pytest.raises(InvalidConfigError, match=f"{positive} positive labels over {points} points x {labels} labels"):
        prior_logit(positive, points, labels)


def test_init_prior_bias_fills_every_label_and_leaves_the_weights():
    head = nn.Linear(4, 50)
    weight = head.weight.detach().clone()
    init_prior_bias(head, n_positive=30, n_points=12, n_labels=50)  # p = 30 / 600 = 0.05
    assert torch.equal(head.weight, weight)
    assert torch.allclose(torch.sigmoid(head.bias), torch.full((50,), 0.05))


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked", "compact"])
def test_the_apps_head_starts_at_the_training_labels_density(tmp_path, engine):
    out = tmp_path / "run"
    flags = ["--data", "xmc-synthetic", "--xmc-points", "400", "--xmc-features", "120", "--xmc-labels", "60",
             "--xmc-hidden", "32", "--batch-size", "100", "--epochs", "1", "--lr", "1e-9", "--method", "srigl",
             "--no-progress", "--out", str(out), *engine]
    assert main(["train", *flags]) == 0
    train = load_xmc("xmc-synthetic", points=400, features=120, labels=60).train
    density = train.labels.indices.numel() / (len(train) * 60)
    model, _ = load_trained_model(out)
    bias = model.head.bias.detach()  # lr 1e-9: the initial bias, to float rounding
    assert bias.shape == (60,)
    assert torch.allclose(torch.sigmoid(bias), torch.full((60,), density), rtol=1e-4)
