"""Weights stored ``(fan_in, out)`` (Hugging Face's ``Conv1D``): the engine reads them through a
transposed :class:`srigl.orientation.WeightView`, so every output neuron (a column) keeps a constant
fan-in and ablation removes columns. Tested with a stand-in class carrying the real qualified name
(srigl's core never imports transformers); tests/integrations/test_gpt2.py runs the real GPT-2.

The twin test is the main one: a model of stand-in Conv1D layers and the same model built of
``nn.Linear`` layers holding the transposed weights must train to the same (transposed) masks and weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import srigl
from srigl.orientation import WeightView, stores_transposed
from srigl.selection import SparsityPolicy, select


class Conv1D(nn.Module):
    """The contract of ``transformers.pytorch_utils.Conv1D``: weight ``(nx, nf)`` = ``(in, out)``, ``x @ W + b``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)  # (in, out)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"  # what srigl.orientation recognises


class Conv1DSubclass(Conv1D):
    pass


def conv1d_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Conv1D(24, 12), nn.ReLU(), Conv1D(20, 24), nn.ReLU(), nn.Linear(20, 5))


def as_linear_twin(model: nn.Sequential) -> nn.Sequential:
    """The same function with every Conv1D replaced by the nn.Linear over its transposed weight."""
    twin = copy.deepcopy(model)
    for i, layer in enumerate(model):
        if isinstance(layer, Conv1D):
            linear = nn.Linear(*layer.weight.shape, dtype=layer.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.weight.t())  # (in, out) -> (out, in)
                linear.bias.copy_(layer.bias)
            twin[i] = linear
    return twin


# ---------------------------------------------------------------------- WeightView, golden
def test_weight_view_of_a_transposed_weight_is_a_view_of_its_columns():
    stored = torch.arange(6.0).view(3, 2)  # (in=3, out=2)
    view = WeightView((3, 2), transposed=True)
    assert (view.n_rows, view.fan_in, view.rows_shape) == (2, 3, (2, 3))
    rows = view.rows(stored)
    assert torch.equal(rows, torch.tensor([[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]))  # neuron j: column j
    assert rows.data_ptr() == stored.data_ptr()  # a view: no copy of the weight
    back = view.stored(rows)
    assert torch.equal(back, stored) and back.stride() == stored.stride()


def test_weight_view_of_an_ordinary_weight_flattens_its_fan_in():
    view = WeightView((4, 2, 3, 3))
    weight = torch.randn(4, 2, 3, 3)
    assert (view.n_rows, view.fan_in) == (4, 18)
    assert torch.equal(view.rows(weight), weight.reshape(4, 18))
    assert torch.equal(view.stored(view.rows(weight)), weight)


def test_stores_transposed_knows_the_type_by_qualified_name_and_subclasses():
    assert stores_transposed(Conv1D(3, 4)) and stores_transposed(Conv1DSubclass(3, 4))
    assert not stores_transposed(Conv1D(3, 4), "bias")
    assert not stores_transposed(nn.Linear(4, 3))
    look_alike = type("Conv1D", (nn.Module,), {})()  # same class name, another module: not it
    look_alike.weight = nn.Parameter(torch.zeros(4, 3))
    assert not stores_transposed(look_alike)


# ---------------------------------------------------------------------- selection
def test_default_policy_selects_conv1d_as_transposed():
    decisions = {c.name: c for c in select(conv1d_mlp(), SparsityPolicy())}
    assert decisions["0.weight"].sparse and decisions["0.weight"].transposed
    assert decisions["0.weight"].view.rows_shape == (24, 12)  # (out, fan_in) of a (12, 24) weight
    assert decisions["4.weight"].sparse and not decisions["4.weight"].transposed
    assert not decisions["0.bias"].sparse


def test_a_policy_without_conv1d_leaves_it_dense_and_says_why():
    decisions = {c.name: c for c in select(conv1d_mlp(), SparsityPolicy(types=(nn.Linear,)))}
    assert not decisions["0.weight"].sparse and decisions["0.weight"].reason == "type Conv1D not in sparse types"
    # The class itself works in types too, as the qualified name does.
    by_class = {c.name: c for c in select(conv1d_mlp(), SparsityPolicy(types=(Conv1D,)))}
    assert by_class["0.weight"].sparse and by_class["0.weight"].transposed and not by_class["4.weight"].sparse


# ---------------------------------------------------------------------- training: the twin test
def train(model, sp, opt, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    dtype = model[0].weight.dtype
    for _ in range(steps):
        x = torch.randn(16, 12, generator=generator, dtype=dtype)
        y = torch.randint(0, 5, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()


def build(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    kw = {"sparsity": 0.7, "total_steps": 40, "delta": 3, "gamma_sal": 0.5, **kw}
    return srigl.SRigL(model, opt, **kw), opt


@pytest.mark.parametrize("mask_init", ["random", "magnitude"])
def test_conv1d_trains_to_the_transposed_masks_of_its_nn_linear_twin(mask_init):
    model = conv1d_mlp().double()
    twin = as_linear_twin(model)
    sp, opt = build(model, mask_init=mask_init)
    twin_sp, twin_opt = build(twin, mask_init=mask_init)
    # Initial masks, sparse-init rescale and budgets agree before any step.
    for name in ("0.weight", "2.weight"):
        assert torch.equal(sp.masks()[name], twin_sp.masks()[name].t())
        torch.testing.assert_close(model.get_parameter(name), twin.get_parameter(name).t(), rtol=0, atol=0)
    train(model, sp, opt, 30)
    train(twin, twin_sp, twin_opt, 30)
    ablated = 0
    for name in ("0.weight", "2.weight"):
        mask = sp.masks()[name]  # (in, out)
        assert torch.equal(mask, twin_sp.masks()[name].t()), name
        torch.testing.assert_close(model.get_parameter(name), twin.get_parameter(name).t(), rtol=1e-9, atol=1e-12)
        per_neuron = mask.sum(dim=0)  # (out,): fan-in of every output neuron (column)
        assert per_neuron[per_neuron > 0].unique().numel() == 1, (name, per_neuron)
        assert not model.get_parameter(name)[~mask].any()
        ablated += int((per_neuron == 0).sum())
    assert ablated > 0  # ablation ran, and removed columns (output neurons)
    assert sp.summary()["0.weight"]["neurons"] == 24


def test_checkpoint_round_trip_resumes_bitwise(tmp_path):
    model = conv1d_mlp()
    sp, opt = build(model)
    train(model, sp, opt, 7)
    assert sp.state_dict()["masks"]["0.weight"].shape == (12, 24)  # saved in the stored layout
    srigl.save_checkpoint(tmp_path / "ckpt.pt", srigl.training_state(model, opt, sp))
    train(model, sp, opt, 9, seed=2)

    resumed = conv1d_mlp(seed=5)
    resumed_sp, resumed_opt = build(resumed)
    srigl.restore_training_state(srigl.load_checkpoint(tmp_path / "ckpt.pt"), resumed, resumed_opt, resumed_sp)
    assert resumed_sp.step_count == 7
    train(resumed, resumed_sp, resumed_opt, 9, seed=2)
    for name, mask in sp.masks().items():
        assert torch.equal(mask, resumed_sp.masks()[name]), name
    for name, param in model.named_parameters():
        assert torch.equal(param, resumed.get_parameter(name)), name


def test_weights_loaded_without_masks_are_adopted_along_columns():
    """model.state_dict() holds no masks: the loaded weights' zeros become the masks (constant fan-in
    per column), instead of the fresh sparsifier's random masks zeroing them."""
    trained = conv1d_mlp()
    sp, opt = build(trained)
    train(trained, sp, opt, 7)
    fresh = conv1d_mlp(seed=3)
    fresh_sp, _ = build(fresh)
    with pytest.warns(UserWarning, match="re-derived from the loaded weights"):
        fresh.load_state_dict(trained.state_dict())
    for name in ("0.weight", "2.weight"):
        assert torch.equal(fresh.get_parameter(name), trained.get_parameter(name)), name
        mask, nonzero = fresh_sp.masks()[name], fresh.get_parameter(name) != 0  # (in, out) each
        assert not (nonzero & ~mask).any(), name  # every loaded weight kept
        # Columns keep the trained fan-ins (a few active weights may be exactly 0, topped up by index).
        assert torch.equal(mask.sum(dim=0), sp.masks()[name].sum(dim=0)), name


# ---------------------------------------------------------------------- condense
def test_condense_turns_conv1d_into_condensed_linear_with_equal_outputs():
    model = conv1d_mlp()
    sp, opt = build(model, gamma_sal=0.6)
    train(model, sp, opt, 30)
    assert any(int((m.sum(dim=0) == 0).sum()) for n, m in sp.masks().items() if n != "4.weight")
    model.eval()
    x = torch.randn(7, 3, 12)  # leading dims, as a transformer's (batch, tokens, features)
    condensed, report = srigl.condense(model, return_report=True)
    assert isinstance(condensed[0], srigl.condensed.CondensedLinear)
    assert isinstance(condensed[2], srigl.condensed.CondensedLinear)
    assert report["layers"]["0"]["converted_from"] == "Conv1D"
    assert report["layers"]["2"]["shape_before"] == [24, 20]  # as stored, (in, out)
    # fx traces this model: ablated neurons of layer 0 are removed with layer 2's matching inputs.
    assert report["layers"]["0"]["removed_neurons"] == int((sp.masks()["0.weight"].sum(dim=0) == 0).sum())
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), model(x), rtol=1e-5, atol=1e-5)


def test_condense_leaves_a_conv1d_that_is_not_constant_fan_in_as_it_is():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8))
    mask = torch.rand(8, 6) < 0.5  # (in, out): fan-ins differ between columns
    mask[:, 0] = True  # column 0 holds all 8 inputs: certainly not one fan-in with the others
    with torch.no_grad():
        model[0].weight.mul_(mask)
    condensed, report = srigl.condense(model, masks={"0.weight": mask}, return_report=True)
    assert type(condensed[0]) is Conv1D
    assert report["layers"]["0"]["kind"] == "dense" and "not constant fan-in" in report["layers"]["0"]["reason"]


# ---------------------------------------------------------------------- compact storage
def test_compact_run_keeps_conv1d_masked_and_says_why():
    model = conv1d_mlp()
    sp, opt = build(model, compact=True)
    summary = sp.summary()
    assert summary["0.weight"]["storage"] == "masked"
    assert "stores its weight (in, out)" in summary["0.weight"]["storage_reason"]
    assert summary["4.weight"]["storage"] == "compact"
    train(model, sp, opt, 7)
    mask = sp.masks()["0.weight"]
    per_neuron = mask.sum(dim=0)  # (out,)
    assert per_neuron[per_neuron > 0].unique().numel() == 1


def test_erk_reads_stored_shapes_kernel_dims_included():
    """The (out, fan_in) view is for the update only: ERK's ratio counts a conv's kernel dims, and
    a transposed 2-D weight has the ratio of its twin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), Conv1D(10, 8 * 4 * 4), nn.Linear(10, 4))
    sp = srigl.SET(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=10)
    shapes = {name: tuple(model.get_parameter(name).shape) for name in ("0.weight", "2.weight", "3.weight")}
    expected = srigl.distributions.erk(shapes, 0.8)
    assert {layer.name: layer.sparsity for layer in sp.layers} == pytest.approx(expected)
    flattened = srigl.distributions.erk({**shapes, "0.weight": (8, 27)}, 0.8)  # what the (out, fan_in) view gives
    assert expected["0.weight"] != pytest.approx(flattened["0.weight"])
